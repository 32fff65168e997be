"""Canny edge maps in NumPy, for the ControlNet-Inpainting (canny) baseline.

The usual ControlNet recipe is ``cv2.Canny(image, 100, 200)``; this is the same algorithm without the
OpenCV dependency: 3x3 Sobel gradients (replicated border), L1 magnitude ``|gx| + |gy|`` (OpenCV's
default ``L2gradient=False``), non-maximum suppression along four directions, and hysteresis between
the two thresholds with 8-connectivity. It works on the luminance of the image (OpenCV takes the
channel with the largest gradient for a colour input), so edge maps can differ from OpenCV's by
a few pixels; the baseline only needs the product outline and its inner edges.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["canny_edges", "canny_control_image"]

_TAN_22_5 = np.tan(np.deg2rad(22.5))


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(gray, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return gx, gy


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``out[y, x] = a[y + dy, x + dx]``, zero outside the image."""
    out = np.zeros_like(a)
    h, w = a.shape
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[yd, xd] = a[ys, xs]
    return out


def _non_max_suppression(mag: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay <= _TAN_22_5 * ax  # gradient along x: compare left/right
    vertical = ax <= _TAN_22_5 * ay  # gradient along y: compare up/down
    diagonal = ~(horizontal | vertical)
    same_sign = (gx * gy) > 0  # y grows downwards: the gradient points to the lower right / upper left
    keep = np.zeros(mag.shape, dtype=bool)
    for region, (dy, dx) in (
        (horizontal, (0, 1)),
        (vertical, (1, 0)),
        (diagonal & same_sign, (1, 1)),
        (diagonal & ~same_sign, (1, -1)),
    ):
        # As OpenCV: strictly greater than one neighbour, at least equal to the other (thin ridges).
        local = (mag > _shift(mag, -dy, -dx)) & (mag >= _shift(mag, dy, dx))
        keep |= region & local
    return np.where(keep, mag, 0.0)


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - scipy is optional
        edges = strong.copy()
        while True:
            grown = edges.copy()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if dy or dx:
                        grown |= _shift(edges, dy, dx)
            grown &= weak
            if np.array_equal(grown, edges):
                return edges
            edges = grown
    labels, n = ndimage.label(weak, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros_like(weak)
    connected = np.zeros(n + 1, dtype=bool)
    connected[np.unique(labels[strong])] = True
    connected[0] = False
    return connected[labels]


def canny_edges(image: Image.Image, low_threshold: float = 100, high_threshold: float = 200) -> Image.Image:
    """Canny edges of ``image`` (any mode) as an L image: 255 on edges, 0 elsewhere."""
    if low_threshold > high_threshold:
        raise ValueError(f"low_threshold {low_threshold} is above high_threshold {high_threshold}")
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    gx, gy = _sobel(gray)
    mag = np.abs(gx) + np.abs(gy)
    thin = _non_max_suppression(mag, gx, gy)
    edges = _hysteresis(thin > high_threshold, thin > low_threshold)
    return Image.fromarray((edges * 255).astype(np.uint8))


def canny_control_image(image: Image.Image, low_threshold: float = 100, high_threshold: float = 200) -> Image.Image:
    """The RGB control image of a canny ControlNet (white edges on black, as ControlNet was trained)."""
    return canny_edges(image, low_threshold, high_threshold).convert("RGB")
