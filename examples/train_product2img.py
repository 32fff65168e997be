#!/usr/bin/env python
"""Fine-tune SD-Inpainting into Product2Img with Contrastive Background Alignment (paper 4.3, 5.1.1).

    accelerate launch examples/train_product2img.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-inpainting \\
      --train_data_dir path/to/epbd_export --dataset_config_name idr_round_1 \\
      --output_dir product2img-round1 --train_batch_size 16 --gradient_accumulation_steps 1 \\
      --max_train_steps 3000 --mixed_precision fp16 --use_feature_cache

What one step computes (the loss lives in ``diffusers_product2img.training.loop``):

* the inpainting loss (eq. 3): epsilon-prediction MSE of the 9-channel UNet conditioned on the
  text encoder's hidden states of ``"{product name} <background>"``;
* CBA (eq. 4-5): the text encoder's output at ``<background>`` against the frozen CLIP image
  embedding of the background image B, and its output at ``<eos>`` against the CLIP embedding of
  the target image I; cosine similarity, temperature ``--cba_temperature`` (0.05), in-batch
  negatives gathered over all processes (``--no_gather_features`` keeps them per process),
  symmetrised; total ``L_inpaint + --cba_weight * (L'cl(b,B) + L'cl(P,I))`` with weight 0.01.
  ``--no_cba`` trains the paper's EPBD-FT baseline with everything else equal.

The projection: text features (hidden size of the text encoder) go into the CLIP image embedding
space through one linear map shared by the ``<background>`` and ``<eos>`` features
(``diffusers_product2img.cba.TextToImageProjection``). It starts from the ``text_projection`` of
``--clip_model_name_or_path`` (default CLIP ViT-L/14, whose text tower *is* SD-1.5's text encoder, so
the projected ``<eos>`` feature is CLIP's own text embedding at step 0); it is random only when the
shapes do not fit. It trains at the text encoder's learning rate and is saved to ``cba_projection/``.

Which parameters train (paper 5.1.1): the UNet and the ``<background>`` embedding row at
``--learning_rate`` (1e-5); every other embedding row is frozen (bit-identical after training); the
rest of the text encoder and the projection at ``--text_encoder_learning_rate`` (1e-6); linear
warmup then cosine decay. The paper's batch is 64: 4 GPUs x ``--train_batch_size 16``, or one GPU with
``--gradient_accumulation_steps 4`` (the contrastive negatives then come from each micro-batch).

Fast by construction: ``--use_feature_cache`` computes the frozen VAE latents (of I and of the
product-only image) and the CLIP embeddings (r_B, r_I) once, keyed by dataset fingerprint, model
weights and resolution, and trains from them. ``benchmarks/bench_training_step.py`` measures one
optimizer step (median, interleaved runs). Measured on the tiny offline components only (CPU, 1 thread,
batch 8, shared 2-core machine; SD-1.5 on a GPU was not measured):

    resolution 64:  plain 88.0 / 87.1 ms, CBA 87.5 / 93.1 ms from images; cached plain 60.2 / 59.1 ms,
                    CBA 62.9 / 62.6 ms -> CBA/plain (cached) 1.044 / 1.060; cache speed-up 1.39-1.49x
    resolution 128: plain 222.1 -> 122.7 ms with the cache (1.81x); CBA/plain 1.018 cached and uncached

Determinism: the sample order and every sample's noise/timestep are functions of ``--seed`` and the
step only, so ``--resume_from_checkpoint latest`` continues exactly where an uninterrupted run
would be, and 2 processes x batch 2 see the same samples as 1 process x batch 4.

The output folder is a complete ``Product2ImgPipeline`` (also loadable with
``DiffusionPipeline.from_pretrained(out, custom_pipeline=out, trust_remote_code=True)``) with
``learned_embeds.safetensors``, ``cba_projection/``, the model card and ``validation_grid.png``;
with ``--use_lora``, also ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(out)``).
Pass an existing Product2Img folder as ``--pretrained_model_name_or_path`` to continue training
(round i of IDR-LMM starts from round i-1); another driver can call ``train(args, train_dataset=...)``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.utils import make_image_grid
from PIL import Image
from tqdm.auto import tqdm

from diffusers_product2img import Product2ImgPipeline
from diffusers_product2img.background_token import DEFAULT_BACKGROUND_TOKEN, background_token_id
from diffusers_product2img.cba import (
    CBA_PROJECTION_DIR,
    DEFAULT_CBA_TEMPERATURE,
    DEFAULT_CBA_WEIGHT,
    DEFAULT_CLIP_MODEL,
    TextToImageProjection,
    load_clip_image_encoder,
)
from diffusers_product2img.data.preprocessing import prepare_example
from diffusers_product2img.idr.rounds import IDRConfig, parse_round_steps
from diffusers_product2img.idr.scorer import add_scorer_args
from diffusers_product2img.pipeline_product2img import DEFAULT_INPAINTING_MODEL
from diffusers_product2img.training import (
    CBAConfig,
    EpochOrder,
    FrozenEmbeddingRows,
    MicroBatchSampler,
    PositionDataset,
    Product2ImgCollator,
    parameter_groups,
    training_step,
)
from diffusers_product2img.training.cache import (
    build_feature_cache,
    default_cache_root,
    feature_cache_key,
    weights_digest,
)
from diffusers_product2img.training.model_card import push_output_to_hub, save_model_card

logger = get_logger(__name__, log_level="INFO")

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
VALIDATION_GRID = "validation_grid.png"


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Train Product2Img (SD-Inpainting + <background> token + CBA).")
    # Models
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=DEFAULT_INPAINTING_MODEL,
                        help="An SD-Inpainting checkpoint (Hub id or folder), or a Product2Img folder to continue from.")
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--variant", type=str, default=None)
    parser.add_argument("--clip_model_name_or_path", type=str, default=DEFAULT_CLIP_MODEL,
                        help="CLIP model whose image tower embeds B and I for CBA (and whose text_projection starts the projection).")
    parser.add_argument("--background_token", type=str, default=DEFAULT_BACKGROUND_TOKEN)
    parser.add_argument("--initializer_word", type=str, default="background")
    # Data
    parser.add_argument("--train_data_dir", type=str, default=None,
                        help="An exported EPBD folder (load_dataset-able), or a raw EPBD layout (exported on the fly).")
    parser.add_argument("--dataset_name", type=str, default=None, help="A Hub dataset id (or local dataset path).")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="e.g. idr_round_2")
    parser.add_argument("--train_split", type=str, default="train")
    parser.add_argument("--train_ids_file", type=str, default=None,
                        help="Train only on these ids (one per line, or a JSON list); the cache stays keyed on the full split.")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--cache_dir", type=str, default=None, help="datasets / Hub download cache.")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    # Validation
    parser.add_argument("--validation_split", type=str, default="validation")
    parser.add_argument("--validation_products", type=str, default=None,
                        help='JSONL of {"product_name", "image", "mask" | "cutout"} (paths) instead of the validation split.')
    parser.add_argument("--num_validation_products", type=int, default=4)
    parser.add_argument("--validation_steps", type=int, default=500)
    parser.add_argument("--validation_inference_steps", type=int, default=30)
    parser.add_argument("--validation_guidance_scale", type=float, default=7.5)
    # Optimisation
    parser.add_argument("--output_dir", type=str, default="product2img-model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_batch_size", type=int, default=16, help="Per device.")
    parser.add_argument("--num_train_epochs", type=int, default=None)
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="Optimizer steps; overrides --num_train_epochs. Default without either: 3000 (paper, round 1).")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--learning_rate", type=float, default=1e-5, help="UNet (or its LoRA) and the <background> row.")
    parser.add_argument("--text_encoder_learning_rate", type=float, default=1e-6,
                        help="The rest of the text encoder (or its LoRA).")
    parser.add_argument("--projection_learning_rate", type=float, default=None,
                        help="The CBA projection (default: --text_encoder_learning_rate).")
    parser.add_argument("--scale_lr", action="store_true",
                        help="Multiply learning rates by batch size x accumulation x processes.")
    parser.add_argument("--lr_scheduler", type=str, default="cosine",
                        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    parser.add_argument("--lr_warmup_steps", type=int, default=100)
    parser.add_argument("--use_8bit_adam", action="store_true")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--allow_tf32", action="store_true")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    # CBA
    parser.add_argument("--cba_weight", type=float, default=DEFAULT_CBA_WEIGHT, help="lambda of eq. 5")
    parser.add_argument("--cba_temperature", type=float, default=DEFAULT_CBA_TEMPERATURE, help="tau of eq. 4")
    parser.add_argument("--no_cba", action="store_true", help="Inpainting loss only (the EPBD-FT baseline).")
    parser.add_argument("--no_gather_features", action="store_true",
                        help="Contrastive negatives from each process's batch only.")
    parser.add_argument("--use_feature_cache", action="store_true",
                        help="Precompute VAE latents and CLIP embeddings once and train from them.")
    parser.add_argument("--feature_cache_dir", type=str, default=None)
    # LoRA
    parser.add_argument("--use_lora", action="store_true", help="Train LoRA adapters on the UNet instead of all weights.")
    parser.add_argument("--text_encoder_lora", action="store_true",
                        help="With --use_lora: LoRA on the text encoder too (else only its <background> row trains).")
    parser.add_argument("--lora_rank", type=int, default=4)
    parser.add_argument("--lora_alpha", type=int, default=None, help="Default: the rank.")
    # Checkpoints and logging
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help='A checkpoint folder or "latest".')
    parser.add_argument("--report_to", type=str, default="tensorboard", help='tensorboard, wandb, all or "none".')
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", type=str, default=None)
    parser.add_argument("--hub_private", action="store_true")
    parser.add_argument("--hub_dataset_id", type=str, default=None,
                        help="With --idr_rounds and --push_to_hub: the dataset repo that gets each round's EPBD config.")
    # IDR-LMM (paper 4.4, Algorithm 1)
    parser.add_argument("--idr_rounds", type=int, default=0,
                        help="Rounds of IDR-LMM (paper: 3). 0 trains once on the given data.")
    parser.add_argument("--round_steps", type=str, default="3000,1000,1000",
                        help="Training steps of each IDR round (comma-separated; one value for every round).")
    parser.add_argument("--no_idr", action="store_true",
                        help="The paper's Table 3 control: train sum(--round_steps) steps on the unfiltered set.")
    add_scorer_args(parser)  # --lmm_model, --lmm_base_url, ..., --gamma, prompt overrides; key from the env only

    args = parser.parse_args(input_args)
    if args.idr_rounds < 0:
        parser.error("--idr_rounds must be >= 0")
    if args.idr_rounds and args.no_idr:
        parser.error("--no_idr is the control run without rounds; drop --idr_rounds")
    if args.idr_rounds and not args.lmm_model:
        parser.error("--idr_rounds needs --lmm_model (e.g. gpt-4o-2024-08-06, or Qwen/Qwen2.5-VL-7B-Instruct with "
                     "--lmm_base_url http://localhost:8000/v1)")
    if args.idr_rounds or args.no_idr:
        try:
            args.round_steps = parse_round_steps(args.round_steps)
            IDRConfig(rounds=args.idr_rounds or len(args.round_steps), round_steps=args.round_steps)
        except ValueError as err:
            parser.error(f"--round_steps: {err}")
    if args.text_encoder_lora and not args.use_lora:
        parser.error("--text_encoder_lora needs --use_lora")
    if args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        parser.error("--train_batch_size and --gradient_accumulation_steps must be >= 1")
    if args.resolution % 8:
        parser.error("--resolution must be a multiple of 8")
    return args


# ------------------------------------------------------------------------------------------ data


def _is_raw_epbd(path: Path) -> bool:
    return path.is_dir() and not (path / "README.md").exists() and any(
        (path / name).exists() for name in ("metadata.csv", "metadata.jsonl")
    )


def exported_epbd_dir(args) -> Path:
    """Where a raw ``--train_data_dir`` is exported to (Parquet), keyed by its path and contents' stamps.

    Kept under ``--cache_dir`` (default: the Hugging Face cache), so IDR rounds reuse one export, and
    its datasets fingerprint, hence the feature cache, stays the same from round to round.
    """
    raw = Path(args.train_data_dir).resolve()
    stamps = [str(raw)]
    # Score files are left out: IDR rounds add configs to this one export (add_round_config) instead
    # of re-exporting, so the dataset fingerprint and the feature cache stay valid across rounds.
    for p in sorted([*raw.glob("metadata.*"), *raw.glob("epbd.json")]):
        st = p.stat()
        stamps.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    key = hashlib.sha256("|".join(stamps).encode()).hexdigest()[:16]
    root = Path(args.cache_dir) if args.cache_dir else Path(default_cache_root()).parent
    return root / "epbd_exports" / f"{raw.name}-{key}"


def resolve_train_data_dir(args, accelerator) -> Path:
    """``--train_data_dir`` as an exported EPBD folder (a raw layout is exported once, by the main process)."""
    path = Path(args.train_data_dir)
    if not _is_raw_epbd(path):
        return path
    from diffusers_product2img.data import export_epbd

    exported = exported_epbd_dir(args)
    if accelerator.is_main_process and not (exported / "README.md").exists():
        logger.info(f"exporting the raw EPBD folder {path} to {exported}")
        export_epbd(path, exported, overwrite=exported.exists())
    accelerator.wait_for_everyone()
    return exported


def load_train_dataset(args, accelerator):
    """The training split as a ``datasets.Dataset`` (EPBD schema)."""
    import datasets

    from diffusers_product2img.data import load_epbd

    if args.train_data_dir:
        path = resolve_train_data_dir(args, accelerator)
        return load_epbd(path, args.dataset_config_name, split=args.train_split, cache_dir=args.cache_dir)
    if args.dataset_name:
        return datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.train_split,
                                     cache_dir=args.cache_dir)
    raise ValueError("give --train_data_dir or --dataset_name (or pass train_dataset= to train())")


def training_row_indices(args, dataset) -> list[int]:
    """Rows of ``dataset`` to train on (all, or those listed in --train_ids_file)."""
    indices = list(range(len(dataset)))
    if args.train_ids_file:
        text = Path(args.train_ids_file).read_text(encoding="utf-8").strip()
        wanted = json.loads(text) if text.startswith("[") else [line.strip() for line in text.splitlines() if line.strip()]
        wanted = {str(i) for i in wanted}
        ids = [str(i) for i in dataset["id"]]
        indices = [i for i, sample_id in enumerate(ids) if sample_id in wanted]
        missing = wanted - set(ids)
        if missing:
            raise ValueError(f"--train_ids_file names {len(missing)} ids not in the training data, e.g. {sorted(missing)[:5]}")
    if args.max_train_samples is not None:
        indices = indices[: args.max_train_samples]
    return indices


class IndexedRows:
    """``rows[i]`` = ``dataset[indices[i]]`` with ``_row_index`` = the index in the full dataset."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return dict(self.dataset[self.indices[i]])


class _MappedPositions(PositionDataset):
    def __getitem__(self, position):
        row = super().__getitem__(position)
        row["_row_index"] = self.rows.indices[row["_row_index"]]
        return row


def load_validation_rows(args, train_rows) -> list[dict]:
    """A few validation products (name, image, mask or cutout)."""
    if args.num_validation_products <= 0:
        return []
    if args.validation_products:
        rows = []
        base = Path(args.validation_products).parent
        for line in Path(args.validation_products).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            row = {"product_name": item["product_name"], "image": Image.open(base / item.get("image", item.get("cutout")))}
            for key in ("mask", "cutout"):
                if item.get(key):
                    row[key] = Image.open(base / item[key])
            rows.append(row)
        return rows[: args.num_validation_products]
    try:
        if args.train_data_dir:
            from diffusers_product2img.data import load_epbd

            path = exported_epbd_dir(args) if _is_raw_epbd(Path(args.train_data_dir)) else args.train_data_dir
            split = load_epbd(path, None, split=args.validation_split, cache_dir=args.cache_dir)
        elif args.dataset_name:
            import datasets

            split = datasets.load_dataset(args.dataset_name, None, split=args.validation_split, cache_dir=args.cache_dir)
        else:
            raise ValueError("no dataset to read a validation split from")
        return [dict(split[i]) for i in range(min(args.num_validation_products, len(split)))]
    except Exception as err:  # no validation split: show training products
        logger.info(f"no validation split ({err}); validating on the first training products")
        return [train_rows[i] for i in range(min(args.num_validation_products, len(train_rows)))]


# ---------------------------------------------------------------------------------------- models


def is_product2img_folder(name_or_path, revision=None) -> bool:
    try:
        config = DiffusionPipeline.load_config(name_or_path, revision=revision)
    except Exception:
        return False
    return config.get("_class_name") == "Product2ImgPipeline"


def load_pipeline(args) -> tuple[Product2ImgPipeline, bool]:
    """``(pipeline, continuing)``: a Product2Img folder as is, or SD-Inpainting + the background token."""
    kwargs = {"revision": args.revision, "variant": args.variant}
    if is_product2img_folder(args.pretrained_model_name_or_path, args.revision):
        pipe = Product2ImgPipeline.from_pretrained(args.pretrained_model_name_or_path, **kwargs)
        if pipe.background_token != args.background_token:
            logger.info(f"continuing with the model's background token {pipe.background_token!r}")
            args.background_token = pipe.background_token
        return pipe, True
    pipe = Product2ImgPipeline.from_inpainting(
        args.pretrained_model_name_or_path, background_token=args.background_token,
        initializer_word=args.initializer_word, **kwargs,
    )
    return pipe, False


def load_projection(args, continuing, text_projection, text_hidden_size, image_embed_dim) -> TextToImageProjection:
    if continuing:
        try:
            return TextToImageProjection.from_pretrained(
                args.pretrained_model_name_or_path, subfolder=CBA_PROJECTION_DIR, revision=args.revision
            )
        except (OSError, ValueError):
            logger.info("the model has no cba_projection/: starting it from the CLIP text projection")
    return TextToImageProjection.from_text_projection(text_projection, text_hidden_size, image_embed_dim)


def add_lora_adapters(args, unet, text_encoder):
    from peft import LoraConfig

    alpha = args.lora_alpha or args.lora_rank
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    text_encoder.requires_grad_(False)
    if args.text_encoder_lora:
        text_encoder.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))


# ------------------------------------------------------------------------------------ validation


def generate_validation_images(pipeline, rows, args, generator_seed=None) -> list[Image.Image]:
    """One generated image per validation product (fixed seed: comparable across steps)."""
    seed = args.seed if generator_seed is None else generator_seed
    prepared = [prepare_example(r["image"], r["mask"] if r.get("mask") is not None else r["cutout"], args.resolution)
                for r in rows]
    images = []
    for row, p in zip(rows, prepared):
        out = pipeline(
            row["product_name"], p["image"], product_mask=p["mask"], height=args.resolution, width=args.resolution,
            num_inference_steps=args.validation_inference_steps, guidance_scale=args.validation_guidance_scale,
            generator=torch.Generator().manual_seed(seed),
        )
        images.append(out.images[0])
    return images


def validation_grid(rows, images, args) -> Image.Image:
    """Top row: the products (as the model sees them), bottom row: the generated images."""
    inputs = [
        prepare_example(r["image"], r["mask"] if r.get("mask") is not None else r["cutout"], args.resolution)["product_image"]
        for r in rows
    ]
    return make_image_grid(inputs + images, rows=2, cols=len(images))


def log_validation(vae, text_encoder, tokenizer, unet, scheduler, args, accelerator, rows, step, final=False):
    """Generate the validation grid, save it under ``output_dir/validation/`` and log it."""
    logger.info(f"Running validation on {len(rows)} products (step {step})")
    pipeline = Product2ImgPipeline(
        vae=vae, text_encoder=accelerator.unwrap_model(text_encoder), tokenizer=tokenizer,
        unet=accelerator.unwrap_model(unet), scheduler=scheduler, background_token=args.background_token,
    )
    pipeline.set_progress_bar_config(disable=True)
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    pipeline.text_encoder.eval()
    images = generate_validation_images(pipeline, rows, args)
    if was_training:
        pipeline.unet.train()
        pipeline.text_encoder.train()
    grid = validation_grid(rows, images, args)
    out_dir = Path(args.output_dir) / "validation"
    out_dir.mkdir(parents=True, exist_ok=True)
    grid.save(out_dir / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption="top: products, bottom: generated")]}, step=step)
    return grid


# ----------------------------------------------------------------------------------- checkpoints


def _checkpoints(output_dir) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    found = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)]
    return sorted(found, key=lambda d: int(d.split("-")[1]))


def save_checkpoint(accelerator, args, global_step):
    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
        existing = _checkpoints(args.output_dir)
        if len(existing) >= args.checkpoints_total_limit:
            for old in existing[: len(existing) - args.checkpoints_total_limit + 1]:
                shutil.rmtree(os.path.join(args.output_dir, old))
    accelerator.wait_for_everyone()
    path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    accelerator.save_state(path)
    accelerator.wait_for_everyone()
    logger.info(f"Saved state to {path}")


# -------------------------------------------------------------------------------------- training


def _hyperparameters(args) -> dict:
    keys = ("resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "learning_rate",
            "text_encoder_learning_rate", "projection_learning_rate", "lr_scheduler", "lr_warmup_steps",
            "adam_weight_decay", "max_grad_norm", "mixed_precision", "seed", "cba_weight", "cba_temperature",
            "no_cba", "no_gather_features", "use_lora", "text_encoder_lora", "lora_rank", "dataset_config_name",
            "background_token")
    return {k: getattr(args, k) for k in keys}


def train(args, train_dataset=None, validation_rows=None, step_callback=None) -> str:
    """Train and write the output folder; returns its path.

    Args:
        args: the namespace of :func:`parse_args`.
        train_dataset: a ``datasets.Dataset`` in the EPBD schema to use instead of loading
            ``--train_data_dir``/``--dataset_name`` (``--train_ids_file`` still applies).
        validation_rows: validation products (dicts with ``product_name``, ``image`` and ``mask`` or
            ``cutout``) instead of the validation split.
        step_callback: ``fn(global_step, logs)`` after every optimizer step (and checkpoint).
    """
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            "launched as one of several processes but accelerate set up a single one (no GPU?): every process would "
            "train alone. On CPU run ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ..."
        )
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)  # only initialisations (LoRA, a random projection) use the global RNG
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # 1. Models
    pipe, continuing = load_pipeline(args)
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    inference_scheduler = pipe.scheduler
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    vae_scaling_factor = vae.config.scaling_factor
    bg_id = background_token_id(tokenizer, args.background_token)
    use_cba = not args.no_cba
    clip_model = clip_processor = projection = None
    if use_cba:
        clip_model, clip_processor, text_projection = load_clip_image_encoder(args.clip_model_name_or_path)
        projection = load_projection(args, continuing, text_projection, text_encoder.config.hidden_size,
                                     clip_model.config.projection_dim)
        projection.train()
    vae.requires_grad_(False)
    if args.use_lora:
        add_lora_adapters(args, unet, text_encoder)
    else:
        unet.requires_grad_(True)
        text_encoder.requires_grad_(True)
    guard = FrozenEmbeddingRows(text_encoder.get_input_embeddings(), [bg_id])
    unet.train()
    text_encoder.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        text_encoder.gradient_checkpointing_enable()

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae_digest = weights_digest(vae) if args.use_feature_cache else None
    clip_digest = weights_digest(clip_model) if args.use_feature_cache and use_cba else "none"
    for frozen in (vae, clip_model):
        if frozen is not None:
            frozen.to(accelerator.device)
            if weight_dtype != torch.float32:
                frozen.to(dtype=weight_dtype)

    # 2. Data
    if train_dataset is None:
        train_dataset = load_train_dataset(args, accelerator)
    indices = training_row_indices(args, train_dataset)
    rows = IndexedRows(train_dataset, indices)
    if validation_rows is None:
        validation_rows = load_validation_rows(args, rows)
    image_collator = Product2ImgCollator(tokenizer, args.resolution, clip_processor, args.background_token)
    collator, loader_rows = image_collator, rows
    if args.use_feature_cache:
        fingerprint = getattr(train_dataset, "_fingerprint", None)
        if fingerprint is None:
            raise ValueError("--use_feature_cache needs a datasets.Dataset (its fingerprint keys the cache)")
        key = feature_cache_key(
            fingerprint, vae_digest=vae_digest, clip_digest=clip_digest,
            clip_processor_config=clip_processor.to_dict() if clip_processor is not None else None,
            resolution=args.resolution, extra={"dtype": str(weight_dtype)},
        )
        cache_dir = Path(args.feature_cache_dir or default_cache_root()) / key
        logger.info(f"feature cache: {cache_dir}")
        cache = build_feature_cache(
            cache_dir, len(train_dataset), lambda idx: image_collator([train_dataset[i] for i in idx]),
            vae=vae, clip_model=clip_model, dtype=weight_dtype, batch_size=args.train_batch_size,
            process_index=accelerator.process_index, num_processes=accelerator.num_processes,
            wait_for_everyone=accelerator.wait_for_everyone,
            key_info={"dataset": fingerprint, "resolution": args.resolution, "clip": args.clip_model_name_or_path},
        )
        collator = Product2ImgCollator(tokenizer, args.resolution, None, args.background_token, feature_cache=cache)
        loader_rows = IndexedRows(train_dataset.select_columns(["product_name"]), indices)

    # 3. Optimizer and schedule
    global_batch = args.train_batch_size * accelerator.num_processes
    order = EpochOrder(len(indices), global_batch, seed=args.seed)
    updates_per_epoch = math.ceil(order.steps_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch if args.num_train_epochs else 3000
    lr_scale = global_batch * args.gradient_accumulation_steps if args.scale_lr else 1
    groups = parameter_groups(
        unet, text_encoder, projection,
        learning_rate=args.learning_rate * lr_scale,
        text_encoder_learning_rate=args.text_encoder_learning_rate * lr_scale,
        projection_learning_rate=None if args.projection_learning_rate is None else args.projection_learning_rate * lr_scale,
        weight_decay=args.adam_weight_decay,
    )
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from err
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    trained_models = [unet, text_encoder] + ([projection] if projection is not None else [])
    prepared = accelerator.prepare(*trained_models, optimizer, lr_scheduler)
    unet, text_encoder = prepared[0], prepared[1]
    if projection is not None:
        projection = prepared[2]
    optimizer, lr_scheduler = prepared[-2], prepared[-1]
    trained_models = [unet, text_encoder] + ([projection] if projection is not None else [])
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    if accelerator.is_main_process:
        from diffusers_product2img.training.model_card import redact_hyperparameters

        accelerator.init_trackers("product2img", config=redact_hyperparameters(
            {k: v for k, v in vars(args).items() if v is not None}))

    # 4. Resume
    global_step = 0
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint == "latest":
            found = _checkpoints(args.output_dir)
            path = os.path.join(args.output_dir, found[-1]) if found else None
        else:
            path = args.resume_from_checkpoint
        if path is None or not os.path.isdir(path):
            logger.info(f"Checkpoint {args.resume_from_checkpoint!r} does not exist: starting a new training run")
        else:
            logger.info(f"Resuming from {path}")
            accelerator.load_state(path)
            global_step = int(os.path.basename(os.path.normpath(path)).split("-")[1])
            guard.restore()

    cba = CBAConfig(enabled=use_cba, weight=args.cba_weight, temperature=args.cba_temperature,
                    gather=not args.no_gather_features)
    accum = args.gradient_accumulation_steps
    sampler = MicroBatchSampler(global_step * accum, args.max_train_steps * accum, args.train_batch_size,
                                accelerator.num_processes, accelerator.process_index)
    dataloader = torch.utils.data.DataLoader(
        _MappedPositions(loader_rows, order), batch_sampler=sampler, collate_fn=collator,
        num_workers=args.dataloader_num_workers,
    )

    logger.info("***** Running training *****")
    logger.info(f"  Examples = {len(indices)}, global batch = {global_batch} x {accum} accumulation")
    logger.info(f"  Optimizer steps = {args.max_train_steps} (starting at {global_step}); CBA = {use_cba}")
    for g in optimizer.param_groups:
        logger.info(f"  group {g['name']}: {sum(p.numel() for p in g['params'])} parameters, "
                    f"lr {g.get('initial_lr', g['lr']):.2e}")
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    sums: dict[str, float] = {}
    for batch in dataloader:
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with accelerator.accumulate(*trained_models):
            out = training_step(
                batch, unet=unet, text_encoder=text_encoder, noise_scheduler=noise_scheduler,
                vae_scaling_factor=vae_scaling_factor, seed=args.seed, projection=projection, vae=vae,
                clip_model=clip_model, cba=cba, weight_dtype=weight_dtype,
            )
            accelerator.backward(out.loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
            optimizer.step()
            guard.restore()  # AdamW's weight decay must not move the frozen embedding rows
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        for k, v in out.logs().items():
            sums[k] = sums.get(k, 0.0) + v / accum
        if not accelerator.sync_gradients:
            continue

        global_step += 1
        progress.update(1)
        logs = {k: accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item() for k, v in sums.items()}
        sums = {}
        for g in optimizer.param_groups:
            logs[f"lr/{g['name']}"] = g["lr"]
        accelerator.log(logs, step=global_step)
        progress.set_postfix(loss=logs["loss"])
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args, global_step)
        if (accelerator.is_main_process and validation_rows and args.validation_steps
                and global_step % args.validation_steps == 0 and global_step < args.max_train_steps):
            log_validation(vae, text_encoder, tokenizer, unet, inference_scheduler, args, accelerator,
                           validation_rows, global_step)
        if step_callback is not None:
            step_callback(global_step, logs)
        if global_step >= args.max_train_steps:
            break

    # 5. The output folder
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_output(args, accelerator, pipe, unet, text_encoder, projection, inference_scheduler, guard,
                    validation_rows, weight_dtype, num_examples=len(indices), global_step=global_step)
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # end_training() would also destroy the process group, which a
        tracker.finish()  # driver calling train() once per IDR round still needs; main() does that last
    return str(output_dir)


def save_output(args, accelerator, pipe, unet, text_encoder, projection, scheduler, guard, validation_rows,
                weight_dtype, num_examples, global_step):
    output_dir = Path(args.output_dir)
    unet = accelerator.unwrap_model(unet)
    text_encoder = accelerator.unwrap_model(text_encoder)
    guard.restore()
    guard.remove()
    assert guard.frozen_rows_unchanged()
    vae = pipe.vae
    if weight_dtype != torch.float32:  # the frozen VAE was cast for speed: save the original weights
        vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision,
                                            variant=args.variant)

    grid_name = None
    if validation_rows:
        grid = log_validation(pipe.vae, text_encoder, pipe.tokenizer, unet, scheduler, args, accelerator,
                              validation_rows, global_step, final=True)
        grid.save(output_dir / VALIDATION_GRID)
        grid_name = VALIDATION_GRID
    if projection is not None:
        accelerator.unwrap_model(projection).save_pretrained(output_dir / CBA_PROJECTION_DIR)
    if args.use_lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from diffusers.utils.peft_utils import recurse_remove_peft_layers
        from peft.utils import get_peft_model_state_dict

        # The <background> row is in the pipeline's text encoder and learned_embeds.safetensors, not in the LoRA file.
        unet_lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, save_embedding_layers=False))
        te_lora = None
        if args.text_encoder_lora:
            te_lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder, save_embedding_layers=False))
        Product2ImgPipeline.save_lora_weights(output_dir, unet_lora_layers=unet_lora, text_encoder_lora_layers=te_lora,
                                              weight_name=LORA_WEIGHTS_NAME)
        unet.unload_lora()  # the pipeline folder keeps the base weights; the adapters load on top
        if args.text_encoder_lora:
            recurse_remove_peft_layers(text_encoder)
            for attr in ("peft_config", "_hf_peft_config_loaded"):
                if hasattr(text_encoder, attr):
                    delattr(text_encoder, attr)
    out = Product2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                              scheduler=scheduler, background_token=args.background_token)
    out.save_pretrained(output_dir)
    dataset = args.dataset_name or args.train_data_dir or "a datasets.Dataset passed to train()"
    if args.dataset_config_name:
        dataset = f"{dataset} (config {args.dataset_config_name})"
    save_model_card(
        output_dir, base_model=args.pretrained_model_name_or_path, dataset=dataset,
        hyperparameters=_hyperparameters(args), background_token=args.background_token, cba=not args.no_cba,
        cba_weight=args.cba_weight, cba_temperature=args.cba_temperature,
        clip_model=None if args.no_cba else args.clip_model_name_or_path, lora=args.use_lora,
        text_encoder_lora=args.text_encoder_lora, validation_grid=grid_name,
        validation_names=[r["product_name"] for r in validation_rows or []], num_examples=num_examples,
        repo_id=args.hub_model_id,
    )
    if args.push_to_hub:
        push_output_to_hub(output_dir, args.hub_model_id, private=args.hub_private or None)  # token: HF_TOKEN


def round_trainer(base_args: list[str] | argparse.Namespace):
    """A ``TrainRound`` for ``diffusers_product2img.idr.rounds``: round i trains from round i-1's folder.

    ``base_args`` are this script's flags shared by all rounds (data, CLIP model, batch size, ...),
    as a list of strings or parsed; each round sets ``--train_ids_file`` (the kept ids, written to
    ``<output_dir>/train_ids.txt``), ``--max_train_steps``, ``--output_dir`` and, from round 2 on,
    ``--pretrained_model_name_or_path``. The feature cache and the exported EPBD are shared by all
    rounds (keyed on the full train split).
    """
    if not isinstance(base_args, argparse.Namespace):
        base_args = parse_args([str(a) for a in base_args])

    def train_round(round_index: int, kept_ids: list[str], init_model: str | None, steps: int, output_dir) -> Path:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        ids_file = output_dir / "train_ids.txt"
        ids_file.write_text("\n".join(map(str, kept_ids)) + "\n", encoding="utf-8")
        args = copy.deepcopy(base_args)
        args.train_ids_file, args.max_train_steps, args.output_dir = str(ids_file), int(steps), str(output_dir)
        args.num_train_epochs, args.idr_rounds, args.push_to_hub = None, 0, False  # rounds publish themselves
        if init_model is not None:
            args.pretrained_model_name_or_path = str(init_model)
        logging.getLogger(__name__).info(
            f"IDR round {round_index}: {len(kept_ids)} samples, {steps} steps, from {init_model or 'the base model'}")
        return Path(train(args))

    return train_round


def idr_round_card(rec, total_train: int, validation_grid: str | None) -> str:
    """The IDR section of a round's model card: round, data kept, the feedback used for selection."""
    lines = [
        "", f"## IDR-LMM round {rec.round}", "",
        f"- Training samples kept: **{rec.kept}** of {rec.candidates} scored in this round "
        f"({total_train} in the full train split); {rec.failed} LMM scores failed and were not kept.",
        f"- Steps this round: {rec.steps}. Score histogram (1-5): {rec.score_histogram}.",
        "- Feedback used to sharpen this round's selection (f_{i-1}): "
        + (f"\n\n  > {rec.feedback_used}" if rec.feedback_used else "none (first round)."),
        "- Feedback from this round's validation outputs (f_i): "
        + (f"\n\n  > {rec.feedback}" if rec.feedback else "none."),
    ]
    if validation_grid:
        lines += ["", f"![validation outputs of round {rec.round}]({validation_grid})"]
    return "\n".join(lines) + "\n"


def run_idr_training(args) -> Path:
    """Algorithm 1 end to end: LMM selection, training, evaluation and feedback for ``--idr_rounds``.

    The round logic lives in ``diffusers_product2img.idr.rounds``; this function wires it to this
    script's training, to the LMM scorer, to the EPBD export (one ``idr_round_<i>`` config per round)
    and to the Hub (branch ``round-<i>`` per round, ``main`` = latest). Resumable: run it again with
    the same flags after a crash.
    """
    from accelerate import PartialState

    from diffusers_product2img.data.export import add_round_config, read_manifest
    from diffusers_product2img.data.layout import EPBDLayout, round_config_name
    from diffusers_product2img.idr.hub import RoundPublisher
    from diffusers_product2img.idr.rounds import data_size_plot, round_summary_rows, run_idr
    from diffusers_product2img.idr.scorer import (
        OpenAICompatibleScorer,
        prompts_from_args,
        scorer_config_from_args,
    )

    raw = Path(args.train_data_dir or "")
    if not _is_raw_epbd(raw):
        raise ValueError("--idr_rounds needs --train_data_dir pointing at a raw EPBD folder (metadata.csv, images/, "
                         "cutouts/): each round's LMM scores are written into its scores/ folder")
    state = PartialState()
    work = Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    config = IDRConfig(rounds=args.idr_rounds, round_steps=args.round_steps, gamma=args.gamma,
                       validation_limit=args.num_validation_products or None)
    total_train = len(EPBDLayout(raw).split_samples("train"))
    publisher = RoundPublisher(args.hub_model_id, args.hub_dataset_id, private=args.hub_private or None) \
        if args.push_to_hub else None
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")
    prompts, examples = prompts_from_args(args)
    scorer = OpenAICompatibleScorer(scorer_config_from_args(args), store=work / "lmm_results.jsonl",
                                    prompts=prompts, examples=examples) if state.is_main_process else None

    def generate_validation(model_dir: Path, samples) -> list[Image.Image]:
        pipe = Product2ImgPipeline.from_pretrained(model_dir).to(state.device)
        pipe.set_progress_bar_config(disable=True)
        rows = [{"product_name": s.product_name, "image": Image.open(raw / s.image_file),
                 "cutout": Image.open(raw / s.cutout_file)} for s in samples]
        return generate_validation_images(pipe, rows, args)

    def on_round_end(rec, idr_state) -> dict:
        export_dir = exported_epbd_dir(args)
        name = round_config_name(rec.round)
        if export_dir.exists() and name not in read_manifest(export_dir)["configs"]:
            add_round_config(export_dir, raw, rec.round)
        grid = Path(rec.model_dir) / "validation_grid.png"
        card = Path(rec.model_dir) / "README.md"
        if card.exists() and f"## IDR-LMM round {rec.round}" not in card.read_text(encoding="utf-8"):
            text = card.read_text(encoding="utf-8") + idr_round_card(rec, total_train, grid.name if grid.exists() else None)
            tmp = card.with_name(".README.md.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, card)
        data_size_plot(idr_state, work / "idr_rounds.png", total_train=total_train)
        summary = work / "idr_rounds.json"
        summary.with_name(".idr_rounds.json.tmp").write_text(json.dumps(round_summary_rows(idr_state), indent=2))
        os.replace(summary.with_name(".idr_rounds.json.tmp"), summary)
        logger.info(f"IDR round {rec.round}: {rec.kept}/{rec.candidates} kept; feedback: {rec.feedback}")
        if publisher is not None:
            publisher.publish_model(rec.round, rec.model_dir)
            if export_dir.exists():
                publisher.publish_dataset_config(export_dir, name)
        return {"export_dir": str(export_dir) if export_dir.exists() else None}

    try:
        final = run_idr(
            config, data_root=raw, scorer=scorer, train_round=round_trainer(args),
            generate_validation=generate_validation, work_dir=work, init_model=None, on_round_end=on_round_end,
            is_main_process=state.is_main_process, wait_for_everyone=state.wait_for_everyone,
        )
    finally:
        if scorer is not None:
            scorer.close()
    return Path(final.rounds[config.rounds].model_dir)


def main(args=None):
    from accelerate import PartialState

    args = args if args is not None else parse_args()
    if args.no_idr:  # Table 3's control: the same total steps, every train sample
        args.max_train_steps, args.num_train_epochs = sum(args.round_steps), None
    output_dir = run_idr_training(args) if args.idr_rounds else train(args)
    PartialState().destroy_process_group()
    return output_dir


if __name__ == "__main__":
    main()
