"""The demo world: EPBD-synth, its export, and a "pretrained SD-Inpainting" that runs on a CPU in seconds.

Real Product2Img starts from SD-Inpainting, whose VAE already reconstructs photographs. The tiny VAE
of :mod:`diffusers_product2img.testing` is random: its decoder returns noise, so a diffusion model
trained in its latent space cannot draw a scene. The demo world therefore *pretrains* its own small
autoencoder on the EPBD-synth training images (the stand-in for SD's VAE pretraining) and builds the
demo's base checkpoint from it:

* ``vae``: an ``AutoencoderKL`` with **4x** spatial downsampling (3 encoder blocks; 64 px images ->
  16x16x4 latents), trained for a few hundred AdamW steps on MSE + a small KL term. Its
  ``scaling_factor`` is set, as SD's is, to 1 / (std of the training latents);
* ``unet``: a fresh tiny 9-channel ``UNet2DConditionModel`` (noisy latents 4 + mask 1 + masked-image
  latents 4), the same architecture as :func:`diffusers_product2img.testing.tiny_unet`;
* ``text_encoder`` / ``tokenizer``: the tiny CLIP text tower and the tiny BPE tokenizer;
* ``scheduler``: the SD-1.5 noise schedule (Euler Ancestral).

They are saved together as a stock ``StableDiffusionInpaintPipeline`` folder, so training starts
from it exactly as it starts from ``stable-diffusion-v1-5/stable-diffusion-inpainting``
(``Product2ImgPipeline.from_inpainting``). A tiny ``CLIPModel`` (random, fixed seed) stands in for
CLIP ViT-L/14 as CBA's image encoder and for the plumbing metrics.

The trained VAE is cached by a key of its settings, the training images' bytes and the library
versions (``<cache_dir>/demo_vae/<key>/``), so a second run of the demo skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "WorldConfig",
    "DemoWorld",
    "demo_vae",
    "demo_unet",
    "train_demo_vae",
    "default_demo_cache_dir",
    "build_world",
]

logger = logging.getLogger(__name__)

BASE_FORMAT_VERSION = 2


@dataclass
class WorldConfig:
    """What the demo world is made of (the data and the base model)."""

    seed: int = 0  # EPBD-synth seed and every initialisation of the base model
    resolution: int = 32
    num_train: int = 360
    num_validation: int = 96
    num_test: int = 96
    num_test_unseen: int = 96
    low_quality_rate: float = 0.3
    # the demo VAE's pretraining
    vae_channels: tuple[int, ...] = (16, 32, 32)  # one block per entry: 3 blocks = 4x downsampling
    vae_steps: int = 400
    vae_batch_size: int = 16
    vae_learning_rate: float = 5e-3
    vae_kl_weight: float = 1e-6
    # the demo UNet's generic inpainting pretraining (the stand-in for SD-Inpainting's)
    pretrain_images: int = 1000
    unet_pretrain_steps: int = 1000
    unet_pretrain_batch_size: int = 64
    unet_pretrain_learning_rate: float = 2e-3

    def synth_overrides(self) -> dict:
        return {
            "seed": self.seed, "resolution": self.resolution, "num_train": self.num_train,
            "num_validation": self.num_validation, "num_test": self.num_test,
            "num_test_unseen": self.num_test_unseen, "low_quality_rate": self.low_quality_rate,
        }


@dataclass
class DemoWorld:
    """Paths (and a few measurements) of a built demo world."""

    config: WorldConfig
    data_root: Path  # raw EPBD-synth layout (IDR writes each round's scores into a copy of it)
    export_dir: Path  # the Hub-native export (Parquet + README configs) the training script reads
    base_model: Path  # StableDiffusionInpaintPipeline folder: the demo's "SD-Inpainting"
    clip_model: Path  # tiny CLIPModel folder: CBA image encoder, plumbing metrics
    vae_info: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def default_demo_cache_dir() -> Path:
    """``$DIFFUSERS_PRODUCT2IMG_CACHE`` or ``~/.cache/diffusers_product2img``."""
    env = os.environ.get("DIFFUSERS_PRODUCT2IMG_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "diffusers_product2img"


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def demo_vae(seed: int = 0, sample_size: int = 64, channels: tuple[int, ...] = (16, 32, 32)):
    """A small ``AutoencoderKL``; 3 blocks give 4x downsampling (64 px -> 16x16x4 latents)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(8, min(channels)),
        sample_size=sample_size,
    )


def demo_unet(seed: int = 0, sample_size: int = 16):
    """The tiny 9-channel UNet of :func:`diffusers_product2img.testing.tiny_unet`, sized for 16x16 latents."""
    from diffusers import UNet2DConditionModel

    from ..testing import tiny_unet

    config = dict(tiny_unet(seed).config)
    config["sample_size"] = sample_size
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(config).eval()


def _open_rgb(path, mode: str = "RGB") -> Image.Image:
    with Image.open(path) as im:
        return im.convert(mode)


def _images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def train_demo_vae(images: list[Image.Image], *, steps: int = 400, batch_size: int = 16, learning_rate: float = 5e-3,
                   kl_weight: float = 1e-6, seed: int = 0, channels: tuple[int, ...] = (16, 32, 32),
                   progress: Callable[[int, float], None] | None = None):
    """Pretrain :func:`demo_vae` on ``images`` (MSE reconstruction + ``kl_weight`` x KL); returns it in eval mode.

    Deterministic for a given seed on a given machine: the batches are drawn from
    ``numpy.random.default_rng(seed)``, the latent samples from a seeded ``torch.Generator``. The
    returned VAE's ``scaling_factor`` is 1 / std of the training latents' means (SD's convention:
    scaled latents have about unit variance).
    """
    if not images:
        raise ValueError("no images to train the demo VAE on")
    data = _images_to_tensor(images)
    vae = demo_vae(seed, sample_size=data.shape[-1], channels=channels).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=max(steps, 1),
                                                   pct_start=0.1, anneal_strategy="cos")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = rng.choice(len(data), size=min(batch_size, len(data)), replace=False)
        x = data[idx]
        # horizontal flips: the scenes are left/right symmetric in distribution
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, loss.item())
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(data[i: i + 64]).latent_dist.mean for i in range(0, len(data), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std().clamp_min(1e-6)))
    return vae


SCENE_CAPTIONS = {
    "kitchen_counter": "a kitchen counter", "beach": "a beach with sand and sea", "bathroom_tiles": "bathroom tiles",
    "desk": "an office desk", "garden": "a garden with grass", "gym": "a gym floor", "vanity": "a pink vanity table",
    "cafe": "a coffee cafe table",
}
"""Captions of the pretraining corpus: what a generic image-text corpus says about each scene."""


def pretraining_corpus(num_images: int, seed: int, resolution: int) -> list[dict]:
    """Generic inpainting data for the demo's "SD-Inpainting": any product in any scene, with a scene caption.

    Rendered by :func:`~diffusers_product2img.data.synth.render_sample` from a seed stream disjoint
    from EPBD-synth's, over all categories (seen and unseen). The scene is drawn uniformly and
    independently of the product, so the pretrained model learns to draw scenes and to read scene
    words (a description, or a listing phrase such as "for Kitchen"), but not which scene suits which
    product: that is what fine-tuning on EPBD teaches, as in the paper. 10% of the captions are
    empty (for classifier-free guidance).
    """
    from ..data.synth import CATEGORIES, SCENES, render_sample

    rng = np.random.default_rng((seed, 7001))
    categories, scenes = list(CATEGORIES), list(SCENES)
    corpus = []
    for i in range(num_images):
        category = categories[int(rng.integers(len(categories)))]
        wanted = scenes[int(rng.integers(len(scenes)))]
        # render_sample draws the category's own scene for "good" and another one for "wrong_scene":
        # redraw until the wanted (uniform) scene comes out
        for attempt in range(64):
            quality = "good" if wanted == CATEGORIES[category].scene else "wrong_scene"
            sample = render_sample(category, quality, seed=(seed, 7001, i, attempt), resolution=resolution)
            if sample["scene"] == wanted:
                break
        # what an image-text corpus says about a scene: a description, or a listing phrase that names it
        # ("for Kitchen", "Summer Travel"); never the product's own name, which would leak the pairing
        u = rng.random()
        if u < 0.1:
            caption = ""
        elif u < 0.55:
            caption = SCENE_CAPTIONS[sample["scene"]]
        else:
            context = SCENES[sample["scene"]].context
            caption = context[int(rng.integers(len(context)))]
        corpus.append({"image": Image.fromarray(sample["image"]),
                       "mask": Image.fromarray(sample["cutout"][..., 3]), "caption": caption})
    return corpus


def pretrain_demo_unet(unet, vae, text_encoder, tokenizer, corpus: list[dict], *, steps: int, batch_size: int = 16,
                       learning_rate: float = 1e-3, seed: int = 0,
                       progress: Callable[[int, float], None] | None = None):
    """Pretrain the 9-channel UNet as an inpainting model on ``corpus`` (the demo's SD-Inpainting pretraining).

    The loss is the package's own inpainting step (:func:`diffusers_product2img.training.training_step`,
    eq. 3, CBA off) on frozen VAE latents of the corpus; the text encoder is frozen and reads the
    captions. Returns the UNet in eval mode.
    """
    from diffusers import DDPMScheduler

    from ..placement import inpainting_condition
    from ..testing import tiny_scheduler
    from ..training import training_step
    from ..training.loop import encode_frozen_features

    pixels = _images_to_tensor([c["image"] for c in corpus])
    masks = torch.from_numpy(np.stack([np.asarray(c["mask"], np.float32) / 255.0 for c in corpus]))[:, None]
    features = {}
    with torch.no_grad():
        for i in range(0, len(corpus), 64):
            inpaint_mask, masked = inpainting_condition(pixels[i: i + 64], masks[i: i + 64])
            out = encode_frozen_features({"pixel_values": pixels[i: i + 64], "masked_pixel_values": masked,
                                          "inpaint_mask": inpaint_mask}, vae)
            for k, v in out.items():
                features.setdefault(k, []).append(v)
    features = {k: torch.cat(v) for k, v in features.items()}
    input_ids = tokenizer([c["caption"] for c in corpus], padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    noise_scheduler = DDPMScheduler.from_config(tiny_scheduler().config)
    text_encoder.requires_grad_(False).eval()
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=max(steps, 1),
                                                   pct_start=0.05, anneal_strategy="cos")
    rng = np.random.default_rng((seed, 7002))
    for step in range(steps):
        idx = torch.from_numpy(rng.choice(len(corpus), size=min(batch_size, len(corpus)), replace=False))
        batch = {k: v[idx] for k, v in features.items()}
        batch["input_ids"] = input_ids[idx]
        batch["positions"] = torch.arange(step * batch_size, step * batch_size + len(idx))
        out = training_step(batch, unet=unet, text_encoder=text_encoder, noise_scheduler=noise_scheduler,
                            vae_scaling_factor=vae.config.scaling_factor, seed=seed)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, out.loss.item())
    return unet.eval()


@torch.no_grad()
def reconstruct(vae, images: list[Image.Image]) -> list[Image.Image]:
    """Encode (posterior mode) and decode: what the VAE keeps of each image."""
    out = []
    for i in range(0, len(images), 32):
        x = _images_to_tensor(images[i: i + 32])
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        arr = ((y.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out += [Image.fromarray(a) for a in arr]
    return out


# ------------------------------------------------------------------------------------------------
# The world
# ------------------------------------------------------------------------------------------------


def _base_cache_key(config: WorldConfig, data_root: Path, train_ids: list[str]) -> str:
    import diffusers

    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(config).items()
                if k.startswith(("vae_", "unet_", "pretrain_")) or k in ("seed", "resolution")}
    h.update(json.dumps({"version": BASE_FORMAT_VERSION, "settings": settings,
                         "torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__},
                        sort_keys=True, default=list).encode())
    for sid in train_ids:
        h.update((data_root / "images" / f"{sid}.png").read_bytes())
    return h.hexdigest()[:20]


def _throttled(log: Callable[[str], None], label: str, total: int, every: float = 15.0):
    last = [time.perf_counter()]

    def progress(step: int, loss: float) -> None:
        if time.perf_counter() - last[0] > every or step == total:
            last[0] = time.perf_counter()
            log(f"  {label} step {step}/{total}  loss {loss:.4f}")

    return progress


def _pretrain_base(config: WorldConfig, data_root: Path, target: Path, log: Callable[[str], None]) -> dict:
    """Pretrain the demo VAE and UNet and write the base ``StableDiffusionInpaintPipeline`` folder."""
    from diffusers import StableDiffusionInpaintPipeline

    from ..data.layout import EPBDLayout
    from ..testing import tiny_clip_tokenizer, tiny_scheduler, tiny_text_encoder

    lay = EPBDLayout(data_root)
    train = lay.split_samples("train")
    images = [_open_rgb(lay.root / s.image_file) for s in train]
    info: dict = {"channels": list(config.vae_channels), "downsampling": 2 ** (len(config.vae_channels) - 1),
                  "steps": config.vae_steps, "unet_pretrain_steps": config.unet_pretrain_steps,
                  "pretrain_images": config.pretrain_images}
    log(f"demo world: pretraining the autoencoder on {len(images)} EPBD-synth train images ({config.vae_steps} steps)")
    start = time.perf_counter()
    vae = train_demo_vae(images, steps=config.vae_steps, batch_size=config.vae_batch_size,
                         learning_rate=config.vae_learning_rate, kl_weight=config.vae_kl_weight, seed=config.seed,
                         channels=tuple(config.vae_channels),
                         progress=_throttled(log, "autoencoder", config.vae_steps))
    info["vae_seconds"] = round(time.perf_counter() - start, 1)
    info.update(vae_scene_check(vae, data_root))
    info["scaling_factor"] = vae.config.scaling_factor
    tokenizer = tiny_clip_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer), config.seed)
    unet = demo_unet(config.seed, sample_size=config.resolution // 2 ** (len(config.vae_channels) - 1))
    start = time.perf_counter()
    corpus = pretraining_corpus(config.pretrain_images, config.seed, config.resolution)
    log(f"demo world: pretraining the inpainting UNet on {len(corpus)} generic scene images "
        f"({config.unet_pretrain_steps} steps)")
    pretrain_demo_unet(unet, vae, text_encoder, tokenizer, corpus, steps=config.unet_pretrain_steps,
                       batch_size=config.unet_pretrain_batch_size, learning_rate=config.unet_pretrain_learning_rate,
                       seed=config.seed, progress=_throttled(log, "UNet", config.unet_pretrain_steps))
    info["unet_seconds"] = round(time.perf_counter() - start, 1)
    pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=tiny_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "demo_world.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def vae_scene_check(vae, data_root: Path, split: str = "validation") -> dict:
    """How much of each scene survives the VAE: :func:`~diffusers_product2img.data.synth.classify_scene`
    on reconstructions vs the originals of ``split`` (which the VAE never saw)."""
    from ..data.layout import EPBDLayout
    from ..data.synth import classify_scene

    lay = EPBDLayout(data_root)
    samples = lay.split_samples(split)
    if not samples:
        return {}
    originals = [_open_rgb(lay.root / s.image_file) for s in samples]
    masks = [_open_rgb(lay.root / s.cutout_file, mode="RGBA").getchannel("A") for s in samples]
    recon = reconstruct(vae, originals)
    same = [classify_scene(r, m) == classify_scene(o, m) for r, o, m in zip(recon, originals, masks)]
    err = float(np.mean([np.abs(np.asarray(r, np.float32) - np.asarray(o, np.float32)).mean()
                         for r, o in zip(recon, originals)]))
    return {"split": split, "n": len(samples), "scene_kept": float(np.mean(same)), "mean_abs_error_0_255": err}


def build_world(out_dir: str | os.PathLike, config: WorldConfig | None = None, *, cache_dir: Path | None = None,
                log: Callable[[str], None] = print) -> DemoWorld:
    """Generate EPBD-synth, export it, pretrain (or load) the demo VAE and write the base checkpoints.

    Layout under ``out_dir``: ``epbd_synth/`` (raw), ``epbd_synth_export/`` (Parquet),
    ``base_sd_inpainting/`` (the demo world's SD-Inpainting), ``tiny_clip/``. Existing pieces are reused.
    """
    from ..data import export_epbd, generate_epbd_synth
    from ..testing import save_tiny_clip_model

    config = config or WorldConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    world = DemoWorld(config=config, data_root=out / "epbd_synth", export_dir=out / "epbd_synth_export",
                      base_model=out / "base_sd_inpainting", clip_model=out / "tiny_clip", timings=timings)

    start = time.perf_counter()
    if not (world.data_root / "epbd.json").exists() and not any(world.data_root.glob("metadata.*")):
        log(f"EPBD-synth: generating {config.num_train} train / {config.num_validation} validation / "
            f"{config.num_test} test / {config.num_test_unseen} test_unseen samples at {config.resolution} px")
        generate_epbd_synth(world.data_root, overwrite=world.data_root.exists(), **config.synth_overrides())
    timings["generate_epbd_synth"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    if not (world.export_dir / "README.md").exists():
        log("EPBD-synth: exporting to Parquet + README configs (load_dataset-able)")
        export_epbd(world.data_root, world.export_dir, overwrite=world.export_dir.exists())
    timings["export"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    if not (world.base_model / "model_index.json").exists():
        from ..data.layout import EPBDLayout

        train_ids = [x.id for x in EPBDLayout(world.data_root).split_samples("train")]
        key = _base_cache_key(config, world.data_root, train_ids)
        cached = cache_dir / "demo_world" / key if cache_dir is not None else None
        if cached is not None and (cached / "demo_world.json").exists():
            log(f"demo world: pretrained base model from the cache ({cached})")
        else:
            _pretrain_base(config, world.data_root, cached or world.base_model, log)
        if cached is not None:
            shutil.copytree(cached, world.base_model, dirs_exist_ok=True)
    world.vae_info = json.loads((world.base_model / "demo_world.json").read_text(encoding="utf-8"))
    log(f"demo world: the scene class survives the autoencoder for {world.vae_info.get('scene_kept', 0):.0%} of "
        f"validation images (mean abs. error {world.vae_info.get('mean_abs_error_0_255', float('nan')):.1f}/255)")
    timings["base_model"] = round(time.perf_counter() - start, 2)

    if not (world.clip_model / "config.json").exists():
        save_tiny_clip_model(world.clip_model, seed=config.seed)
    return world
