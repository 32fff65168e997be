"""CLIP image embeddings and the paper's CLIP-c-I / CLIP-c-B scores.

Definitions used here (the paper, Sec. 5.1.3, names them but does not spell them out):

* **CLIP-c-I** = ``100 * cos(E(c), E(I))``: ``c`` is the product cutout (RGBA composited onto white,
  or an RGB cutout as given), ``I`` the whole generated image, ``E`` the CLIP image embedding
  (``visual_projection`` of the pooled vision output, i.e. ``CLIPModel.get_image_features``).
* **CLIP-c-B** = ``100 * cos(E(c), E(B))``: ``B`` is the generated image with the product region
  neutralised to flat grey (127) by :func:`diffusers_product2img.placement.background_only_image`,
  the same "background only" view that Contrastive Background Alignment trains on. The grey
  silhouette keeps the product's outline; only its pixels are removed.

Both are in ``[-100, 100]`` and symmetric in their two images. The default backbone is
``openai/clip-vit-large-patch14``; any ``CLIPModel`` folder or Hub id works (tests use a tiny one).
Every image goes through the model's own ``CLIPImageProcessor`` (resize shortest side, centre crop),
so PIL images of any size and mode are accepted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from ..placement import background_only_image, has_alpha, to_product_mask, to_rgb

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "CLIPImageEncoder",
    "cosine_scores",
    "cutout_to_rgb",
    "generated_backgrounds",
    "clip_image_similarity",
    "clip_c_i",
    "clip_c_b",
]

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def cutout_to_rgb(cutout: Image.Image, fill: int = 255) -> Image.Image:
    """The cutout as CLIP sees it: an RGBA cutout composited onto a flat ``fill`` (white) canvas."""
    if has_alpha(cutout):
        rgba = cutout.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (fill, fill, fill))
        canvas.paste(rgba.convert("RGB"), (0, 0), rgba.getchannel("A"))
        return canvas
    return to_rgb(cutout, "cutout")


def generated_backgrounds(generated: Sequence[Image.Image], product_masks: Sequence) -> list[Image.Image]:
    """The generated images with the product region greyed out (the ``B`` of CLIP-c-B).

    A mask of another size than its image is resized to the image (bilinear, keeping soft edges).
    """
    if len(generated) != len(product_masks):
        raise ValueError(f"{len(generated)} images but {len(product_masks)} masks")
    out = []
    for image, mask in zip(generated, product_masks):
        image = to_rgb(image, "generated image")
        mask = to_product_mask(mask)
        if mask.size != image.size:
            mask = mask.resize(image.size, Image.Resampling.BILINEAR)
        out.append(background_only_image(image, mask))
    return out


def cosine_scores(a: torch.Tensor, b: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """Row-wise ``scale * cos(a_i, b_i)`` in float32."""
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return scale * (a * b).sum(dim=-1).clamp(-1.0, 1.0)


class CLIPImageEncoder:
    """A ``transformers.CLIPModel`` with its image processor (and tokenizer), batched and gradient-free.

    Args:
        model: a ``CLIPModel`` (text and vision towers).
        image_processor: its ``CLIPImageProcessor``.
        tokenizer: its tokenizer (only needed for :meth:`embed_texts`).
        batch_size: images or texts per forward pass.
        name: the model id or path, recorded in the metric outputs.
    """

    def __init__(self, model, image_processor, tokenizer=None, batch_size: int = 16, name: str = "custom"):
        self.model = model.eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.name = name

    @classmethod
    def from_pretrained(
        cls,
        model_id: str = DEFAULT_CLIP_MODEL,
        processor_id: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        load_tokenizer: bool = False,
    ) -> CLIPImageEncoder:
        """Load a ``CLIPModel`` and its processor from a Hub id or a local folder.

        ``processor_id`` defaults to ``model_id`` (PickScore_v1 keeps its processor in the LAION
        ViT-H-14 repo, so it passes one).
        """
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        processor_id = processor_id or model_id
        model = CLIPModel.from_pretrained(model_id, dtype=dtype).to(device)
        image_processor = AutoImageProcessor.from_pretrained(processor_id)
        tokenizer = AutoTokenizer.from_pretrained(processor_id) if load_tokenizer else None
        return cls(model, image_processor, tokenizer, batch_size=batch_size, name=model_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def projection_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp())

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(N, projection_dim)`` float32 CPU image embeddings, not normalised."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [to_rgb(im) for im in images[start : start + self.batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            vision = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype))
            chunks.append(self.model.visual_projection(vision.pooler_output).float().cpu())
        if not chunks:
            return torch.empty(0, self.projection_dim)
        return torch.cat(chunks)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, projection_dim)`` float32 CPU text embeddings, not normalised (truncated to 77 tokens)."""
        if self.tokenizer is None:
            raise ValueError("this encoder was loaded without a tokenizer (load_tokenizer=True)")
        chunks = []
        max_length = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77), 77)
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                max_length=max_length, return_tensors="pt",
            )
            text = self.model.text_model(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
            chunks.append(self.model.text_projection(text.pooler_output).float().cpu())
        if not chunks:
            return torch.empty(0, self.projection_dim)
        return torch.cat(chunks)


def clip_image_similarity(encoder: CLIPImageEncoder, images_a, images_b) -> torch.Tensor:
    """``100 * cos`` between the CLIP embeddings of paired images (one score per pair)."""
    if len(images_a) != len(images_b):
        raise ValueError(f"{len(images_a)} vs {len(images_b)} images")
    return cosine_scores(encoder.embed_images(list(images_a)), encoder.embed_images(list(images_b)))


def clip_c_i(encoder: CLIPImageEncoder, cutouts, generated) -> torch.Tensor:
    """CLIP-c-I per image: cutout (on white) vs the whole generated image."""
    return clip_image_similarity(encoder, [cutout_to_rgb(c) for c in cutouts], generated)


def clip_c_b(encoder: CLIPImageEncoder, cutouts, generated, product_masks) -> torch.Tensor:
    """CLIP-c-B per image: cutout (on white) vs the generated background with the product greyed out."""
    return clip_image_similarity(
        encoder, [cutout_to_rgb(c) for c in cutouts], generated_backgrounds(generated, product_masks)
    )
