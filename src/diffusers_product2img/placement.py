"""Cutouts, canvases and masks: the one place that defines the mask convention.

Convention used everywhere in this package:

* a **product mask** is a single-channel image that is 255 (1.0) on the product and 0 on the
  background; soft values in between are the anti-aliased cutout edge (taken from the alpha channel);
* the **inpainting mask** handed to the UNet is its complement, as in diffusers'
  ``StableDiffusionInpaintPipeline``: white (1) = generate, black (0) = keep.

So a user passes what they have (an RGBA cutout, or an RGB photo plus a product mask) and the
product is kept while everything else is generated.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

__all__ = [
    "to_rgb",
    "product_mask_from_alpha",
    "to_product_mask",
    "place_cutout",
    "composite_product",
    "inpainting_condition",
    "product_only_image",
    "background_only_image",
]

Position = Literal["center", "bottom"] | tuple[float, float]


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Convert any common PIL mode (L, P, CMYK, 16-bit grey, RGBA, ...) to 8-bit RGB.

    Alpha, if any, is dropped here; use :func:`product_mask_from_alpha` to read it.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name} must be a PIL.Image.Image, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits instead of clipping everything above 255 to white.
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        arr = np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def product_mask_from_alpha(cutout: Image.Image) -> Image.Image:
    """Product mask (L, 255 = product) from the alpha channel of a cutout."""
    if not has_alpha(cutout):
        raise ValueError(
            f"the cutout has no alpha channel (mode {cutout.mode}); pass an RGBA cutout, or an RGB image "
            "together with a product mask (white = product to keep)"
        )
    return cutout.convert("RGBA").getchannel("A")


def to_product_mask(mask: Image.Image | np.ndarray, name: str = "mask") -> Image.Image:
    """Normalise a user's product mask (PIL of any mode, or an HxW array in [0, 1] or [0, 255]) to L."""
    if isinstance(mask, np.ndarray):
        arr = mask.astype(np.float64)
        if arr.ndim == 3:
            arr = arr[..., 0] if arr.shape[-1] in (1, 3, 4) else arr[0]
        if arr.ndim != 2:
            raise ValueError(f"{name} array must be HxW, got shape {mask.shape}")
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    if not isinstance(mask, Image.Image):
        raise TypeError(f"{name} must be a PIL image or a numpy array, got {type(mask).__name__}")
    if mask.mode in ("RGBA", "LA"):
        return mask.getchannel("A")
    if mask.mode == "L":
        return mask
    return to_rgb(mask, name).convert("L")


def _alpha_bbox(mask: Image.Image) -> tuple[int, int, int, int]:
    bbox = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if bbox is None:
        raise ValueError("the cutout is fully transparent: there is no product to place")
    return bbox


def place_cutout(
    cutout: Image.Image,
    size: tuple[int, int] = (512, 512),
    scale: float = 0.6,
    position: Position = "center",
    fill: tuple[int, int, int] = (255, 255, 255),
) -> tuple[Image.Image, Image.Image]:
    """Place an RGBA cutout on a canvas the way EPBD images are framed.

    The cutout is trimmed to its visible pixels, resized (aspect ratio kept) so that its longer side
    is ``scale`` times the canvas's shorter side, and pasted at ``position``: ``"center"``,
    ``"bottom"`` (centred horizontally, resting on the lower 10% margin), or ``(x, y)`` fractions of
    the canvas for the product's centre.

    Args:
        cutout: RGBA (or LA / P with transparency) image of the product.
        size: canvas ``(width, height)``.
        scale: product size relative to the canvas, in ``(0, 1]``.
        position: where the product goes.
        fill: RGB colour of the canvas under the background (it is regenerated anyway).

    Returns:
        ``(image, product_mask)``: the RGB canvas and the L product mask (255 = product).
    """
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    width, height = size
    alpha = product_mask_from_alpha(cutout)
    bbox = _alpha_bbox(alpha)
    rgba = cutout.convert("RGBA").crop(bbox)
    cw, ch = rgba.size
    factor = scale * min(width, height) / max(cw, ch)
    new_w, new_h = max(1, round(cw * factor)), max(1, round(ch * factor))
    rgba = rgba.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if position == "center":
        cx, cy = width / 2, height / 2
    elif position == "bottom":
        cx, cy = width / 2, height * 0.9 - new_h / 2
    elif isinstance(position, tuple) and len(position) == 2:
        cx, cy = position[0] * width, position[1] * height
    else:
        raise ValueError(f"position must be 'center', 'bottom' or an (x, y) tuple of fractions, got {position!r}")
    left, top = round(cx - new_w / 2), round(cy - new_h / 2)
    canvas = Image.new("RGB", (width, height), fill)
    mask = Image.new("L", (width, height), 0)
    canvas.paste(rgba.convert("RGB"), (left, top), rgba.getchannel("A"))
    mask.paste(rgba.getchannel("A"), (left, top))
    return canvas, mask


def composite_product(generated, original, product_mask):
    """Paste the original product pixels over a generated image.

    Inputs are float arrays or tensors in ``[0, 1]`` that broadcast together (images
    ``(B, 3, H, W)`` with a mask ``(B, 1, H, W)``, or channels-last), mask 1 = product. Where the mask is 1 the result is exactly the original pixel; the soft edge band of
    the cutout blends the two, which avoids the halo of a hard paste.
    """
    return product_mask * original + (1.0 - product_mask) * generated


def inpainting_condition(pixel_values, product_mask):
    """``(inpaint_mask, masked_pixel_values)``: what the 9-channel UNet is conditioned on.

    The one definition shared by the pipeline and training. ``pixel_values`` is ``(B, 3, H, W)`` in
    [-1, 1], ``product_mask`` ``(B, 1, H, W)`` in [0, 1] (1 = product). The inpainting mask is 1 where
    the product mask is below 0.5 (generate there); the masked image keeps the product and sets the
    rest to 0 (mid-grey), as SD-Inpainting was trained.
    """
    inpaint_mask = (product_mask < 0.5).to(pixel_values.dtype)
    return inpaint_mask, pixel_values * (1.0 - inpaint_mask)


def product_only_image(image: Image.Image, product_mask: Image.Image, fill: int = 255) -> Image.Image:
    """The product on a neutral canvas: what the model is given to keep (the masked image)."""
    canvas = Image.new("RGB", image.size, (fill, fill, fill))
    canvas.paste(to_rgb(image), (0, 0), product_mask)
    return canvas


def background_only_image(image: Image.Image, product_mask: Image.Image, fill: int = 127) -> Image.Image:
    """The background B with the product region neutralised to grey (input of the CBA image side)."""
    return Image.composite(Image.new("RGB", image.size, (fill, fill, fill)), to_rgb(image), product_mask)
