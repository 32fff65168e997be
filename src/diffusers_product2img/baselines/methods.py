"""The methods of the paper's Table 1 behind one small interface, each a thin adapter over a stock pipeline.

Every method answers :meth:`BackgroundMethod.generate` with the same inputs: product names, product
canvases (RGB, already ``width x height``) and product masks (L, 255 = product, the convention of
:mod:`diffusers_product2img.placement`), plus the sampling settings and one seed per image. So a
benchmark can give every method the same products, the same noise and the same sampler.

==========================  ==========================================================  ==================
method                      pipeline                                                    text it reads
==========================  ==========================================================  ==================
``sd-inpainting``           ``StableDiffusionInpaintPipeline``                          uniform template
``controlnet-canny``        ``StableDiffusionControlNetInpaintPipeline`` + canny        uniform template
                            ControlNet, control image = edges of the product canvas
``ip-adapter``              ``StableDiffusionInpaintPipeline`` + IP-Adapter, image       uniform template
                            prompt = the product on white
``epbd-ft``                 a fine-tuned checkpoint: a Product2Img folder runs           product name (P2I
                            through ``Product2ImgPipeline``, an SD-Inpainting folder     folder) / template
                            through ``StableDiffusionInpaintPipeline``                   (SD folder)
``product2img``             ``Product2ImgPipeline``                                     product name only
==========================  ==========================================================  ==================

The uniform template is the paper's (5.1.2): ``"{Product Name}, high-quality and appropriate
background"``. Choices made here, for a fair comparison:

* **Same sampler.** Every SD-family method runs Euler Ancestral built from its own checkpoint's noise
  schedule, as Product2Img does (paper 5.1.1), with the same steps and guidance scale
  (``euler_ancestral=False`` keeps a checkpoint's own scheduler).
* **Same noise.** Image ``i`` uses ``torch.Generator("cpu").manual_seed(seeds[i])`` for every method,
  so all methods start from the same initial latents for the same product.
* **Same inputs.** The product canvas is the product on white (no real background leaks in); the
  inpainting mask handed to diffusers is the complement of the product mask, binarised at 0.5 exactly
  as ``Product2ImgPipeline`` does.
* **Product pasted back: on by default** (``paste_product=True``). Product2Img composites the original
  product pixels over its output with :func:`~diffusers_product2img.placement.composite_product`;
  a stock inpainting pipeline returns a VAE round-trip of the product instead (colour drift, blurred
  text). Pasting for every method means the table compares *backgrounds*, which is the task, and not
  a post-processing step that any baseline could add in one line. ``paste_product=False`` (CLI
  ``--no-paste-product``) turns it off for *all* methods, Product2Img included, to see raw outputs.
  Product expansion past the mask is still visible with pasting on (the metrics' ``Expansion``).

PowerPaint (also in Table 1) is not included: it is not a stock diffusers pipeline (it needs the
PowerPaint repository's BrushNet pipeline and its learned task prompts).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from ..background_token import check_product_names
from ..placement import composite_product, to_product_mask, to_rgb
from .canny import canny_control_image

__all__ = [
    "UNIFORM_PROMPT_TEMPLATE",
    "DEFAULT_INPAINTING_MODEL",
    "DEFAULT_CANNY_CONTROLNET",
    "DEFAULT_IP_ADAPTER",
    "DEFAULT_IP_ADAPTER_SUBFOLDER",
    "DEFAULT_IP_ADAPTER_WEIGHT",
    "BackgroundMethod",
    "SDInpaintingMethod",
    "ControlNetInpaintingCannyMethod",
    "IPAdapterMethod",
    "EPBDFTMethod",
    "Product2ImgMethod",
    "METHODS",
    "build_method",
    "checkpoint_class_name",
    "uniform_prompt",
    "inpainting_mask",
]

logger = logging.getLogger(__name__)

UNIFORM_PROMPT_TEMPLATE = "{product_name}, high-quality and appropriate background"
DEFAULT_INPAINTING_MODEL = "stable-diffusion-v1-5/stable-diffusion-inpainting"
DEFAULT_CANNY_CONTROLNET = "lllyasviel/control_v11p_sd15_canny"
DEFAULT_IP_ADAPTER = "h94/IP-Adapter"
DEFAULT_IP_ADAPTER_SUBFOLDER = "models"
DEFAULT_IP_ADAPTER_WEIGHT = "ip-adapter_sd15.safetensors"


def uniform_prompt(product_name: str, template: str = UNIFORM_PROMPT_TEMPLATE) -> str:
    """The paper's baseline prompt: ``"{Product Name}, high-quality and appropriate background"``."""
    return template.format(product_name=check_product_names(product_name)[0])


def inpainting_mask(product_mask: Image.Image) -> Image.Image:
    """diffusers' ``mask_image`` (white = generate) for a product mask (white = keep).

    Binarised at 0.5 with the rule of ``Product2ImgPipeline`` (generate where ``mask / 255 < 0.5``),
    so every method keeps exactly the same pixels.
    """
    return to_product_mask(product_mask).point(lambda v: 255 if v / 255.0 < 0.5 else 0)


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}") from None


def _seeds(seed: int | Sequence[int], n: int) -> list[int]:
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} images: give one seed per image, or one int")
    return seeds


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    # CPU generators: the same noise on any device (diffusers' randn_tensor draws on CPU, then moves).
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _check_inputs(product_names, images, product_masks, height, width, seed):
    names = check_product_names(list(product_names) if not isinstance(product_names, str) else product_names)
    images, product_masks = list(images), list(product_masks)
    if not (len(names) == len(images) == len(product_masks)):
        raise ValueError(
            f"got {len(names)} product names, {len(images)} images and {len(product_masks)} product masks: "
            "give one of each per product"
        )
    if height % 8 or width % 8:
        raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
    rgb, masks = [], []
    for i, (image, mask) in enumerate(zip(images, product_masks)):
        image = to_rgb(image, name=f"image #{i}")
        mask = to_product_mask(mask, name=f"product mask #{i}")
        if image.size != (width, height) or mask.size != (width, height):
            raise ValueError(
                f"image #{i} is {image.size[0]}x{image.size[1]} and its mask {mask.size[0]}x{mask.size[1]}, "
                f"but the benchmark size is {width}x{height}: prepare the canvases first "
                "(diffusers_product2img.data.preprocessing.prepare_example), so every method sees the same pixels"
            )
        extrema = mask.getextrema()
        if extrema[1] == 0:
            raise ValueError(f"product mask #{i} is empty: there is no product to keep")
        rgb.append(image)
        masks.append(mask)
    return names, rgb, masks, _seeds(seed, len(rgb))


def _paste_and_convert(generated: np.ndarray, images: list[Image.Image], masks: list[Image.Image],
                       paste_product: bool) -> list[Image.Image]:
    """Float ``(B, H, W, 3)`` outputs in [0, 1] -> PIL, with the product composited back if asked."""
    generated = np.clip(np.asarray(generated, dtype=np.float32), 0.0, 1.0)
    if paste_product:
        original = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
        keep = np.stack([np.asarray(m, dtype=np.float32) / 255.0 for m in masks])[..., None]
        generated = composite_product(generated, original, keep)
    return [Image.fromarray(a) for a in (generated * 255.0).round().astype(np.uint8)]


@runtime_checkable
class BackgroundMethod(Protocol):
    """What the benchmark needs from a method.

    Attributes:
        name: the registry key and output folder name (``sd-inpainting``, ...).
        display_name: the row name in the table (``SD-Inpainting``, ...).
    """

    name: str
    display_name: str

    def prompts(self, product_names: Sequence[str]) -> list[str]:
        """The text each product is conditioned on (recorded in the benchmark manifest)."""

    def generate(
        self,
        product_names: Sequence[str],
        images: Sequence[Image.Image],
        product_masks: Sequence[Image.Image],
        *,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        seed: int | Sequence[int] = 0,
    ) -> list[Image.Image]:
        """One ``width x height`` RGB image per product.

        ``images`` are RGB product canvases of exactly ``width x height``; ``product_masks`` are L
        masks (255 = product, kept). ``seed``: one int (image ``i`` gets ``seed + i``) or one per image.
        """

    def describe(self) -> dict:
        """Model ids and settings, for the manifest."""


# ------------------------------------------------------------------------------------------------
# SD-Inpainting family
# ------------------------------------------------------------------------------------------------


def _load_inpainting(pipeline_cls, model: str, dtype: torch.dtype, **kwargs):
    """A stock SD pipeline without the safety checker (it would blank some product photos)."""
    try:
        return pipeline_cls.from_pretrained(
            model, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            **kwargs,
        )
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load {pipeline_cls.__name__} from {model!r}: {str(err).splitlines()[0]}") from err


class _InpaintingMethod:
    """Shared code of the adapters over diffusers' SD inpainting pipelines."""

    name = "sd-inpainting"
    display_name = "SD-Inpainting"
    default_model: str | None = DEFAULT_INPAINTING_MODEL
    max_batch_size: int | None = None  # None: one pipeline call for the whole batch

    def __init__(self, pipe, *, paste_product: bool = True, prompt_template: str = UNIFORM_PROMPT_TEMPLATE,
                 euler_ancestral: bool = True, model_id: str | None = None):
        from diffusers import EulerAncestralDiscreteScheduler

        if "{product_name}" not in prompt_template:
            raise ValueError(f"prompt_template must contain {{product_name}}, got {prompt_template!r}")
        self.pipe = pipe
        self.paste_product = paste_product
        self.prompt_template = prompt_template
        self.model_id = model_id
        if euler_ancestral and not isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler):
            pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

    def prompts(self, product_names: Sequence[str]) -> list[str]:
        return [uniform_prompt(n, self.prompt_template) for n in check_product_names(list(product_names))]

    def describe(self) -> dict:
        return {
            "pipeline": type(self.pipe).__name__, "model": self.model_id, "prompt_template": self.prompt_template,
            "scheduler": type(self.pipe.scheduler).__name__, "paste_product": self.paste_product,
        }

    def _call_kwargs(self, images: list[Image.Image], masks: list[Image.Image]) -> dict[str, Any]:
        """Extra pipeline arguments for one call (the ControlNet image, the IP-Adapter image)."""
        return {}

    @torch.no_grad()
    def generate(self, product_names, images, product_masks, *, height=512, width=512, num_inference_steps=30,
                 guidance_scale=7.5, seed=0) -> list[Image.Image]:
        names, images, masks, seeds = _check_inputs(product_names, images, product_masks, height, width, seed)
        prompts = self.prompts(names)
        step = self.max_batch_size or len(images)
        outputs: list[np.ndarray] = []
        for start in range(0, len(images), step):
            sl = slice(start, start + step)
            result = self.pipe(
                prompt=prompts[sl],
                image=images[sl],
                mask_image=[inpainting_mask(m) for m in masks[sl]],
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=_generators(seeds[sl]),
                output_type="np",
                **self._call_kwargs(images[sl], masks[sl]),
            )
            outputs.append(result.images)
        return _paste_and_convert(np.concatenate(outputs), images, masks, self.paste_product)


class SDInpaintingMethod(_InpaintingMethod):
    """SD-Inpainting (paper [31]) with the uniform prompt template."""

    name = "sd-inpainting"
    display_name = "SD-Inpainting"

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_INPAINTING_MODEL, *, device: str = "cpu",
                        dtype: str | torch.dtype = "float32", paste_product: bool = True,
                        prompt_template: str = UNIFORM_PROMPT_TEMPLATE, euler_ancestral: bool = True,
                        **load_kwargs) -> SDInpaintingMethod:
        from diffusers import StableDiffusionInpaintPipeline

        pipe = _load_inpainting(StableDiffusionInpaintPipeline, model, _torch_dtype(dtype), **load_kwargs)
        return cls(pipe.to(device), paste_product=paste_product, prompt_template=prompt_template,
                   euler_ancestral=euler_ancestral, model_id=model)


class ControlNetInpaintingCannyMethod(_InpaintingMethod):
    """ControlNet-Inpainting with a canny ControlNet (paper [48]) on an SD-Inpainting base.

    The control image is the canny edge map of the product canvas (the product on white): it pins the
    product's outline and inner edges, which is why the paper adds it ("to prevent the model from
    altering product shapes"). The background has no edges to follow, so it is free.
    """

    name = "controlnet-canny"
    display_name = "ControlNet-Inpainting (canny)"

    def __init__(self, pipe, *, canny_low_threshold: float = 100, canny_high_threshold: float = 200,
                 controlnet_conditioning_scale: float = 1.0, controlnet_id: str | None = None, **kwargs):
        super().__init__(pipe, **kwargs)
        self.canny_low_threshold = canny_low_threshold
        self.canny_high_threshold = canny_high_threshold
        self.controlnet_conditioning_scale = float(controlnet_conditioning_scale)
        self.controlnet_id = controlnet_id

    def control_images(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        return [canny_control_image(im, self.canny_low_threshold, self.canny_high_threshold) for im in images]

    def _call_kwargs(self, images, masks):
        return {"control_image": self.control_images(images),
                "controlnet_conditioning_scale": self.controlnet_conditioning_scale}

    def describe(self) -> dict:
        return {**super().describe(), "controlnet": self.controlnet_id,
                "canny_thresholds": [self.canny_low_threshold, self.canny_high_threshold],
                "controlnet_conditioning_scale": self.controlnet_conditioning_scale}

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_INPAINTING_MODEL, *, controlnet_model: str = DEFAULT_CANNY_CONTROLNET,
                        device: str = "cpu", dtype: str | torch.dtype = "float32", paste_product: bool = True,
                        prompt_template: str = UNIFORM_PROMPT_TEMPLATE, euler_ancestral: bool = True,
                        canny_low_threshold: float = 100, canny_high_threshold: float = 200,
                        controlnet_conditioning_scale: float = 1.0, **load_kwargs) -> ControlNetInpaintingCannyMethod:
        from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline

        torch_dtype = _torch_dtype(dtype)
        try:
            controlnet = ControlNetModel.from_pretrained(controlnet_model, dtype=torch_dtype)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load a ControlNet from {controlnet_model!r}: {str(err).splitlines()[0]}") from err
        pipe = _load_inpainting(StableDiffusionControlNetInpaintPipeline, model, torch_dtype, controlnet=controlnet,
                                **load_kwargs)
        return cls(pipe.to(device), paste_product=paste_product, prompt_template=prompt_template,
                   euler_ancestral=euler_ancestral, model_id=model, canny_low_threshold=canny_low_threshold,
                   canny_high_threshold=canny_high_threshold,
                   controlnet_conditioning_scale=controlnet_conditioning_scale, controlnet_id=controlnet_model)


class IPAdapterMethod(_InpaintingMethod):
    """IP-Adapter (paper [45]) on an SD-Inpainting pipeline: product image as image prompt, template as text.

    The image prompt is the product canvas (product on white). ``ip_adapter_scale`` defaults to 0.5,
    the usual setting when a text prompt is given together with the image prompt (at 1.0 the text is
    mostly ignored). One pipeline call per product: diffusers applies an ``ip_adapter_image`` list to
    every prompt of a batch, not one image per prompt.
    """

    name = "ip-adapter"
    display_name = "IP-Adapter"
    max_batch_size = 1

    def __init__(self, pipe, *, ip_adapter_scale: float = 0.5, ip_adapter_id: str | None = None, **kwargs):
        super().__init__(pipe, **kwargs)
        if getattr(pipe.unet, "encoder_hid_proj", None) is None or getattr(pipe, "image_encoder", None) is None:
            raise ValueError("the pipeline has no IP-Adapter loaded: call pipe.load_ip_adapter(...) first")
        self.ip_adapter_scale = float(ip_adapter_scale)
        self.ip_adapter_id = ip_adapter_id
        pipe.set_ip_adapter_scale(self.ip_adapter_scale)

    def _call_kwargs(self, images, masks):
        return {"ip_adapter_image": images[0]}

    def describe(self) -> dict:
        return {**super().describe(), "ip_adapter": self.ip_adapter_id, "ip_adapter_scale": self.ip_adapter_scale,
                "image_prompt": "product canvas (product on white)"}

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_INPAINTING_MODEL, *, ip_adapter: str = DEFAULT_IP_ADAPTER,
                        ip_adapter_subfolder: str = DEFAULT_IP_ADAPTER_SUBFOLDER,
                        ip_adapter_weight: str = DEFAULT_IP_ADAPTER_WEIGHT, ip_adapter_scale: float = 0.5,
                        device: str = "cpu", dtype: str | torch.dtype = "float32", paste_product: bool = True,
                        prompt_template: str = UNIFORM_PROMPT_TEMPLATE, euler_ancestral: bool = True,
                        **load_kwargs) -> IPAdapterMethod:
        from diffusers import StableDiffusionInpaintPipeline

        pipe = _load_inpainting(StableDiffusionInpaintPipeline, model, _torch_dtype(dtype), **load_kwargs)
        try:
            # Loads the CLIP image encoder from <subfolder>/image_encoder and builds a matching processor.
            pipe.load_ip_adapter(ip_adapter, subfolder=ip_adapter_subfolder, weight_name=ip_adapter_weight)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(
                f"cannot load IP-Adapter {ip_adapter}/{ip_adapter_subfolder}/{ip_adapter_weight}: "
                f"{str(err).splitlines()[0]}"
            ) from err
        spec = f"{ip_adapter}/{ip_adapter_subfolder}/{ip_adapter_weight}".replace("//", "/")
        return cls(pipe.to(device), ip_adapter_scale=ip_adapter_scale, ip_adapter_id=spec,
                   paste_product=paste_product, prompt_template=prompt_template, euler_ancestral=euler_ancestral,
                   model_id=model)


# ------------------------------------------------------------------------------------------------
# Product2Img and EPBD-FT
# ------------------------------------------------------------------------------------------------


class Product2ImgMethod:
    """Product2Img: ``Product2ImgPipeline`` with the product name only (it appends ``<background>``).

    ``prompt_template`` defaults to ``"{product_name}"`` (no template); EPBD-FT may set another.
    """

    name = "product2img"
    display_name = "Product2Img"
    default_model: str | None = None

    def __init__(self, pipe, *, paste_product: bool = True, prompt_template: str = "{product_name}",
                 model_id: str | None = None):
        if "{product_name}" not in prompt_template:
            raise ValueError(f"prompt_template must contain {{product_name}}, got {prompt_template!r}")
        self.pipe = pipe
        self.paste_product = paste_product
        self.prompt_template = prompt_template
        self.model_id = model_id
        pipe.set_progress_bar_config(disable=True)

    def _names(self, product_names) -> list[str]:
        return [uniform_prompt(n, self.prompt_template) for n in check_product_names(list(product_names))]

    def prompts(self, product_names: Sequence[str]) -> list[str]:
        return [f"{n} {self.pipe.config.background_token}" for n in self._names(product_names)]

    def describe(self) -> dict:
        return {
            "pipeline": type(self.pipe).__name__, "model": self.model_id,
            "prompt_template": f"{self.prompt_template} {self.pipe.config.background_token}",
            "scheduler": type(self.pipe.scheduler).__name__, "paste_product": self.paste_product,
        }

    @torch.no_grad()
    def generate(self, product_names, images, product_masks, *, height=512, width=512, num_inference_steps=30,
                 guidance_scale=7.5, seed=0) -> list[Image.Image]:
        names, images, masks, seeds = _check_inputs(product_names, images, product_masks, height, width, seed)
        return self.pipe(
            self._names(names), images, masks, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            generator=_generators(seeds), keep_product_pixels=self.paste_product, output_type="pil",
        ).images

    @classmethod
    def from_pretrained(cls, model: str, *, device: str = "cpu", dtype: str | torch.dtype = "float32",
                        paste_product: bool = True, prompt_template: str = "{product_name}",
                        **load_kwargs) -> Product2ImgMethod:
        from ..pipeline_product2img import Product2ImgPipeline

        try:
            pipe = Product2ImgPipeline.from_pretrained(model, dtype=_torch_dtype(dtype), **load_kwargs)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load a Product2Img model from {model!r}: {str(err).splitlines()[0]}") from err
        return cls(pipe.to(device), paste_product=paste_product, prompt_template=prompt_template, model_id=model)


def checkpoint_class_name(model: str, **kwargs) -> str:
    """``_class_name`` of a pipeline folder or Hub repo's ``model_index.json``."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(model, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"{model!r} is not a diffusers pipeline folder or repo: {str(err).splitlines()[0]}") from err
    name = config.get("_class_name")
    return name[-1] if isinstance(name, (list, tuple)) else str(name)


class EPBDFTMethod:
    """EPBD-FT: SD-Inpainting fine-tuned on EPBD (paper 5.1.2), run the way it was trained.

    The checkpoint's format decides the pipeline and the text (``prompt="auto"``):

    * a **Product2Img folder** (``Product2ImgPipeline`` in ``model_index.json``; what this package's
      training writes, e.g. with CBA and IDR switched off) runs through ``Product2ImgPipeline`` with
      the product name, i.e. ``"{name} <background>"``, the text it was fine-tuned on;
    * an **SD-Inpainting folder** (``StableDiffusionInpaintPipeline``, e.g. a plain diffusers
      fine-tune) runs exactly like the SD-Inpainting baseline, with the uniform template.

    A model is prompted the way it was trained; the uniform template is for the off-the-shelf models,
    which were trained on captions. ``prompt="template"`` or ``"name"`` overrides the choice.
    """

    name = "epbd-ft"
    display_name = "EPBD-FT"
    default_model: str | None = None

    def __init__(self, inner: SDInpaintingMethod | Product2ImgMethod, checkpoint_format: str | None = None):
        self.inner = inner
        self.checkpoint_format = checkpoint_format or type(inner.pipe).__name__

    def prompts(self, product_names):
        return self.inner.prompts(product_names)

    def generate(self, product_names, images, product_masks, **kwargs):
        return self.inner.generate(product_names, images, product_masks, **kwargs)

    def describe(self) -> dict:
        return {**self.inner.describe(), "checkpoint_format": self.checkpoint_format}

    @classmethod
    def from_pretrained(cls, model: str, *, device: str = "cpu", dtype: str | torch.dtype = "float32",
                        paste_product: bool = True, prompt: str = "auto", euler_ancestral: bool = True,
                        **load_kwargs) -> EPBDFTMethod:
        if prompt not in ("auto", "template", "name"):
            raise ValueError(f"prompt must be 'auto', 'template' or 'name', got {prompt!r}")
        fmt = checkpoint_class_name(model)
        if fmt == "Product2ImgPipeline":
            template = UNIFORM_PROMPT_TEMPLATE if prompt == "template" else "{product_name}"
            inner = Product2ImgMethod.from_pretrained(model, device=device, dtype=dtype, paste_product=paste_product,
                                                      prompt_template=template, **load_kwargs)
        elif fmt == "StableDiffusionInpaintPipeline":
            template = "{product_name}" if prompt == "name" else UNIFORM_PROMPT_TEMPLATE
            inner = SDInpaintingMethod.from_pretrained(model, device=device, dtype=dtype, paste_product=paste_product,
                                                       prompt_template=template, euler_ancestral=euler_ancestral,
                                                       **load_kwargs)
        else:
            raise ValueError(
                f"EPBD-FT needs a Product2ImgPipeline or StableDiffusionInpaintPipeline checkpoint; {model!r} is a {fmt}"
            )
        return cls(inner, checkpoint_format=fmt)


METHODS: dict[str, type] = {
    cls.name: cls
    for cls in (SDInpaintingMethod, ControlNetInpaintingCannyMethod, IPAdapterMethod, EPBDFTMethod, Product2ImgMethod)
}


def build_method(name: str, model_path: str | None = None, device: str = "cpu", dtype: str | torch.dtype = "float32",
                 **options) -> BackgroundMethod:
    """Load one method of :data:`METHODS` by name.

    Args:
        name: ``sd-inpainting``, ``controlnet-canny``, ``ip-adapter``, ``epbd-ft`` or ``product2img``.
        model_path: Hub id or folder of the (base) checkpoint; default: the method's stock model
            (SD-1.5 inpainting for the first three; ``epbd-ft`` and ``product2img`` need one).
        device, dtype: where and in which precision the pipeline runs.
        options: method settings (``paste_product``, ``controlnet_model``, ``ip_adapter``,
            ``ip_adapter_scale``, ``canny_low_threshold``, ...). Options that this method does not take
            are ignored, so one dict can configure every method.
    """
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None
    model = model_path or cls.default_model
    if model is None:
        raise ValueError(f"method {name!r} needs a model: pass model_path (CLI: --model-{name} PATH_OR_REPO)")
    params = inspect.signature(cls.from_pretrained).parameters
    taken = {k: v for k, v in options.items() if k in params}
    return cls.from_pretrained(model, device=device, dtype=dtype, **taken)
