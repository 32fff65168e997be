"""One training step of Product2Img: the inpainting loss (eq. 3) plus CBA (eq. 4-5).

:func:`encode_frozen_features` is the single place that runs the frozen models (VAE, CLIP image
encoder) on a batch; the feature cache stores exactly its output, so training from the cache and
training from images compute the same step. :func:`training_step` takes either.

All randomness of a step (timestep, noise, the VAE latent sample) is drawn per sample from a
generator seeded by ``(seed, position)``, the sample's position in the training stream
(:mod:`.sampler`): a run is reproducible from its seed alone, resumes exactly from a checkpoint,
and gives the same samples the same noise whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..cba import (
    DEFAULT_CBA_TEMPERATURE,
    DEFAULT_CBA_WEIGHT,
    cba_loss,
    clip_image_embeddings,
    gather_with_grad,
    pool_token_features,
)

__all__ = [
    "CBAConfig",
    "FROZEN_FEATURES",
    "StepOutput",
    "encode_frozen_features",
    "per_sample_randomness",
    "training_step",
]

# What the frozen models give for one example (unscaled VAE space; CLIP embeddings not normalised).
FROZEN_FEATURES = ("latent_mean", "latent_std", "masked_latents", "mask", "clip_background", "clip_image")


@dataclass
class CBAConfig:
    """Contrastive Background Alignment settings (paper defaults)."""

    enabled: bool = True
    weight: float = DEFAULT_CBA_WEIGHT  # lambda
    temperature: float = DEFAULT_CBA_TEMPERATURE  # tau
    gather: bool = True  # negatives from the global batch (all processes)


@dataclass
class StepOutput:
    loss: torch.Tensor  # what to backpropagate
    inpaint: torch.Tensor
    cba_background: torch.Tensor | None = None
    cba_sentence: torch.Tensor | None = None
    cba_batch_size: int = 0  # rows the contrastive loss saw (the global batch when gathering)
    cba_weight: float = 0.0

    @property
    def total(self) -> float:
        """The value of eq. 5 (whatever scaling the backward pass needs)."""
        value = self.inpaint.item()
        if self.cba_background is not None:
            value += self.cba_weight * (self.cba_background.item() + self.cba_sentence.item())
        return value

    def logs(self) -> dict[str, float]:
        logs = {"loss": self.total, "loss_inpaint": self.inpaint.item()}
        if self.cba_background is not None:
            logs.update(
                loss_cba_background=self.cba_background.item(),
                loss_cba_sentence=self.cba_sentence.item(),
                cba_batch_size=float(self.cba_batch_size),
            )
        return logs


def _sample_seed(seed: int, position: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(position)]).generate_state(1, np.uint64)[0] >> 1)


def per_sample_randomness(
    seed: int, positions, latent_shape: tuple[int, ...], num_train_timesteps: int
) -> tuple[torch.LongTensor, torch.Tensor, torch.Tensor]:
    """``(timesteps, noise, latent_eps)`` for a batch, each row from its own ``(seed, position)``.

    Drawn on the CPU in float32 (device-independent); move them to the training device.
    """
    timesteps, noise, eps = [], [], []
    for position in positions.tolist() if torch.is_tensor(positions) else positions:
        g = torch.Generator().manual_seed(_sample_seed(seed, position))
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
        noise.append(torch.randn(latent_shape, generator=g))
        eps.append(torch.randn(latent_shape, generator=g))
    return torch.cat(timesteps), torch.stack(noise), torch.stack(eps)


@torch.no_grad()
def encode_frozen_features(batch: dict, vae, clip_model=None, dtype: torch.dtype | None = None) -> dict:
    """Run the frozen models on a collated batch (see :class:`~.collate.Product2ImgCollator`).

    Returns float32 tensors (on the VAE's device): ``latent_mean``/``latent_std`` of the target
    image's latent distribution, ``masked_latents`` (the mode of the product-only image's latent,
    what the pipeline conditions on), ``mask`` (the inpainting mask at latent size, 1 = generate),
    and with a CLIP model ``clip_background`` (r_B) and ``clip_image`` (r_I).
    """
    param = next(vae.parameters())
    dtype = dtype or param.dtype
    pixels = batch["pixel_values"].to(param.device, dtype)
    masked = batch["masked_pixel_values"].to(param.device, dtype)
    dist_ = vae.encode(pixels).latent_dist
    out = {
        "latent_mean": dist_.mean.float(),
        "latent_std": dist_.std.float(),
        "masked_latents": vae.encode(masked).latent_dist.mode().float(),
    }
    # Same as the pipeline: the mask resized to the latent grid (nearest).
    out["mask"] = F.interpolate(batch["inpaint_mask"].to(param.device, torch.float32), size=out["latent_mean"].shape[-2:])
    if clip_model is not None:
        clip_dtype = next(clip_model.parameters()).dtype
        out["clip_background"] = clip_image_embeddings(
            clip_model, None, batch["clip_background_pixel_values"].to(clip_dtype)
        ).float()
        out["clip_image"] = clip_image_embeddings(clip_model, None, batch["clip_image_pixel_values"].to(clip_dtype)).float()
    return out


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def training_step(
    batch: dict,
    *,
    unet,
    text_encoder,
    noise_scheduler,
    vae_scaling_factor: float,
    seed: int,
    projection=None,
    vae=None,
    clip_model=None,
    cba: CBAConfig | None = None,
    weight_dtype: torch.dtype = torch.float32,
) -> StepOutput:
    """Forward pass of one (micro-)batch; returns the losses (call ``backward`` on ``.loss``).

    ``batch`` holds the token ids/positions and ``positions`` (stream positions), plus either the
    frozen features (from the cache, keys :data:`FROZEN_FEATURES`) or the pixels to compute them
    from (then ``vae`` and, with CBA, ``clip_model`` are needed).

    With several processes and ``cba.gather``, every process computes the same global contrastive
    loss but only its own slice carries gradient; DDP averages gradients over processes, so the
    contrastive term is multiplied by the number of processes for ``backward`` (the logged values
    are unscaled). The sum over processes of each slice's gradient is then the exact gradient of
    the global-batch loss.
    """
    cba = cba or CBAConfig(enabled=False)
    if "latent_mean" in batch:
        features = batch
    else:
        if vae is None or (cba.enabled and clip_model is None):
            raise ValueError("this batch has no cached features: pass the VAE (and the CLIP model for CBA)")
        features = encode_frozen_features(batch, vae, clip_model if cba.enabled else None, weight_dtype)
    device = batch["input_ids"].device

    mean = features["latent_mean"].to(device, torch.float32)
    std = features["latent_std"].to(device, torch.float32)
    timesteps, noise, eps = per_sample_randomness(
        seed, batch["positions"], tuple(mean.shape[1:]), noise_scheduler.config.num_train_timesteps
    )
    timesteps, noise, eps = timesteps.to(device), noise.to(device), eps.to(device)
    latents = (mean + std * eps) * vae_scaling_factor
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {noise_scheduler.config.prediction_type!r}")
    masked_latents = features["masked_latents"].to(device, torch.float32) * vae_scaling_factor
    mask = features["mask"].to(device, torch.float32)
    model_input = torch.cat([noisy_latents, mask, masked_latents], dim=1).to(weight_dtype)

    # "P <background>": the UNet's condition and, pooled at two positions, the CBA text features.
    hidden_states = text_encoder(batch["input_ids"])[0]
    model_pred = unet(model_input, timesteps, encoder_hidden_states=hidden_states.to(weight_dtype), return_dict=False)[0]
    inpaint = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    if not cba.enabled:
        return StepOutput(loss=inpaint, inpaint=inpaint)

    if projection is None:
        raise ValueError("CBA needs the text-to-image projection")
    text_bg = projection(pool_token_features(hidden_states, batch["background_positions"]))
    text_eos = projection(pool_token_features(hidden_states, batch["eos_positions"]))
    image_bg = features["clip_background"].to(device, torch.float32)
    image_full = features["clip_image"].to(device, torch.float32)
    scale = 1
    if cba.gather and _world_size() > 1:
        text_bg, text_eos = gather_with_grad(text_bg), gather_with_grad(text_eos)
        image_bg, image_full = gather_with_grad(image_bg), gather_with_grad(image_full)
        scale = _world_size()
    terms = cba_loss(text_bg, image_bg, text_eos, image_full, cba.temperature)
    loss = inpaint + cba.weight * scale * terms.total
    return StepOutput(
        loss=loss, inpaint=inpaint, cba_background=terms.background, cba_sentence=terms.sentence,
        cba_batch_size=text_bg.shape[0], cba_weight=cba.weight,
    )
