"""The ``product2img`` command line.

``product2img generate`` turns product cutouts and names into product photos, one product at a time
or a whole catalogue from a CSV/JSONL file. Other subcommands (datasets, evaluation, benchmarks)
are registered by their own modules. Errors are printed as one line, not a traceback.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main", "build_parser", "CLIError"]


class CLIError(Exception):
    """An error shown to the user as one line (exit code 2)."""


@dataclass
class GenerationJob:
    image: Path
    name: str
    mask: Path | None
    stem: str


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 512x512, got {text!r}") from None
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise argparse.ArgumentTypeError(f"--size {text}: width and height must be positive multiples of 8")
    return width, height


def _read_jobs(path: Path) -> list[GenerationJob]:
    """Rows of (image, name[, mask][, id]) from a CSV (with a header) or JSONL file.

    Relative image paths are resolved against the file's folder.
    """
    if not path.is_file():
        raise CLIError(f"batch file not found: {path}")
    rows: list[dict] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise CLIError(f"{path}:{n}: not valid JSON ({err.msg})") from None
    elif path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise CLIError(f"batch file must be .csv or .jsonl, got {path.name}")
    jobs, stems = [], set()
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("image") or not str(row.get("name", "")).strip():
            raise CLIError(f"{path}: row {n} needs an 'image' and a non-empty 'name'")
        image = (path.parent / row["image"]).resolve()
        mask = (path.parent / row["mask"]).resolve() if row.get("mask") else None
        stem = str(row.get("id") or image.stem)
        if stem in stems:
            stem = f"{stem}-{n}"
        stems.add(stem)
        jobs.append(GenerationJob(image, str(row["name"]), mask, stem))
    if not jobs:
        raise CLIError(f"{path} holds no rows")
    return jobs


def _open_image(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise CLIError(f"{what} not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise CLIError(f"{what} {path} is not a readable image ({err.__class__.__name__})") from None


def _save_png_atomic(image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _load_pipeline(model: str, device: str, dtype: str):
    import torch

    from .pipeline_product2img import Product2ImgPipeline

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    try:
        pipe = Product2ImgPipeline.from_pretrained(model, torch_dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load a Product2Img model from {model!r}: {str(err).splitlines()[0]}") from None
    return pipe.to(device)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from .placement import has_alpha

    if args.batch:
        jobs = _read_jobs(Path(args.batch))
    else:
        if not args.image or not args.name:
            raise CLIError("give --image and --name, or --batch FILE")
        jobs = [GenerationJob(Path(args.image), args.name, Path(args.mask) if args.mask else None, Path(args.image).stem)]
    # Read every input before loading the model: a bad file fails in a second, not after an hour.
    inputs = [
        (job, _open_image(job.image, "image"), _open_image(job.mask, "mask") if job.mask else None) for job in jobs
    ]
    for job, image, mask in inputs:
        if not job.name.strip():
            raise CLIError(f"{job.image}: the product name is empty")
        if mask is None and not has_alpha(image):
            raise CLIError(f"{job.image} has no alpha channel: give an RGBA cutout, or an RGB image with --mask")
    if args.quiet:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    width, height = args.size
    pipe = _load_pipeline(args.model, args.device, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for index, (job, image, mask) in enumerate(tqdm(inputs, desc="products", unit="product", disable=args.quiet)):
        generator = [
            torch.Generator().manual_seed(args.seed + index * args.num_images + k) for k in range(args.num_images)
        ]
        try:
            result = pipe(
                job.name, image, mask, height=height, width=width, num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale, num_images_per_prompt=args.num_images, generator=generator,
            )
        except (ValueError, TypeError) as err:
            raise CLIError(f"{job.image}: {err}") from None
        for k, generated in enumerate(result.images):
            _save_png_atomic(generated, out_dir / f"{job.stem}_{k}.png")
            written += 1
    if not args.quiet:
        print(f"wrote {written} images to {out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="product2img", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate product photos from cutouts and product names")
    gen.add_argument("--model", required=True, help="Product2Img folder or Hub repo id")
    gen.add_argument("--image", help="product cutout (RGBA) or RGB image with --mask")
    gen.add_argument("--mask", help="product mask: white = product to keep")
    gen.add_argument("--name", help="the product name")
    gen.add_argument("--batch", help="CSV (header: image,name[,mask][,id]) or JSONL of rows to generate")
    gen.add_argument("--out", default="product2img_outputs", help="output folder for the PNGs")
    gen.add_argument("--num-images", type=int, default=1, help="images per product")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=30, help="denoising steps")
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--size", type=_parse_size, default=(512, 512), help="WIDTHxHEIGHT, multiples of 8")
    gen.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    for register in _command_modules():
        register(sub)
    return parser


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _command_modules() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands contributed by the package's other modules (datasets, metrics, benchmarks)."""
    from . import evaluation
    from .baselines import commands as baseline_commands
    from .data import commands as data_commands
    from .metrics import commands as metric_commands

    return [data_commands.register_commands, metric_commands.register_commands, evaluation.register_commands,
            baseline_commands.register_commands]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as err:
        print(f"product2img {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
