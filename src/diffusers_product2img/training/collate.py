"""EPBD rows -> training tensors. Deterministic: no random crop, flip or dropout.

Per sample (paper 4.3): the target image ``I``, the product (masked image) and its mask that the
9-channel UNet is conditioned on, the background image ``B`` and ``I`` for the CLIP image side, and
the token ids of ``"{product name} <background>"`` with the positions CBA pools (built by
:func:`~diffusers_product2img.background_token.tokenize_product_names`, the same function the
pipeline uses). Geometry comes from :func:`~diffusers_product2img.data.preprocessing.prepare_example`.
"""

from __future__ import annotations

import torch

from ..background_token import DEFAULT_BACKGROUND_TOKEN, tokenize_product_names
from ..data.preprocessing import prepare_example, to_tensor
from ..placement import inpainting_condition

__all__ = ["Product2ImgCollator", "inpainting_condition"]


class Product2ImgCollator:
    """``collate_fn`` for EPBD rows (dicts with ``product_name``, ``image`` and ``mask`` or ``cutout``).

    Output keys: ``input_ids``, ``background_positions``, ``eos_positions``, ``positions`` (stream
    positions, ``_position`` of each row or its index in the list) and ``row_indices``
    (``_row_index``); then either the cached frozen features of those rows (when a
    ``feature_cache`` is given: the images are not even read) or ``pixel_values`` (I, [-1, 1]),
    ``masked_pixel_values``, ``inpaint_mask`` and, with a CLIP processor,
    ``clip_background_pixel_values`` (B) and ``clip_image_pixel_values`` (I).
    """

    def __init__(self, tokenizer, resolution: int = 512, clip_processor=None,
                 background_token: str = DEFAULT_BACKGROUND_TOKEN, feature_cache=None):
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.clip_processor = clip_processor
        self.background_token = background_token
        self.feature_cache = feature_cache

    def __call__(self, rows: list[dict]) -> dict:
        ids = tokenize_product_names(self.tokenizer, [r["product_name"] for r in rows], self.background_token)
        batch = {
            "input_ids": ids.input_ids,
            "background_positions": ids.background_positions,
            "eos_positions": ids.eos_positions,
            "positions": torch.tensor([r.get("_position", i) for i, r in enumerate(rows)], dtype=torch.long),
            "row_indices": torch.tensor([r.get("_row_index", i) for i, r in enumerate(rows)], dtype=torch.long),
        }
        if self.feature_cache is not None:
            batch.update(self.feature_cache[batch["row_indices"].tolist()])
            return batch
        prepared = []
        for r in rows:
            mask = r.get("mask")
            prepared.append(prepare_example(r["image"], mask if mask is not None else r["cutout"], self.resolution))
        pixel_values = torch.stack([to_tensor(p["image"]) for p in prepared])
        product_mask = torch.stack([to_tensor(p["mask"]) for p in prepared])
        inpaint_mask, masked = inpainting_condition(pixel_values, product_mask)
        batch.update(pixel_values=pixel_values, masked_pixel_values=masked, inpaint_mask=inpaint_mask)
        if self.clip_processor is not None:
            clip = self.clip_processor
            batch["clip_background_pixel_values"] = clip(
                images=[p["background_image"] for p in prepared], return_tensors="pt"
            ).pixel_values
            batch["clip_image_pixel_values"] = clip(images=[p["image"] for p in prepared], return_tensors="pt").pixel_values
        return batch
