"""Run several background methods on the same test samples and write one Table-1-like table.

:func:`load_benchmark_samples` reads a split of EPBD (an exported folder or Hub dataset through
``datasets.load_dataset``, or a raw EPBD folder through :mod:`diffusers_product2img.data.layout`) and
brings every sample to the benchmark size with :func:`~diffusers_product2img.data.preprocessing.prepare_example`,
the geometry training uses. Each method is given the product on white (no real background) and the
product mask; the real image is only the metrics' reference.

:func:`run_benchmark` runs the methods one after the other (a :class:`LazyMethod` is loaded only when
its turn comes and released afterwards, so one model at a time is in memory), with image ``i`` seeded
``seed + i`` for every method, and writes::

    out_dir/
      <method>/<id>.png     one image per sample and method (atomic writes; existing files are reused)
      benchmark.json        settings, methods (model ids, prompts), per-method timings, sample ids
      metrics.md / .json    the table, via diffusers_product2img.metrics (unless metrics are skipped)
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .methods import UNIFORM_PROMPT_TEMPLATE, BackgroundMethod

__all__ = ["BenchmarkSample", "LazyMethod", "load_benchmark_samples", "run_benchmark", "MANIFEST_NAME"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "benchmark.json"
# Settings that change the images: a folder written with other values is not reused.
_IMAGE_SETTINGS = ("resolution", "num_inference_steps", "guidance_scale", "seed", "paste_product")


@dataclass
class BenchmarkSample:
    """One test product, already at the benchmark size.

    Attributes:
        id: file-name-safe id (the output is ``<method>/<id>.png``).
        product_name: the name every method is prompted with (through its own template).
        product_image: the product on white, RGB: what every method is given.
        product_mask: L, 255 = product.
        reference: the real image (RGB), for FID and the fidelity metrics; may be ``None``.
        category: optional, carried into the manifest.
    """

    id: str
    product_name: str
    product_image: Image.Image
    product_mask: Image.Image
    reference: Image.Image | None = None
    category: str | None = None


@dataclass
class LazyMethod:
    """A method loaded on first use: ``LazyMethod("sd-inpainting", lambda: build_method(...))``."""

    name: str
    build: Callable[[], BackgroundMethod]
    display_name: str | None = None


# ------------------------------------------------------------------------------------------------
# Samples
# ------------------------------------------------------------------------------------------------


def _safe_id(value, index: int) -> str:
    text = str(value) if value not in (None, "") else f"{index:05d}"
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).lstrip(".")
    return cleaned or f"{index:05d}"


def _open(path: str) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy()


def _is_raw_epbd(path: str) -> bool:
    return os.path.isdir(path) and not os.path.exists(os.path.join(path, "README.md")) and any(
        os.path.exists(os.path.join(path, f)) for f in ("metadata.csv", "metadata.jsonl")
    )


def load_benchmark_samples(dataset: str | os.PathLike, split: str = "test", *, config: str | None = None,
                           limit: int | None = None, resolution: int = 512,
                           **load_kwargs) -> list[BenchmarkSample]:
    """The samples of one EPBD split, prepared at ``resolution`` x ``resolution``.

    Args:
        dataset: an exported EPBD folder or Hub dataset id (columns ``id``, ``product_name``,
            ``category``, ``image`` RGB, ``cutout`` RGBA, optional ``mask`` L), or a raw EPBD folder
            (``metadata.csv``, ``images/``, ``cutouts/``, optional ``masks/``).
        split: the split to run (default ``test``; EPBD also has ``test_unseen``).
        config: dataset config name (exported datasets).
        limit: keep the first ``limit`` samples (in dataset order).
        resolution: side of the square canvas (EPBD: 512).
        load_kwargs: passed to ``datasets.load_dataset`` (``revision``, ``cache_dir``, ...).
    """
    from ..data.preprocessing import prepare_example

    dataset = os.fspath(dataset)
    rows: list[dict] = []
    if _is_raw_epbd(dataset):
        from ..data.layout import EPBDLayout

        for s in EPBDLayout(dataset).split_samples(split)[:limit]:
            mask_path = os.path.join(dataset, s.mask_file) if s.mask_file else None
            rows.append({
                "id": s.id, "product_name": s.product_name, "category": s.category,
                "image": _open(os.path.join(dataset, s.image_file)),
                "cutout": _open(os.path.join(dataset, s.cutout_file)),
                "mask": _open(mask_path) if mask_path and os.path.exists(mask_path) else None,
            })
    else:
        import datasets

        path = os.path.abspath(dataset) if os.path.isdir(dataset) else dataset  # "epbd" alone means a Hub id
        ds = datasets.load_dataset(path, config, split=split, **load_kwargs)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        missing = {"product_name", "image"} - set(ds.column_names)
        if missing or not ({"cutout", "mask"} & set(ds.column_names)):
            raise ValueError(
                f"{dataset} ({split}) has columns {ds.column_names}; the benchmark needs product_name, image and "
                "a cutout (RGBA) or mask column"
            )
        rows = list(ds)
    samples, seen = [], set()
    for index, row in enumerate(rows):
        mask_or_cutout = row.get("mask") if row.get("mask") is not None else row.get("cutout")
        if mask_or_cutout is None:
            raise ValueError(f"sample {row.get('id', index)!r} has neither a mask nor a cutout")
        prepared = prepare_example(row["image"], mask_or_cutout, resolution)
        sample_id = _safe_id(row.get("id"), index)
        if sample_id in seen:
            raise ValueError(f"duplicate sample id {sample_id!r} in {dataset} ({split})")
        seen.add(sample_id)
        samples.append(BenchmarkSample(
            id=sample_id, product_name=str(row["product_name"]), product_image=prepared["product_image"],
            product_mask=prepared["mask"], reference=prepared["image"],
            category=None if row.get("category") is None else str(row["category"]),
        ))
    if not samples:
        raise ValueError(f"{dataset} has no samples in split {split!r}")
    return samples


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_png(image: Image.Image, path: Path) -> None:
    _atomic_write_bytes(path, lambda tmp: image.save(tmp, format="PNG"))


def _write_json(data: dict, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    _atomic_write_bytes(path, write)


def _release() -> None:
    """Give the accelerator memory of the method just dropped back before the next one loads."""
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _check_previous_settings(manifest_path: Path, settings: dict, overwrite: bool) -> dict:
    if not manifest_path.exists() or overwrite:
        return {}
    previous = json.loads(manifest_path.read_text(encoding="utf-8"))
    changed = {k: (previous.get("settings", {}).get(k), settings[k]) for k in _IMAGE_SETTINGS
               if previous.get("settings", {}).get(k) != settings[k]}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"{manifest_path.parent} holds images made with other settings ({detail}); use another output folder "
            "or overwrite=True (CLI --overwrite)"
        )
    return previous


def run_benchmark(
    methods: Sequence[BackgroundMethod | LazyMethod],
    samples: Sequence[BenchmarkSample],
    out_dir: str | os.PathLike,
    *,
    resolution: int = 512,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 1,
    paste_product: bool | None = None,
    overwrite: bool = False,
    eval_config=None,
    skip_metrics: bool = False,
    extra_settings: dict | None = None,
) -> dict:
    """Run every method on the same samples and seeds, save the images, compute the table.

    Args:
        methods: loaded methods, or :class:`LazyMethod` s (loaded in turn, then released).
        samples: prepared samples (:func:`load_benchmark_samples`), ``resolution`` x ``resolution``.
        out_dir: output folder (see the module docstring).
        resolution, num_inference_steps, guidance_scale: the same for every method.
        seed: image ``i`` of every method uses seed ``seed + i`` (its index in ``samples``).
        batch_size: products per pipeline call (results do not depend on it beyond float noise).
        paste_product: recorded in the manifest (the methods carry their own setting; ``None``: read
            it from the methods).
        overwrite: regenerate images that exist; without it, existing ``<method>/<id>.png`` are reused
            (an interrupted run resumes) unless the folder was made with other settings (error).
        eval_config: a :class:`diffusers_product2img.metrics.EvalConfig` (``None``: its defaults).
        skip_metrics: only images and the manifest; ``product2img evaluate-images`` can score them later.
        extra_settings: more entries for the manifest's ``settings``.

    Returns:
        the manifest (``settings``, ``methods``, ``samples``) plus ``metrics`` (``{display name: result}``
        or ``None``) and ``table`` (paths of ``metrics.md`` / ``metrics.json``, or ``None``).
    """
    if not methods:
        raise ValueError("no methods to run")
    if not samples:
        raise ValueError("no samples")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for s in samples:
        if s.product_image.size != (resolution, resolution):
            raise ValueError(f"sample {s.id!r} is {s.product_image.size}, not {resolution}x{resolution}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    if paste_product is None:
        flags = {getattr(getattr(m, "inner", m), "paste_product", None) for m in methods if not isinstance(m, LazyMethod)}
        paste_product = flags.pop() if len(flags) == 1 else None
    settings = {
        "resolution": resolution, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
        "seed": seed, "seeds": "seed + sample index", "paste_product": paste_product,
        "uniform_prompt_template": UNIFORM_PROMPT_TEMPLATE, **(extra_settings or {}),
    }
    previous = _check_previous_settings(manifest_path, settings, overwrite)
    manifest = {
        "settings": settings,
        "samples": [{"id": s.id, "product_name": s.product_name, "category": s.category, "seed": seed + i}
                    for i, s in enumerate(samples)],
        "methods": dict(previous.get("methods", {})),
    }
    ids = [s.id for s in samples]
    seeds = [seed + i for i in range(len(samples))]

    for entry in methods:
        folder = out / entry.name
        folder.mkdir(exist_ok=True)
        todo = [i for i, sid in enumerate(ids) if overwrite or not (folder / f"{sid}.png").exists()]
        record = dict(manifest["methods"].get(entry.name, {}))
        record.update({"folder": entry.name, "n_images": len(ids), "reused": len(ids) - len(todo)})
        if todo:
            method = entry.build() if isinstance(entry, LazyMethod) else entry
            record["display_name"] = method.display_name
            record["describe"] = method.describe()
            record["prompts"] = dict(zip(ids, method.prompts([s.product_name for s in samples])))
            logger.info("%s: generating %d of %d images", entry.name, len(todo), len(ids))
            start = time.perf_counter()
            for b in range(0, len(todo), batch_size):
                chunk = todo[b: b + batch_size]
                images = method.generate(
                    [samples[i].product_name for i in chunk], [samples[i].product_image for i in chunk],
                    [samples[i].product_mask for i in chunk], height=resolution, width=resolution,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    seed=[seeds[i] for i in chunk],
                )
                for i, image in zip(chunk, images):
                    _save_png(image, folder / f"{ids[i]}.png")
            elapsed = time.perf_counter() - start
            record["seconds"] = round(elapsed, 3)
            record["seconds_per_image"] = round(elapsed / len(todo), 4)
            method = None
            if isinstance(entry, LazyMethod):
                _release()
        else:
            record.setdefault("display_name", getattr(entry, "display_name", None) or entry.name)
        manifest["methods"][entry.name] = record
        _write_json(manifest, manifest_path)  # after every method: a crash keeps what is done

    result = dict(manifest, metrics=None, table=None)
    if not skip_metrics:
        from ..metrics.evaluate import write_metrics_table

        rows = evaluate_benchmark(out, [m.name for m in methods], samples, manifest, eval_config)
        result["metrics"] = rows
        result["table"] = write_metrics_table(_merge_rows(out, rows, overwrite), out)
    return result


def _merge_rows(out: Path, rows: dict[str, dict], overwrite: bool) -> dict[str, dict]:
    """This run's rows plus the rows of other methods already in ``metrics.json``, in Table-1 order.

    Methods run separately into one folder (same image settings, checked above) thus share one
    table; the table's notes flag metric settings that differ between rows.
    """
    from .methods import METHODS

    merged: dict[str, dict] = {}
    path = out / "metrics.json"
    if path.exists() and not overwrite:
        try:
            merged = dict(json.loads(path.read_text(encoding="utf-8")).get("rows", {}))
        except (json.JSONDecodeError, AttributeError):
            logger.warning("%s is not a metrics table; rewriting it with this run's rows only", path)
    merged.update(rows)
    order = [cls.display_name for cls in METHODS.values()]
    return dict(sorted(merged.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def evaluate_benchmark(out: Path, method_names: Sequence[str], samples: Sequence[BenchmarkSample], manifest: dict,
                       eval_config=None) -> dict[str, dict]:
    """Score each method's folder with :func:`diffusers_product2img.metrics.evaluate_images`.

    The metric backbones are loaded once and shared by all methods. References are the real images,
    cutouts are the product canvases (product on white) and the exact-pixel source is that canvas,
    i.e. what every method was given.
    """
    from ..metrics.evaluate import EvalConfig, MetricModels, evaluate_images

    config = eval_config or EvalConfig()
    models = MetricModels(config)
    references = [s.reference for s in samples]
    references = None if any(r is None for r in references) else references
    canvases = [s.product_image for s in samples]
    masks = [s.product_mask for s in samples]
    names = [s.product_name for s in samples]
    rows: dict[str, dict] = {}
    for name in method_names:
        generated = [_open(str(out / name / f"{s.id}.png")) for s in samples]
        display = manifest["methods"].get(name, {}).get("display_name") or name
        rows[display] = evaluate_images(generated, references, canvases, masks, names, config, sources=canvases,
                                        models=models)
    return rows
