"""Contrastive Background Alignment (CBA, paper 4.3): the contrastive terms of the training loss.

The total training loss is (eq. 5)::

    L = L_inpaint + lambda * (L'cl(b, B) + L'cl(P, I))

* ``L'cl(b, B)``: the text encoder's output at the ``<background>`` token (``r_b``) against the CLIP
  image embedding of the background image ``B`` (the target image with the product greyed out);
* ``L'cl(P, I)``: the text encoder's output at the ``<eos>`` token (the sentence feature, as in
  CLIP) against the CLIP image embedding of the whole target image ``I``;
* ``L'cl`` is the symmetrised InfoNCE of eq. 4: cosine similarity, temperature ``tau`` (0.05),
  the other samples of the (global) batch as negatives, averaged over both directions.

Text and image features live in different spaces, so the text features go through a
:class:`TextToImageProjection` into the CLIP image-embedding space first. For an SD-1.5 text
encoder (the text tower of CLIP ViT-L/14) the natural start is CLIP ViT-L/14's own
``text_projection``: the text encoder's last hidden state is already layer-normed, so the projected
``<eos>`` feature is exactly CLIP's text embedding at step 0, and ``L'cl(P, I)`` starts as CLIP's
own image-text loss.

With several processes, :func:`gather_with_grad` collects every process's features so the negatives
come from the global batch. Every process then computes the same global loss, but only its own slice
carries gradient; since DDP *averages* gradients over processes, the training step multiplies the
contrastive term by the number of processes before ``backward`` (see
``diffusers_product2img.training.loop``), which makes the update exactly the gradient of the
global-batch loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = [
    "CBA_PROJECTION_DIR",
    "DEFAULT_CBA_TEMPERATURE",
    "DEFAULT_CBA_WEIGHT",
    "DEFAULT_CLIP_MODEL",
    "CBALoss",
    "TextToImageProjection",
    "cba_loss",
    "clip_image_embeddings",
    "contrastive_background_loss",
    "contrastive_loss",
    "gather_with_grad",
    "load_clip_image_encoder",
    "pool_token_features",
    "symmetric_contrastive_loss",
]

logger = logging.getLogger(__name__)

DEFAULT_CBA_TEMPERATURE = 0.05  # tau, paper 4.3
DEFAULT_CBA_WEIGHT = 0.01  # lambda, paper 5.1.1
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
CBA_PROJECTION_DIR = "cba_projection"


# ---------------------------------------------------------------------------------------- losses


def contrastive_loss(query: torch.Tensor, keys: torch.Tensor, tau: float = DEFAULT_CBA_TEMPERATURE) -> torch.Tensor:
    """Eq. 4 in one direction: ``mean_i -log softmax_j(sim(query_i, keys_j) / tau)[i]``.

    Row ``i`` of ``keys`` is the positive of ``query[i]``; every other row is a negative (in-batch
    negatives). ``sim`` is the cosine similarity. Computed in float32 whatever the input dtype.

    Args:
        query: ``(N, D)``.
        keys: ``(N, D)``.
        tau: temperature (> 0).
    """
    if query.ndim != 2 or keys.ndim != 2 or query.shape != keys.shape:
        raise ValueError(f"query and keys must both be (N, D), got {tuple(query.shape)} and {tuple(keys.shape)}")
    if tau <= 0:
        raise ValueError(f"the temperature tau must be > 0, got {tau}")
    query = F.normalize(query.float(), dim=-1)
    keys = F.normalize(keys.float(), dim=-1)
    logits = query @ keys.t() / tau
    targets = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logits, targets)


def symmetric_contrastive_loss(a: torch.Tensor, b: torch.Tensor, tau: float = DEFAULT_CBA_TEMPERATURE) -> torch.Tensor:
    """``L'cl(a, b) = (L_cl(a, b) + L_cl(b, a)) / 2`` (paper 4.3)."""
    return 0.5 * (contrastive_loss(a, b, tau) + contrastive_loss(b, a, tau))


@dataclass
class CBALoss:
    """The two symmetrised contrastive terms of eq. 5 (``total`` is their sum, before lambda)."""

    background: torch.Tensor  # L'cl(b, B)
    sentence: torch.Tensor  # L'cl(P, I)

    @property
    def total(self) -> torch.Tensor:
        return self.background + self.sentence


def cba_loss(
    text_bg: torch.Tensor,
    image_bg: torch.Tensor,
    text_eos: torch.Tensor,
    image_full: torch.Tensor,
    tau: float = DEFAULT_CBA_TEMPERATURE,
) -> CBALoss:
    """Both contrastive terms of CBA.

    Args:
        text_bg: ``r_b``, projected text features at the ``<background>`` token, ``(N, D)``.
        image_bg: ``r_B``, CLIP image embeddings of the background images, ``(N, D)``.
        text_eos: projected text features at the ``<eos>`` token (sentence feature), ``(N, D)``.
        image_full: ``r_I``, CLIP image embeddings of the full target images, ``(N, D)``.
        tau: temperature.
    """
    return CBALoss(
        background=symmetric_contrastive_loss(text_bg, image_bg, tau),
        sentence=symmetric_contrastive_loss(text_eos, image_full, tau),
    )


contrastive_background_loss = cba_loss


def pool_token_features(hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden_states[i, positions[i]]`` for each row: ``(N, L, H)`` and ``(N,)`` -> ``(N, H)``."""
    rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    return hidden_states[rows, positions.to(hidden_states.device)]


# ------------------------------------------------------------------------------- distribution


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` along dim 0 across processes; only the local slice keeps its gradient.

    Identity with one process (or without an initialised process group). Every process must pass
    a tensor of the same shape. The result is ordered by process rank, so with equal per-process
    batches row ``r * n + i`` is sample ``i`` of process ``r``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x.detach().contiguous())
    gathered[dist.get_rank()] = x
    return torch.cat(gathered, dim=0)


# -------------------------------------------------------------------------------- projection


class TextToImageProjection(ModelMixin, ConfigMixin):
    """A linear map from the text encoder's hidden size to the CLIP image-embedding size.

    Shared by the ``<background>`` and ``<eos>`` features (one text space, one image space). Saved
    with safetensors next to the pipeline (``cba_projection/``); load it back with
    ``TextToImageProjection.from_pretrained(path / "cba_projection")``.
    """

    @register_to_config
    def __init__(self, text_hidden_size: int, image_embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(text_hidden_size, image_embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=text_hidden_size**-0.5)

    def forward(self, text_features: torch.Tensor) -> torch.Tensor:
        return self.proj(text_features.to(self.proj.weight.dtype))

    @classmethod
    def from_text_projection(
        cls, text_projection: torch.Tensor | nn.Linear | None, text_hidden_size: int, image_embed_dim: int
    ) -> TextToImageProjection:
        """Initialise from a CLIP model's ``text_projection`` when the shapes fit, else randomly.

        ``text_projection`` is the ``(image_embed_dim, text_hidden_size)`` weight (or the Linear) of
        the CLIP model whose image tower embeds the images.
        """
        projection = cls(text_hidden_size, image_embed_dim)
        weight = text_projection.weight if isinstance(text_projection, nn.Linear) else text_projection
        if weight is not None and tuple(weight.shape) == (image_embed_dim, text_hidden_size):
            with torch.no_grad():
                projection.proj.weight.copy_(weight.detach().to(projection.proj.weight))
        else:
            got = None if weight is None else tuple(weight.shape)
            logger.warning(
                "CBA projection: the CLIP text_projection (%s) does not map the text encoder's hidden size %d to "
                "the image embedding size %d; starting from a random projection instead",
                got, text_hidden_size, image_embed_dim,
            )
        return projection


# ------------------------------------------------------------------------------- image side


def load_clip_image_encoder(name_or_path: str = DEFAULT_CLIP_MODEL, **kwargs):
    """Load the frozen CLIP model of the CBA image side: ``(model, image_processor, text_projection)``.

    The text tower is dropped to save memory; its ``text_projection`` weight is returned to
    initialise :class:`TextToImageProjection`. ``kwargs`` go to ``CLIPModel.from_pretrained``.
    """
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(name_or_path, **kwargs)
    text_projection = model.text_projection.weight.detach().clone()
    model.text_model = None
    model.text_projection = None
    model.requires_grad_(False).eval()
    processor = CLIPImageProcessor.from_pretrained(name_or_path)
    return model, processor, text_projection


def clip_image_embeddings(clip_model, processor, images) -> torch.Tensor:
    """CLIP image embeddings (after the visual projection, not normalised): ``(N, projection_dim)``.

    Args:
        clip_model: a ``CLIPModel`` or ``CLIPVisionModelWithProjection`` (anything with
            ``vision_model`` and ``visual_projection``).
        processor: a CLIP image processor, or ``None`` if ``images`` are already pixel values.
        images: PIL images (with a processor) or a ``(N, 3, S, S)`` pixel-value tensor.
    """
    if processor is not None and not torch.is_tensor(images):
        images = processor(images=list(images), return_tensors="pt").pixel_values
    param = next(clip_model.parameters())
    pixel_values = images.to(device=param.device, dtype=param.dtype)
    pooled = clip_model.vision_model(pixel_values=pixel_values).pooler_output
    return clip_model.visual_projection(pooled)
