"""Product2ImgPipeline: a product cutout and its name in, an e-commerce product photo out.

Product2Img (ACM MM 2024) is SD-Inpainting fine-tuned to generate the background around a product
from the product name alone: the text is ``"{product name} <background>"``, where ``<background>``
is a learned token (paper 4.3). No prompt is written by the user.

This file reads top to bottom like diffusers' own inpainting pipeline: inputs are checked, the
name is encoded, the product and its mask are prepared, the 9-channel UNet denoises
``cat([latents, mask, masked_image_latents])`` with classifier-free guidance, the VAE decodes, and
the original product pixels are composited back so the product is never altered.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from .background_token import (
    DEFAULT_BACKGROUND_TOKEN,
    LEARNED_EMBEDS_NAME,
    add_background_token,
    background_token_id,
    check_product_names,
    save_learned_embeds,
    tokenize_product_names,
)
from .placement import (
    composite_product,
    inpainting_condition,
    product_mask_from_alpha,
    to_product_mask,
    to_rgb,
)

DEFAULT_INPAINTING_MODEL = "stable-diffusion-v1-5/stable-diffusion-inpainting"

# Written at the root of every saved pipeline so that
# DiffusionPipeline.from_pretrained(path, custom_pipeline=path, trust_remote_code=True) finds the class.
REMOTE_PIPELINE_FILE = '''"""Loads a Product2Img model with diffusers' generic loader.

    pip install diffusers-product2img
    DiffusionPipeline.from_pretrained(repo, custom_pipeline=repo, trust_remote_code=True)
"""
from diffusers_product2img.pipeline_product2img import Product2ImgPipeline  # noqa: F401
'''

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from PIL import Image
        >>> from diffusers_product2img import Product2ImgPipeline

        >>> pipe = Product2ImgPipeline.from_pretrained("path/or/repo").to("cuda")
        >>> cutout = Image.open("mug.png")  # RGBA: the alpha channel says what the product is
        >>> image = pipe("Ceramic Coffee Mug 350ml Matte Black", cutout).images[0]
        ```
"""


@dataclass
class Product2ImgPipelineOutput(BaseOutput):
    """Output of :class:`Product2ImgPipeline`.

    Args:
        images: list of PIL images, a numpy array ``(B, H, W, 3)``, a tensor ``(B, 3, H, W)`` in
            ``[0, 1]``, or latents, depending on ``output_type``.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class Product2ImgPipeline(
    DiffusionPipeline, StableDiffusionMixin, TextualInversionLoaderMixin, StableDiffusionLoraLoaderMixin
):
    r"""Generate the background of a product photo from a product cutout and the product name.

    Components are the stock classes of SD-Inpainting: ``vae`` (:class:`AutoencoderKL`),
    ``text_encoder`` (:class:`CLIPTextModel`), ``tokenizer`` (:class:`CLIPTokenizer`, holding the
    background token), ``unet`` (:class:`UNet2DConditionModel` with 9 input channels) and a
    ``scheduler`` (Euler Ancestral by default, as in the paper).

    Args:
        background_token: the learned token appended to every product name (saved in the config).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components: list[str] = []
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        background_token: str = DEFAULT_BACKGROUND_TOKEN,
    ):
        super().__init__()
        if unet.config.in_channels != 9:
            raise ValueError(
                f"Product2Img needs an inpainting UNet with 9 input channels (latents 4 + mask 1 + masked image 4), "
                f"got {unet.config.in_channels}"
            )
        background_token_id(tokenizer, background_token)  # a clear error for a non-Product2Img folder
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.register_to_config(background_token=background_token)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ construction and saving

    @classmethod
    def from_components(
        cls,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler=None,
        background_token: str = DEFAULT_BACKGROUND_TOKEN,
        initializer_word: str = "background",
    ) -> Product2ImgPipeline:
        """Build from SD-Inpainting components, adding the background token (initialised from a word).

        The scheduler is replaced by Euler Ancestral with the same noise schedule (paper 5.1.1).
        """
        add_background_token(tokenizer, text_encoder, background_token, initializer_word)
        scheduler = EulerAncestralDiscreteScheduler.from_config(scheduler.config) if scheduler else None
        if scheduler is None:
            scheduler = EulerAncestralDiscreteScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
            )
        return cls(vae, text_encoder, tokenizer, unet, scheduler, background_token=background_token)

    @classmethod
    def from_inpainting(
        cls,
        pretrained_model_name_or_path: str | os.PathLike = DEFAULT_INPAINTING_MODEL,
        background_token: str = DEFAULT_BACKGROUND_TOKEN,
        initializer_word: str = "background",
        **kwargs: Any,
    ) -> Product2ImgPipeline:
        """Start a Product2Img model from any SD-Inpainting checkpoint (Hub id or local folder).

        ``kwargs`` go to ``StableDiffusionInpaintPipeline.from_pretrained`` (``torch_dtype``,
        ``revision``, ``variant``, ``token``, ...). The safety checker is not loaded.
        """
        base = StableDiffusionInpaintPipeline.from_pretrained(
            pretrained_model_name_or_path, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **kwargs,
        )
        return cls.from_components(
            base.vae, base.text_encoder, base.tokenizer, base.unet, base.scheduler,
            background_token=background_token, initializer_word=initializer_word,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Save as safetensors, plus ``learned_embeds.safetensors`` and a root ``pipeline.py``.

        The folder is written to a temporary sibling and moved into place, so a crash never leaves
        a half-written model. ``push_to_hub=True`` uploads the folder (``repo_id``, ``token``,
        ``private``, ``commit_message`` and ``revision`` are honoured).
        """
        kwargs.pop("safe_serialization", None)
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message", "revision", "create_pr") if k in kwargs}
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            super().save_pretrained(tmp, safe_serialization=True, push_to_hub=False, **kwargs)
            save_learned_embeds(tmp / LEARNED_EMBEDS_NAME, self.tokenizer, self.text_encoder, self.config.background_token)
            (tmp / "pipeline.py").write_text(REMOTE_PIPELINE_FILE, encoding="utf-8")
            if target.exists():
                # Keep files others put there (a model card, checkpoints) but replace ours.
                for item in tmp.iterdir():
                    dest = target / item.name
                    if dest.is_dir():
                        shutil.rmtree(dest)
                    os.replace(item, dest)
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=hub_kwargs.get("token"))
            repo_id = hub_kwargs.get("repo_id") or target.name
            api.create_repo(repo_id, private=hub_kwargs.get("private"), exist_ok=True)
            revision = hub_kwargs.get("revision")
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id, folder_path=target, revision=revision,
                commit_message=hub_kwargs.get("commit_message", "Upload Product2ImgPipeline"),
                create_pr=hub_kwargs.get("create_pr", False),
            )

    # ------------------------------------------------------------------ properties

    @property
    def background_token(self) -> str:
        return self.config.background_token

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------ steps of __call__

    def encode_product_names(
        self,
        product_names: list[str],
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text-encoder hidden states of ``"{name} <background>"`` (and of the unconditional text).

        The unconditional text is empty (``""``) unless ``negative_prompt`` is given, as in
        SD-Inpainting. Embeddings are repeated ``num_images_per_prompt`` times, product by product.
        """
        dtype = self.text_encoder.dtype
        if prompt_embeds is None:
            names = [self.maybe_convert_prompt(name, self.tokenizer) for name in product_names]
            ids = tokenize_product_names(self.tokenizer, names, self.background_token).input_ids
            prompt_embeds = self.text_encoder(ids.to(device))[0]
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        batch_size = prompt_embeds.shape[0]
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative = negative_prompt if negative_prompt is not None else ""
            negative = [negative] * batch_size if isinstance(negative, str) else list(negative)
            if len(negative) != batch_size:
                raise ValueError(f"got {len(negative)} negative prompts for {batch_size} products")
            negative = [self.maybe_convert_prompt(text, self.tokenizer) for text in negative]
            neg_ids = self.tokenizer(
                negative, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids
            negative_prompt_embeds = self.text_encoder(neg_ids.to(device))[0]
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    def prepare_product(
        self,
        image: PIL.Image.Image,
        product_mask: PIL.Image.Image | np.ndarray | None,
        height: int,
        width: int,
        index: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The product canvas and its product mask as float arrays ``(H, W, 3)``, ``(H, W, 1)`` in [0, 1].

        An input of another size or aspect ratio is scaled to fit the target canvas and centred;
        the padding is background (to be generated), so the product is never stretched.
        """
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(f"image #{index} must be a PIL image, got {type(image).__name__}")
        if product_mask is None:
            try:
                mask = product_mask_from_alpha(image)
            except ValueError as err:
                raise ValueError(f"image #{index}: {err}") from None
        else:
            mask = to_product_mask(product_mask, name=f"product_mask #{index}")
            if mask.size != image.size:
                raise ValueError(
                    f"image #{index} is {image.size[0]}x{image.size[1]} but its product mask is "
                    f"{mask.size[0]}x{mask.size[1]}: they must be the same size"
                )
        rgb = to_rgb(image, name=f"image #{index}")
        mask_arr = np.asarray(mask)
        if mask_arr.max() == 0:
            raise ValueError(f"image #{index}: the product mask is empty, there is no product to keep")
        if mask_arr.min() == 255:
            raise ValueError(
                f"image #{index}: the product mask covers the whole image, there is no background to generate"
            )
        if rgb.size != (width, height):
            scale = min(width / rgb.width, height / rgb.height)
            new_size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
            offset = ((width - new_size[0]) // 2, (height - new_size[1]) // 2)
            canvas = PIL.Image.new("RGB", (width, height), (255, 255, 255))
            canvas.paste(rgb.resize(new_size, PIL.Image.Resampling.LANCZOS), offset)
            mask_canvas = PIL.Image.new("L", (width, height), 0)
            mask_canvas.paste(mask.resize(new_size, PIL.Image.Resampling.LANCZOS), offset)
            rgb, mask = canvas, mask_canvas
        return (
            np.asarray(rgb, dtype=np.float32) / 255.0,
            np.asarray(mask, dtype=np.float32)[..., None] / 255.0,
        )

    def check_inputs(self, product_names, images, product_masks, height, width, prompt_embeds,
                     callback_on_step_end_tensor_inputs, output_type="pil") -> None:
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if height % 8 != 0 or width % 8 != 0:
            raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
        if prompt_embeds is None and len(product_names) != len(images):
            raise ValueError(f"got {len(product_names)} product names for {len(images)} images: give one name per image")
        if prompt_embeds is not None and prompt_embeds.shape[0] != len(images):
            raise ValueError(f"got prompt_embeds for {prompt_embeds.shape[0]} products but {len(images)} images")
        if product_masks is not None and len(product_masks) != len(images):
            raise ValueError(f"got {len(product_masks)} product masks for {len(images)} images")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}")

    def prepare_latents(self, shape, dtype, device, generator, latents=None) -> torch.Tensor:
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for {shape[0]} images (products x num_images_per_prompt)")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif latents.shape != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def encode_masked_image(self, masked_image: torch.Tensor) -> torch.Tensor:
        # The distribution's mode, not a sample: conditioning on the product should not be noisy.
        latents = self.vae.encode(masked_image).latent_dist.mode()
        return latents * self.vae.config.scaling_factor

    # ------------------------------------------------------------------ __call__

    @torch.no_grad()
    def __call__(
        self,
        product_name: str | list[str] | None = None,
        image: PIL.Image.Image | list[PIL.Image.Image] | None = None,
        product_mask: PIL.Image.Image | np.ndarray | list | None = None,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        keep_product_pixels: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> Product2ImgPipelineOutput | tuple:
        r"""Generate product photos.

        Args:
            product_name: the product name, or one name per image. ``"<background>"`` is appended
                automatically; names longer than the tokenizer allows are cut before it.
            image: the product: an RGBA cutout (the alpha channel is the product mask), or an RGB
                (any mode) image together with ``product_mask``. One image or a list. Any size and
                aspect ratio; it is scaled to fit ``width x height`` without stretching. Use
                :func:`diffusers_product2img.place_cutout` to frame a small cutout first.
            product_mask: white (255 / 1.0) where the product is and must be kept, black where the
                background is generated. Note this is the *inverse* of diffusers' ``mask_image``.
            height, width: output size, multiples of 8 (default 512x512).
            num_inference_steps: denoising steps (default 30, as in the paper).
            guidance_scale: classifier-free guidance scale; ``<= 1`` disables guidance.
            negative_prompt: text for the unconditional branch (default: the empty text).
            num_images_per_prompt: images per product.
            generator: a ``torch.Generator`` or one per output image, for reproducibility.
            latents: initial noise latents ``(B * num_images_per_prompt, 4, H/8, W/8)``.
            prompt_embeds / negative_prompt_embeds: precomputed text-encoder states, instead of names.
            keep_product_pixels: paste the original product pixels back after decoding (default
                True), so the product is pixel-for-pixel unchanged; the cutout's soft edge blends.
            output_type: ``"pil"``, ``"np"`` (``(B, H, W, 3)`` in [0, 1]), ``"pt"`` (``(B, 3, H, W)``
                in [0, 1]) or ``"latent"``.
            return_dict: return a :class:`Product2ImgPipelineOutput` instead of a tuple.
            callback_on_step_end: called as ``fn(pipe, step, timestep, callback_kwargs)`` after each
                step; may return replacements for the tensors named in
                ``callback_on_step_end_tensor_inputs`` (default ``["latents"]``).

        Returns:
            :class:`Product2ImgPipelineOutput` or ``(images,)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # 1. Check inputs
        if image is None:
            raise ValueError("image is required: an RGBA product cutout, or an RGB image with product_mask")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ValueError("image is an empty list")
        if product_mask is None:
            masks = None
        else:
            masks = list(product_mask) if isinstance(product_mask, (list, tuple)) else [product_mask]
        if prompt_embeds is None:
            if product_name is None:
                raise ValueError("product_name is required (or pass prompt_embeds)")
            names = check_product_names(product_name)
        else:
            names = []
        self.check_inputs(
            names, images, masks, height, width, prompt_embeds, callback_on_step_end_tensor_inputs, output_type
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False
        batch_size = len(images)
        total = batch_size * num_images_per_prompt
        device = self._execution_device

        # 2. Encode "{name} <background>"
        prompt_embeds, negative_prompt_embeds = self.encode_product_names(
            names, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
            prompt_embeds, negative_prompt_embeds,
        )
        if self.do_classifier_free_guidance:
            unet_text = torch.cat([negative_prompt_embeds, prompt_embeds])
        else:
            unet_text = prompt_embeds

        # 3. The product canvases and masks (all checks happen before any model runs)
        prepared = [
            self.prepare_product(img, None if masks is None else masks[i], height, width, index=i)
            for i, img in enumerate(images)
        ]
        original = torch.from_numpy(np.stack([p[0] for p in prepared])).permute(0, 3, 1, 2)  # (B, 3, H, W)
        product_mask_t = torch.from_numpy(np.stack([p[1] for p in prepared])).permute(0, 3, 1, 2)  # (B, 1, H, W)

        # 4. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 5. Conditioning: inpainting mask (1 = generate) and the latents of the product-only image
        dtype = unet_text.dtype
        inpaint_mask, masked_image = inpainting_condition(original * 2.0 - 1.0, product_mask_t)
        masked_image_latents = self.encode_masked_image(masked_image.to(device=device, dtype=self.vae.dtype))
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        mask = F.interpolate(inpaint_mask, size=latent_size).to(device=device, dtype=dtype)
        mask = mask.repeat_interleave(num_images_per_prompt, dim=0)
        masked_image_latents = masked_image_latents.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)

        # 6. Initial noise
        num_channels_latents = self.vae.config.latent_channels
        latents = self.prepare_latents((total, num_channels_latents, *latent_size), dtype, device, generator, latents)

        # 7. Denoising loop
        def image_condition(mask, masked_image_latents):
            cond = torch.cat([mask, masked_image_latents], dim=1)
            return torch.cat([cond] * 2) if self.do_classifier_free_guidance else cond

        cond = image_condition(mask, masked_image_latents)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(
                    torch.cat([model_input, cond], dim=1), t, encoder_hidden_states=unet_text, return_dict=False
                )[0]
                if self.do_classifier_free_guidance:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, generator=generator, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {
                        "latents": latents, "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds, "mask": mask,
                        "masked_image_latents": masked_image_latents,
                    }
                    callback_kwargs = {k: callback_kwargs[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                    if "mask" in outputs or "masked_image_latents" in outputs:
                        mask = outputs.pop("mask", mask)
                        masked_image_latents = outputs.pop("masked_image_latents", masked_image_latents)
                        cond = image_condition(mask, masked_image_latents)
                    if "prompt_embeds" in outputs or "negative_prompt_embeds" in outputs:
                        prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                        unet_text = (
                            torch.cat([negative_prompt_embeds, prompt_embeds])
                            if self.do_classifier_free_guidance else prompt_embeds
                        )
                progress_bar.update()

        if output_type == "latent":
            self.maybe_free_model_hooks()
            return Product2ImgPipelineOutput(images=latents) if return_dict else (latents,)

        # 8. Decode, then put the original product pixels back
        decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        result = (decoded.float().cpu() / 2 + 0.5).clamp(0, 1)
        if keep_product_pixels:
            keep = product_mask_t.repeat_interleave(num_images_per_prompt, dim=0)
            result = composite_product(result, original.repeat_interleave(num_images_per_prompt, dim=0), keep)
        self.maybe_free_model_hooks()

        if output_type == "pt":
            images_out = result
        else:
            images_out = result.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images_out = [PIL.Image.fromarray(im) for im in (images_out * 255.0).round().astype(np.uint8)]
        return Product2ImgPipelineOutput(images=images_out) if return_dict else (images_out,)
