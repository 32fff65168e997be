"""Product fidelity: what e-commerce needs and the paper does not measure.

A background generator must not touch the product. Two per-image numbers check that:

**Exact-pixel rate** — among the *fully opaque* product pixels (product mask == 255; the soft
anti-aliased edge is excluded), the fraction whose uint8 RGB value in the generated image equals the
source image's exactly (tolerance 0). 1.0 means the product was pasted back bit-exactly; a pipeline
that only inpaints in latent space typically scores far below 1. Also reported: the mean absolute
error over the same pixels (``product_mae``, 0-255 scale), which says *how far* off they are.
Both need the generated image and the source at the same size (no resampling can be exact).

**Object expansion** — inpainting models like to *grow* the product: a longer handle, a second
bottle, a product-coloured blob next to it. Defined on a ring of background pixels just outside the
product:

* ``ring``: pixels with mask == 0 within ``ring_width`` px (square/Chebyshev distance) of any product
  pixel (mask > 0); ``ring_width`` defaults to 10% of the product's size, ``sqrt(#opaque pixels)``,
  and at least 2 px;
* ``band``: pixels with mask == 0 between ``ring_width`` and ``3 * ring_width`` px away, the
  surrounding background;
* colour models: 8x8x8-bin RGB histograms (normalised) of the product's opaque pixels in the source
  image (``P``) and of the image's own ``band`` (``B``);
* a ring pixel is *product-like* when its bin has ``P > B`` and ``P`` above the uniform share
  ``1/512`` (so colours the product never shows do not count);
* ``expansion_rate(image)`` = fraction of ring pixels that are product-like.

``object_expansion(generated, reference)`` = ``expansion_rate(generated) - expansion_rate(reference)``:
how much *more* product-like content surrounds the product than in the real photo (which may show
a natural shadow or a table of the same colour). Positive = the product grew; ~0 = kept; it can be
negative. Without a reference, report ``expansion_rate(generated)`` alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..placement import to_product_mask, to_rgb

__all__ = [
    "exact_pixel_rate",
    "product_mae",
    "expansion_rate",
    "object_expansion",
    "default_ring_width",
]

_BINS = 8


def _rgb_array(image: Image.Image, name: str) -> np.ndarray:
    return np.asarray(to_rgb(image, name), dtype=np.uint8)


def _mask_array(mask) -> np.ndarray:
    return np.asarray(to_product_mask(mask), dtype=np.uint8)


def _check_same_size(**arrays: np.ndarray) -> None:
    shapes = {name: arr.shape[:2] for name, arr in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"sizes differ (HxW): {shapes}; resize before comparing")


def exact_pixel_rate(generated: Image.Image, source: Image.Image, product_mask) -> float:
    """Fraction of fully-opaque product pixels whose uint8 RGB is unchanged (NaN if there are none)."""
    gen, src, mask = _rgb_array(generated, "generated"), _rgb_array(source, "source"), _mask_array(product_mask)
    _check_same_size(generated=gen, source=src, mask=mask)
    core = mask == 255
    if not core.any():
        return float("nan")
    equal = np.all(gen == src, axis=-1)
    return float(equal[core].mean())


def product_mae(generated: Image.Image, source: Image.Image, product_mask) -> float:
    """Mean absolute uint8 error over the fully-opaque product pixels and channels (NaN if none)."""
    gen, src, mask = _rgb_array(generated, "generated"), _rgb_array(source, "source"), _mask_array(product_mask)
    _check_same_size(generated=gen, source=src, mask=mask)
    core = mask == 255
    if not core.any():
        return float("nan")
    return float(np.abs(gen.astype(np.int16) - src.astype(np.int16))[core].mean())


def default_ring_width(product_mask) -> int:
    """10% of the product's size (``sqrt`` of its opaque area), at least 2 px."""
    area = int((_mask_array(product_mask) == 255).sum())
    return max(2, round(0.1 * math.sqrt(area)))


def _dilate(binary: np.ndarray, radius: int) -> np.ndarray:
    """Square dilation by ``radius`` px (separable max pooling, O(HW * radius))."""
    if radius <= 0:
        return binary.copy()
    t = torch.from_numpy(binary.astype(np.float32))[None, None]
    k = 2 * radius + 1
    t = torch.nn.functional.max_pool2d(t, (1, k), stride=1, padding=(0, radius))
    t = torch.nn.functional.max_pool2d(t, (k, 1), stride=1, padding=(radius, 0))
    return t[0, 0].numpy() > 0.5


def _bin_index(pixels: np.ndarray) -> np.ndarray:
    q = (pixels.astype(np.int32) * _BINS) // 256
    return (q[..., 0] * _BINS + q[..., 1]) * _BINS + q[..., 2]


def _histogram(pixels: np.ndarray) -> np.ndarray:
    counts = np.bincount(_bin_index(pixels).ravel(), minlength=_BINS**3).astype(np.float64)
    return counts / max(1.0, counts.sum())


def expansion_rate(
    image: Image.Image, product_mask, product_source: Image.Image | None = None, ring_width: int | None = None
) -> float:
    """Fraction of the ring just outside the product whose colour is product-like (see module doc).

    Args:
        image: the image to inspect (generated or real).
        product_mask: L mask, 255 = product, same size as ``image``.
        product_source: where the product's colours are read (default: ``image`` itself).
        ring_width: ring width in px (default :func:`default_ring_width`).

    Returns NaN when there is no opaque product pixel, no ring or no background band.
    """
    img, mask = _rgb_array(image, "image"), _mask_array(product_mask)
    src = img if product_source is None else _rgb_array(product_source, "product_source")
    _check_same_size(image=img, product_source=src, mask=mask)
    core, outside = mask == 255, mask == 0
    if not core.any():
        return float("nan")
    r = default_ring_width(mask) if ring_width is None else int(ring_width)
    touched = mask > 0
    near = _dilate(touched, r)
    ring = near & outside
    band = _dilate(touched, 3 * r) & outside & ~near
    if not band.any():  # the product nearly fills the frame: all farther background
        band = outside & ~near
    if not ring.any() or not band.any():
        return float("nan")
    p_product = _histogram(src[core])
    p_background = _histogram(img[band])
    bins = _bin_index(img[ring])
    product_like = (p_product[bins] > p_background[bins]) & (p_product[bins] > 1.0 / _BINS**3)
    return float(product_like.mean())


def _resized(image: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    return image if image.size == size else image.resize(size, resample)


def object_expansion(
    generated: Image.Image, reference: Image.Image | None, product_mask, ring_width: int | None = None
) -> float:
    """``expansion_rate(generated) - expansion_rate(reference)``, product colours read from the reference.

    The reference and mask are resized to the generated image when sizes differ. With
    ``reference=None`` this is ``expansion_rate(generated)`` with colours from the generated product.
    """
    generated = to_rgb(generated, "generated")
    mask = _resized(to_product_mask(product_mask), generated.size, Image.Resampling.BILINEAR)
    if reference is None:
        return expansion_rate(generated, mask, ring_width=ring_width)
    reference = _resized(to_rgb(reference, "reference"), generated.size, Image.Resampling.BICUBIC)
    width = default_ring_width(mask) if ring_width is None else ring_width
    return expansion_rate(generated, mask, reference, width) - expansion_rate(reference, mask, reference, width)
