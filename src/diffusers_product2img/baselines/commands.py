"""``product2img benchmark``: the methods of the paper's Table 1 on one EPBD split, one table.

Example::

    product2img benchmark --dataset ./epbd-export --split test --out bench/ \\
        --methods sd-inpainting,controlnet-canny,ip-adapter,epbd-ft,product2img \\
        --model-epbd-ft ./epbd-ft --model-product2img ./product2img-round3 --limit 500

Every method gets the same products (the product on white + its mask, at ``--size``), the same
seeds (image i: ``--seed + i``), the same sampler (Euler Ancestral), steps and guidance scale. The
baselines read the paper's uniform prompt "{Product Name}, high-quality and appropriate background";
Product2Img reads the product name only. Images go to ``OUT/<method>/<id>.png``; the run is described
in ``OUT/benchmark.json``; the table is ``OUT/metrics.md`` / ``metrics.json``. Existing images are
reused, so an interrupted run resumes (``--overwrite`` regenerates).
"""

from __future__ import annotations

import argparse
import logging
import os

__all__ = ["register_commands", "run_benchmark_command", "parse_square_size", "default_device", "eval_config_from_args",
           "add_sampling_arguments", "metrics_setup"]

logger = logging.getLogger(__name__)

# Kept here (not imported from .methods) so that building the CLI parser does not import diffusers.
METHOD_NAMES = ("sd-inpainting", "controlnet-canny", "ip-adapter", "epbd-ft", "product2img")
DEFAULT_INPAINTING_MODEL = "stable-diffusion-v1-5/stable-diffusion-inpainting"


def parse_square_size(text: str) -> int:
    """``--size`` values: ``512`` or ``512x512`` (EPBD samples are square), a positive multiple of 8."""
    parts = text.lower().split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 512 or 512x512, got {text!r}") from None
    if len(sides) not in (1, 2) or len(set(sides)) != 1:
        raise argparse.ArgumentTypeError(f"--size {text}: EPBD samples are prepared square, give e.g. 512x512")
    if sides[0] <= 0 or sides[0] % 8:
        raise argparse.ArgumentTypeError(f"--size {text}: must be a positive multiple of 8")
    return sides[0]


def _parse_methods(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {','.join(METHOD_NAMES)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--methods lists a method twice: {text}")
    return names


def default_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu`` (the ``--device`` default of benchmark and evaluate)."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def add_sampling_arguments(parser: argparse.ArgumentParser, title: str = "sampling") -> None:
    """The generation flags shared by ``benchmark`` and ``evaluate`` (steps, guidance, size, seeds, ...)."""
    s = parser.add_argument_group(title)
    s.add_argument("--steps", type=int, default=30, help="denoising steps (default 30, as in the paper)")
    s.add_argument("--guidance-scale", type=float, default=7.5)
    s.add_argument("--size", "--resolution", dest="size", type=parse_square_size, default=512,
                   help="square canvas side, e.g. 512 or 512x512 (default 512)")
    s.add_argument("--seed", type=int, default=0, help="image i (of every method) uses seed + i (default 0)")
    s.add_argument("--gen-batch-size", type=int, default=1, help="products per pipeline call (default 1)")
    s.add_argument("--no-paste-product", action="store_true",
                   help="do not paste the original product pixels back (for every method, Product2Img included)")
    s.add_argument("--overwrite", action="store_true", help="regenerate images that already exist in the output")
    s.add_argument("--skip-metrics", action="store_true",
                   help="only write the images and benchmark.json (score later with evaluate-images)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def metrics_setup(args: argparse.Namespace):
    """Check the metric flags (one clear ``CLIError``) and honour ``--quiet``; the ``EvalConfig``, or
    ``None`` with ``--skip-metrics``. Runs before any model or image is loaded."""
    from ..cli import CLIError

    try:
        eval_config = None if args.skip_metrics else eval_config_from_args(args)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if args.quiet:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    return eval_config


def eval_config_from_args(args: argparse.Namespace):
    """The :class:`~diffusers_product2img.metrics.evaluate.EvalConfig` of the shared metric-model flags."""
    from ..metrics.evaluate import ALL_METRICS, EvalConfig

    metrics = tuple(m.strip() for m in args.metrics.split(",")) if args.metrics else ALL_METRICS
    return EvalConfig(
        clip_model=args.clip_model, pickscore_model=args.pickscore_model,
        pickscore_processor=args.pickscore_processor or None,
        aesthetic_weights=None if args.aesthetic_weights == "random" else args.aesthetic_weights,
        fid=args.fid, inception_weights=args.inception_weights, metrics=metrics, ring_width=args.ring_width,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
    )


def run_benchmark_command(args: argparse.Namespace) -> int:
    from ..cli import CLIError
    from .benchmark import LazyMethod, load_benchmark_samples, run_benchmark
    from .methods import METHODS, build_method

    # Fail on what can be checked before any model or image is loaded.
    for name in args.methods:
        if METHODS[name].default_model is None and not getattr(args, _model_dest(name)):
            raise CLIError(f"--methods includes {name}: give its checkpoint with --model-{name} PATH_OR_REPO")
    eval_config = metrics_setup(args)
    try:
        samples = load_benchmark_samples(args.dataset, args.split, config=args.config, limit=args.limit,
                                         resolution=args.size)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot read {args.split!r} of {args.dataset}: {str(err).splitlines()[0]}") from None

    paste = not args.no_paste_product
    options = {
        "paste_product": paste,
        "controlnet_model": args.controlnet_model,
        "controlnet_conditioning_scale": args.controlnet_scale,
        "canny_low_threshold": args.canny_low,
        "canny_high_threshold": args.canny_high,
        "ip_adapter": args.ip_adapter,
        "ip_adapter_subfolder": args.ip_adapter_subfolder,
        "ip_adapter_weight": args.ip_adapter_weight,
        "ip_adapter_scale": args.ip_adapter_scale,
        "prompt": args.epbd_ft_prompt,
    }

    def loader(name: str):
        def build():
            try:
                return build_method(name, getattr(args, _model_dest(name)), device=args.device, dtype=args.dtype,
                                    **options)
            except ValueError as err:
                raise CLIError(f"{name}: {err}") from None

        return LazyMethod(name, build, METHODS[name].display_name)

    try:
        result = run_benchmark(
            [loader(name) for name in args.methods], samples, args.out, resolution=args.size,
            num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
            batch_size=args.gen_batch_size, paste_product=paste, overwrite=args.overwrite,
            eval_config=eval_config, skip_metrics=args.skip_metrics,
            extra_settings={"dataset": os.fspath(args.dataset), "config": args.config, "split": args.split,
                            "limit": args.limit, "device": args.device, "dtype": args.dtype},
        )
    except ValueError as err:
        raise CLIError(str(err)) from None
    if result["table"]:
        with open(result["table"]["markdown"], encoding="utf-8") as f:
            print(f.read())
        print(f"wrote {result['table']['markdown']} and {result['table']['json']}")
    if not args.quiet:
        for name, record in result["methods"].items():
            print(f"{name}: {record['n_images']} images in {os.path.join(args.out, record['folder'])}"
                  + (f" ({record['reused']} reused)" if record.get("reused") else ""))
    return 0


def _model_dest(name: str) -> str:
    return "model_" + name.replace("-", "_")


def register_commands(subparsers) -> None:
    """Add ``benchmark`` to the ``product2img`` CLI's subparsers."""
    p = subparsers.add_parser(
        "benchmark",
        help="run SD-Inpainting, ControlNet (canny), IP-Adapter, EPBD-FT and Product2Img on one split; one table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--methods", type=_parse_methods, default=list(METHOD_NAMES),
                   help=f"comma list of {','.join(METHOD_NAMES)} (default: all)")
    p.add_argument("--dataset", required=True, help="exported EPBD folder, Hub dataset id, or raw EPBD folder")
    p.add_argument("--config", default=None, help="dataset config name (exported datasets)")
    p.add_argument("--split", default="test", help="default %(default)s (EPBD also has test_unseen)")
    p.add_argument("--limit", type=int, default=None, help="first N samples of the split")
    p.add_argument("--out", required=True, help="output folder: <method>/<id>.png, benchmark.json, metrics.md")

    g = p.add_argument_group("models (Hub ids or local folders)")
    for name in METHOD_NAMES:
        default = DEFAULT_INPAINTING_MODEL if name in ("sd-inpainting", "controlnet-canny", "ip-adapter") else None
        what = "base SD-Inpainting checkpoint" if default else "checkpoint (required when the method is run)"
        g.add_argument(f"--model-{name}", dest=_model_dest(name), default=default,
                       help=f"{name}: {what}" + (" (default %(default)s)" if default else ""))
    g.add_argument("--controlnet-model", default="lllyasviel/control_v11p_sd15_canny", help="default %(default)s")
    g.add_argument("--controlnet-scale", type=float, default=1.0, help="controlnet_conditioning_scale (default 1.0)")
    g.add_argument("--canny-low", type=float, default=100, help="canny low threshold (default 100)")
    g.add_argument("--canny-high", type=float, default=200, help="canny high threshold (default 200)")
    g.add_argument("--ip-adapter", default="h94/IP-Adapter", help="IP-Adapter repo or folder (default %(default)s)")
    g.add_argument("--ip-adapter-subfolder", default="models", help="default %(default)s")
    g.add_argument("--ip-adapter-weight", default="ip-adapter_sd15.safetensors", help="default %(default)s")
    g.add_argument("--ip-adapter-scale", type=float, default=0.5, help="default %(default)s")
    g.add_argument("--epbd-ft-prompt", choices=("auto", "template", "name"), default="auto",
                   help="auto: product name for a Product2Img-format checkpoint, the uniform template for an "
                        "SD-Inpainting-format one (default)")

    add_sampling_arguments(p, "sampling (the same for every method)")

    from ..metrics.commands import add_metric_model_arguments

    add_metric_model_arguments(p)  # also --device / --dtype, used for generation as well
    p.set_defaults(func=run_benchmark_command, device=default_device())
