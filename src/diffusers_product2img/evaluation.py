"""``product2img evaluate``: run a trained model on an EPBD split and write a Table-1-like table.

Example::

    product2img evaluate --model ./product2img-round3 --dataset ./epbd-export --split test \\
        --output-dir eval/ --limit 500

The model generates every product of the split (the product on white + its mask, at ``--size``;
image ``i`` seeded ``--seed + i``, Euler Ancestral, ``--steps``), through the same harness as
``product2img benchmark`` (:func:`diffusers_product2img.baselines.run_benchmark`); the images are
then scored with :func:`diffusers_product2img.metrics.evaluate_images`. It writes::

    OUT/<row>/<id>.png         the generated images (an interrupted run resumes; --overwrite redoes)
    OUT/benchmark.json         settings, model, prompts, timings, sample ids
    OUT/metrics.md / .json     the table (FID or FD-CLIP, PickScore, Aesthetics, CLIP-c-I, CLIP-c-B,
                               exact product pixels, product MAE, object expansion)

Rows from earlier runs into the same ``OUT`` are kept, so evaluating several models into one folder
builds one table. On EPBD-synth (categories known to :mod:`diffusers_product2img.data.synth`), the
weight-free stand-ins of :mod:`diffusers_product2img.demo.standins` (scene accuracy, defect rate,
FD-BG) are written too, as ``standins.md`` / ``standins.json`` (``--no-standins`` skips them).

The checkpoint's format picks the pipeline (``--method auto``): a Product2Img folder runs through
``Product2ImgPipeline`` with the product name only, an SD-Inpainting folder through
``StableDiffusionInpaintPipeline`` with the paper's uniform template.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["register_commands", "run_evaluate", "evaluate_model"]

METHOD_CHOICES = ("auto", "product2img", "epbd-ft", "sd-inpainting")


def _resolve_method(method: str, model: str) -> str:
    if method != "auto":
        return method
    from .baselines.methods import checkpoint_class_name

    fmt = checkpoint_class_name(model)
    if fmt == "Product2ImgPipeline":
        return "product2img"
    if fmt == "StableDiffusionInpaintPipeline":
        return "sd-inpainting"
    raise ValueError(f"{model!r} is a {fmt}; evaluate runs Product2ImgPipeline or StableDiffusionInpaintPipeline "
                     "checkpoints")


def _synth_categories(samples) -> bool:
    from .data.synth import CATEGORIES

    return all(s.category in CATEGORIES for s in samples)


def _slug(text: str) -> str:
    """A folder name for a table row: ``"Product2Img (round 3)"`` -> ``"product2img-round-3"``."""
    cleaned = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(part for part in cleaned.split("-") if part) or "model"


def _check_same_model(out_dir: Path, folder: str, model: str, overwrite: bool) -> None:
    """Refuse to reuse a row's images that another model generated (they would be silently re-scored)."""
    manifest = out_dir / "benchmark.json"
    if overwrite or not manifest.exists():
        return
    record = json.loads(manifest.read_text(encoding="utf-8")).get("methods", {}).get(folder) or {}
    previous = (record.get("describe") or {}).get("model")
    if previous is not None and previous != model and (out_dir / folder).is_dir():
        raise ValueError(f"{out_dir / folder} holds images of another model ({previous}); give this one another "
                         "--name, or --overwrite to regenerate")


def write_standins(out_dir: str | os.PathLike, row_name: str, folder: str, samples) -> dict:
    """Score ``out_dir/<folder>/<id>.png`` with the EPBD-synth stand-ins; add a row to ``standins.md/.json``."""
    from PIL import Image

    from .demo.report import format_table
    from .demo.standins import BG_FEATURES, STANDIN_COLUMNS, standin_metrics

    out = Path(out_dir)
    generated = []
    for s in samples:
        with Image.open(out / folder / f"{s.id}.png") as im:
            generated.append(im.convert("RGB"))
    result = standin_metrics(generated, [s.reference for s in samples], [s.product_image for s in samples],
                             [s.product_mask for s in samples], [s.category for s in samples])
    path = out / "standins.json"
    rows = json.loads(path.read_text(encoding="utf-8")).get("rows", {}) if path.exists() else {}
    rows[row_name] = result
    path.write_text(json.dumps({"features": BG_FEATURES, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    header = ["Method"] + [f"{h} {'↑' if b == 'higher' else '↓'}" for _, h, b, _, _ in STANDIN_COLUMNS]
    body = []
    for name, r in rows.items():
        cells = [name]
        for key, _, _, mult, dec in STANDIN_COLUMNS:
            v = r["metrics"].get(key)
            cells.append("-" if v is None else f"{v * mult:.{dec}f}")
        body.append(cells)
    (out / "standins.md").write_text(
        format_table(header, body) + "\n\nEPBD-synth stand-ins (no downloaded weights): scene accuracy = "
        "classify_scene(generated) == category_scene(category); defects = detect_defects >= 0.5 (plain white, "
        f"watermark, clutter); FD-BG = Fréchet distance on {BG_FEATURES}\n", encoding="utf-8")
    return result


def evaluate_model(model: str, dataset: str, out_dir: str | os.PathLike, *, split: str = "test",
                   config: str | None = None, limit: int | None = None, resolution: int = 512,
                   num_inference_steps: int = 30, guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 1,
                   method: str = "auto", row_name: str | None = None, paste_product: bool = True,
                   overwrite: bool = False, eval_config=None, skip_metrics: bool = False, standins: bool = True,
                   device: str = "cpu", dtype: str = "float32") -> dict:
    """Generate ``split`` of ``dataset`` with ``model`` and score it (see the module docstring).

    Returns :func:`~diffusers_product2img.baselines.run_benchmark`'s result, plus ``standins`` (or ``None``).
    """
    from .baselines.benchmark import LazyMethod, load_benchmark_samples, run_benchmark
    from .baselines.methods import METHODS, build_method

    name = _resolve_method(method, model)
    display = row_name or METHODS[name].display_name
    folder = _slug(display)
    _check_same_model(Path(out_dir), folder, os.fspath(model), overwrite)
    samples = load_benchmark_samples(dataset, split, config=config, limit=limit, resolution=resolution)

    def build():
        loaded = build_method(name, model, device=device, dtype=dtype, paste_product=paste_product)
        loaded.display_name = display  # the table's row name
        return loaded

    lazy = LazyMethod(folder, build, display)
    result = run_benchmark(
        [lazy], samples, out_dir, resolution=resolution, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, paste_product=paste_product,
        overwrite=overwrite, eval_config=eval_config, skip_metrics=skip_metrics,
        extra_settings={"model": os.fspath(model), "dataset": os.fspath(dataset), "config": config, "split": split,
                        "limit": limit, "device": device, "dtype": dtype},
    )
    result["standins"] = None
    if standins and _synth_categories(samples):
        result["standins"] = write_standins(out_dir, display, folder, samples)
    return result


def run_evaluate(args: argparse.Namespace) -> int:
    from .baselines.commands import metrics_setup
    from .cli import CLIError

    eval_config = metrics_setup(args)
    try:
        result = evaluate_model(
            args.model, args.dataset, args.output_dir, split=args.split, config=args.config, limit=args.limit,
            resolution=args.size, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
            seed=args.seed, batch_size=args.gen_batch_size, method=args.method, row_name=args.name,
            paste_product=not args.no_paste_product, overwrite=args.overwrite, eval_config=eval_config,
            skip_metrics=args.skip_metrics, standins=not args.no_standins, device=args.device, dtype=args.dtype,
        )
    except (OSError, ValueError) as err:
        raise CLIError(str(err).splitlines()[0]) from None
    if result["table"]:
        print(Path(result["table"]["markdown"]).read_text(encoding="utf-8"))
        print(f"wrote {result['table']['markdown']} and {result['table']['json']}")
    if result["standins"] is not None:
        print(Path(args.output_dir, "standins.md").read_text(encoding="utf-8"))
    return 0


def register_commands(subparsers) -> None:
    """Add ``evaluate`` to the ``product2img`` CLI's subparsers."""
    from .baselines.commands import add_sampling_arguments, default_device
    from .metrics.commands import add_metric_model_arguments

    p = subparsers.add_parser(
        "evaluate",
        help="generate an EPBD split with a model and write the Table-1 metrics (markdown + JSON)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="Product2Img (or SD-Inpainting) folder or Hub repo id")
    p.add_argument("--dataset", required=True, help="exported EPBD folder, Hub dataset id, or raw EPBD folder")
    p.add_argument("--config", default=None, help="dataset config name (exported datasets)")
    p.add_argument("--split", default="test", help="default %(default)s (EPBD also has test_unseen)")
    p.add_argument("--limit", type=int, default=None, help="first N samples of the split")
    p.add_argument("--output-dir", "--out", dest="output_dir", required=True,
                   help="folder for the images, benchmark.json and metrics.md/.json")
    p.add_argument("--method", choices=METHOD_CHOICES, default="auto",
                   help="pipeline and text: auto = from the checkpoint's format (default)")
    p.add_argument("--name", default=None, help="row name in the table (default: the method's, e.g. Product2Img)")
    add_sampling_arguments(p)
    p.add_argument("--no-standins", action="store_true", help="no EPBD-synth stand-in table")
    add_metric_model_arguments(p)  # also --device / --dtype, used for generation as well
    p.set_defaults(func=run_evaluate, device=default_device())
