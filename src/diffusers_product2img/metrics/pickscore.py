"""PickScore (Kirstain et al., 2023) on the raw logit scale the paper reports (~18-23).

``PickScore(I, t) = exp(logit_scale) * cos(E_img(I), E_txt(t))`` with the ``yuvalkirstain/PickScore_v1``
CLIP-H model; its processor (image preprocessing and tokenizer) lives in
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. No softmax over candidates: one absolute score per image.

**Which text is scored.** Product2Img is prompt-free: the user gives a cutout and a *product name*,
so by default the text scored against each generated image is the product name as given (e.g.
"matte black ceramic mug"), not a prompt with the ``<background>`` token, which PickScore's text
tower has never seen. :func:`~diffusers_product2img.metrics.evaluate.evaluate_images` takes other
texts (captions, prompts) through its ``texts`` argument, and records which text it used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from .clip_scores import CLIPImageEncoder, cosine_scores

__all__ = ["DEFAULT_PICKSCORE_MODEL", "DEFAULT_PICKSCORE_PROCESSOR", "PickScorer"]

DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScorer:
    """Scores (image, text) pairs with a PickScore-style CLIP model."""

    def __init__(self, encoder: CLIPImageEncoder, processor_name: str | None = None):
        if encoder.tokenizer is None:
            raise ValueError("PickScore needs the encoder's tokenizer")
        self.encoder = encoder
        self.processor_name = processor_name or encoder.name

    @classmethod
    def from_pretrained(
        cls,
        model_id: str = DEFAULT_PICKSCORE_MODEL,
        processor_id: str | None = DEFAULT_PICKSCORE_PROCESSOR,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ) -> PickScorer:
        encoder = CLIPImageEncoder.from_pretrained(
            model_id, processor_id=processor_id, device=device, dtype=dtype, batch_size=batch_size,
            load_tokenizer=True,
        )
        return cls(encoder, processor_name=processor_id or model_id)

    def describe(self) -> dict:
        return {
            "metric": "PickScore",
            "model": self.encoder.name,
            "processor": self.processor_name,
            "formula": "exp(logit_scale) * cos(image_embeds, text_embeds), no softmax",
            "logit_scale_exp": round(self.encoder.logit_scale, 4),
        }

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """One score per (image, text) pair, float32 ``(N,)``."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        image_embeds = self.encoder.embed_images(list(images))
        text_embeds = self.encoder.embed_texts(list(texts))
        return cosine_scores(image_embeds, text_embeds, scale=self.encoder.logit_scale)
