"""Preprocessing shared by training, evaluation and the data tools: one geometry for every image.

An EPBD sample is an image with its product mask (or the RGBA cutout whose alpha is that mask).
:func:`prepare_example` brings both to the training resolution with the *same* centre crop and
resize, then builds the two derived images the method needs, using the mask convention of
:mod:`diffusers_product2img.placement` (product mask: L, 255 = product):

* ``product_image``: the product on a neutral canvas (what the inpainting model is given to keep);
* ``background_image``: ``B``, the image with the product region neutralised (the image side of the
  Contrastive Background Alignment loss, paper eq. 4).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..placement import (
    background_only_image,
    has_alpha,
    product_mask_from_alpha,
    product_only_image,
    to_product_mask,
    to_rgb,
)
from .layout import METADATA_FILE, METADATA_JSONL_FILE, EPBDLayoutError

__all__ = ["center_crop_box", "resize_center_crop", "prepare_example", "prepare_batch", "to_tensor", "load_epbd"]

logger = logging.getLogger(__name__)

EXPORT_MANIFEST = "epbd_export.json"  # written by .export next to the README.md


def center_crop_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The largest centred square of an image of ``(width, height)``, as a PIL box."""
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def resize_center_crop(image: Image.Image, resolution: int, resample: Image.Resampling) -> Image.Image:
    """Centre-crop to a square and resize to ``resolution`` in one step (PIL ``box=``)."""
    if image.size == (resolution, resolution):
        return image
    return image.resize((resolution, resolution), resample, box=center_crop_box(image.size))


def prepare_example(image: Image.Image, cutout_or_mask, resolution: int = 512) -> dict[str, Image.Image]:
    """Bring one sample to the training resolution, consistently for image and mask.

    Args:
        image: the product image with its background (any PIL mode; converted to RGB).
        cutout_or_mask: the RGBA cutout (its alpha is the product mask), or the product mask itself
            (PIL L / any mode, or an HxW array), same size as ``image``.
        resolution: side of the square output.

    Returns:
        ``image`` (RGB), ``mask`` (L, 255 = product), ``product_image`` (the product on white) and
        ``background_image`` (B: the product region set to grey), all ``resolution`` x ``resolution``.
        Images are resampled bicubically and the mask bilinearly, over the same crop box.
    """
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an int >= 8, got {resolution!r}")
    rgb = to_rgb(image)
    if isinstance(cutout_or_mask, Image.Image) and has_alpha(cutout_or_mask):
        mask = product_mask_from_alpha(cutout_or_mask)
    else:
        mask = to_product_mask(cutout_or_mask)
    if mask.size != rgb.size:
        raise ValueError(
            f"the cutout/mask is {mask.size[0]}x{mask.size[1]} but the image is {rgb.size[0]}x{rgb.size[1]}; "
            "EPBD cutouts are cut from their image (same size). To frame a loose cutout use "
            "diffusers_product2img.placement.place_cutout"
        )
    rgb = resize_center_crop(rgb, resolution, Image.Resampling.BICUBIC)
    mask = resize_center_crop(mask, resolution, Image.Resampling.BILINEAR)
    return {
        "image": rgb,
        "mask": mask,
        "product_image": product_only_image(rgb, mask),
        "background_image": background_only_image(rgb, mask),
    }


def prepare_batch(batch: Mapping[str, Sequence], resolution: int) -> dict[str, list]:
    """:func:`prepare_example` over a ``datasets`` batch (for ``Dataset.with_transform``).

    Uses the ``mask`` column (falls back to ``cutout``); other columns pass through unchanged.
    """
    masks = batch["mask"] if "mask" in batch else batch["cutout"]
    prepared = [prepare_example(img, m, resolution) for img, m in zip(batch["image"], masks)]
    out = {k: list(v) for k, v in batch.items() if k not in ("image", "mask", "cutout")}
    for key in ("image", "mask", "product_image", "background_image"):
        out[key] = [p[key] for p in prepared]
    return out


def to_tensor(image: Image.Image):
    """A PIL image as a float ``torch`` tensor: RGB -> (3, H, W) in [-1, 1]; L -> (1, H, W) in [0, 1]."""
    import torch

    arr = np.asarray(image, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        return torch.from_numpy(arr[None].copy())
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()) * 2.0 - 1.0


_ROUND_CONFIG_RE = re.compile(r"^idr_round_(\d+)(?:_gamma.+)?$")


def _export_manifest(path_or_repo: str, revision: str | None = None) -> dict | None:
    local = Path(path_or_repo)
    if local.is_dir():
        p = local / EXPORT_MANIFEST
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None
    try:
        from huggingface_hub import hf_hub_download

        p = hf_hub_download(path_or_repo, EXPORT_MANIFEST, repo_type="dataset", revision=revision)
        return json.loads(Path(p).read_text(encoding="utf-8"))
    except Exception as err:  # offline, no such file, ...
        logger.warning("could not read %s of %s (%s): cannot check the config's own thresholds",
                       EXPORT_MANIFEST, path_or_repo, err)
        return None


def load_epbd(path_or_repo: str | os.PathLike, config: str | None = None, split: str | None = None,
              threshold: float | None = None, **load_kwargs):
    """Load an exported EPBD (local folder or Hub dataset repo) with ``datasets.load_dataset``.

    Args:
        path_or_repo: a folder written by :func:`~diffusers_product2img.data.export.export_epbd`, or a
            Hub dataset repo id holding one.
        config: ``None``/``"default"`` (all splits), ``"idr_round_<k>"`` (train samples kept in round k).
        split: a split name, or ``None`` for a ``DatasetDict``.
        threshold: a stricter gamma for a round config: keeps rows whose scores of rounds 1..k are
            all >= ``threshold``. A looser gamma needs scores of samples that the exported config
            dropped; use the builder on the raw data (or export a ``idr_round_<k>_gamma<t>`` config).
        load_kwargs: passed to ``datasets.load_dataset`` (``cache_dir``, ``revision``, ...).
    """
    import datasets

    path = Path(path_or_repo)
    if path.is_dir():
        if not (path / "README.md").exists() and ((path / METADATA_FILE).exists() or (path / METADATA_JSONL_FILE).exists()):
            raise EPBDLayoutError(
                "this is a raw EPBD folder; export it first (`product2img dataset-export RAW OUT` or "
                "export_epbd(raw, out)), or run dataset_scripts/epbd/epbd.py's EPBD builder on it", path=path)
        path_or_repo = str(path.resolve())  # load_dataset("epbd") would otherwise mean a Hub id
    ds = datasets.load_dataset(str(path_or_repo), config, split=split, **load_kwargs)
    if threshold is None:
        return ds
    match = _ROUND_CONFIG_RE.match(config or "")
    if not match:
        raise ValueError(f"threshold applies to an idr_round_<k> config, not {config!r}")
    round_index = int(match.group(1))
    manifest = _export_manifest(str(path_or_repo), load_kwargs.get("revision"))
    if manifest is not None:
        stored = manifest.get("configs", {}).get(config, {}).get("thresholds") or []
        if any(float(threshold) < t for t in stored):
            raise ValueError(
                f"config {config!r} was exported with thresholds {stored}; threshold {threshold} is looser, so it "
                "needs samples that this config does not hold. Build it from the raw data (EPBD builder with "
                f"threshold={threshold}) or export it (add_round_config(..., threshold={threshold}))")
    columns = [f"score_round_{k}" for k in range(1, round_index + 1)]
    gamma = float(threshold)
    return ds.filter(lambda *scores: all(s is not None and s >= gamma for s in scores), input_columns=columns)
