"""``product2img evaluate-images``: score a folder of generated images and write the metric tables.

Inputs, in one of two forms:

* ``--jsonl rows.jsonl``: one JSON object per line with ``generated``, ``reference`` (or ``image``),
  ``cutout``, optional ``mask``, ``name`` (or ``product_name``), optional ``text`` and ``id``. Paths
  are relative to the JSONL file's folder. A row without ``generated`` takes
  ``<--generated>/<id>.png``.
* ``--generated DIR --dataset DIR_OR_REPO``: a raw EPBD folder (``metadata.csv``/``.jsonl`` with
  ``images/``, ``cutouts/``, optional ``masks/``; see :mod:`diffusers_product2img.data.layout`),
  of which ``--split`` is evaluated; anything else (an exported Parquet folder or a Hub dataset) is
  opened with ``datasets.load_dataset(path, config, split=...)`` and its columns are chosen with
  ``--image-column`` etc. Generated images are matched as ``<id>.png`` (or ``<row index:05d>.png``).

Writes ``metrics.md`` and ``metrics.json`` into ``--output-dir``; with ``--append`` the rows already
in ``metrics.json`` are kept, so several methods accumulate into one table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass

from PIL import Image

from ..placement import has_alpha, product_mask_from_alpha

__all__ = ["register_commands", "run_evaluate_images", "EvalRow", "read_rows"]

logger = logging.getLogger(__name__)


@dataclass
class EvalRow:
    generated: str
    reference: str | None
    cutout: str | None
    mask: str | None
    name: str
    text: str | None = None
    id: str | None = None


def _first(row: dict, *keys):
    for key in keys:
        if row.get(key) not in (None, ""):
            return row[key]
    return None


def _generated_path(generated_dir: str | None, row_id: str | None, index: int) -> str:
    if generated_dir is None:
        raise ValueError("rows without a 'generated' path need --generated DIR")
    for stem in ([str(row_id)] if row_id is not None else []) + [f"{index:05d}", str(index)]:
        path = os.path.join(generated_dir, f"{stem}.png")
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no generated image for row {index} (id {row_id}) in {generated_dir}")


def _rows_from_jsonl(path: str, generated_dir: str | None) -> list[EvalRow]:
    base = os.path.dirname(os.path.abspath(path))

    def resolve(p):
        return None if p is None else (p if os.path.isabs(p) else os.path.join(base, p))

    rows = []
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(line for line in f if line.strip()):
            raw = json.loads(line)
            row_id = _first(raw, "id", "product_id")
            generated = resolve(_first(raw, "generated"))
            if generated is None:
                generated = _generated_path(generated_dir, row_id, index)
            rows.append(EvalRow(
                generated=generated,
                reference=resolve(_first(raw, "reference", "image", "file_name")),
                cutout=resolve(_first(raw, "cutout")),
                mask=resolve(_first(raw, "mask")),
                name=str(_first(raw, "name", "product_name") or row_id or index),
                text=_first(raw, "text"),
                id=None if row_id is None else str(row_id),
            ))
    return rows


def _rows_from_raw_epbd(root: str, split: str, generated_dir: str | None) -> list[EvalRow]:
    """Rows of one split of a raw EPBD folder (the layout of :mod:`diffusers_product2img.data.layout`)."""
    from ..data.layout import EPBDLayout

    layout = EPBDLayout(root)
    rows = []
    for index, sample in enumerate(layout.split_samples(split)):
        mask = os.path.join(root, sample.mask_file) if sample.mask_file else None
        rows.append(EvalRow(
            generated=_generated_path(generated_dir, sample.id, index),
            reference=os.path.join(root, sample.image_file),
            cutout=os.path.join(root, sample.cutout_file),
            mask=mask if mask and os.path.exists(mask) else None,  # else from the cutout's alpha
            name=sample.product_name,
            id=sample.id,
        ))
    return rows


def read_rows(args: argparse.Namespace) -> tuple[list[EvalRow], dict]:
    """The evaluation rows as paths (JSONL / metadata.jsonl), or as loaded images (datasets)."""
    if args.jsonl:
        return _rows_from_jsonl(args.jsonl, args.generated), {}
    if not args.dataset:
        raise ValueError("give --jsonl, or --generated with --dataset")
    if os.path.isdir(args.dataset) and any(
        os.path.exists(os.path.join(args.dataset, f)) for f in ("metadata.csv", "metadata.jsonl")
    ):
        return _rows_from_raw_epbd(args.dataset, args.split, args.generated), {}
    import datasets

    ds = datasets.load_dataset(args.dataset, args.config, split=args.split)
    rows, images = [], {}
    for index, example in enumerate(ds):
        row_id = example.get(args.id_column)
        key = f"row{index}"
        images[key] = {
            "reference": example.get(args.image_column),
            "cutout": example.get(args.cutout_column),
            "mask": example.get(args.mask_column),
        }
        rows.append(EvalRow(
            generated=_generated_path(args.generated, row_id, index),
            reference=key, cutout=key, mask=key,
            name=str(example.get(args.name_column) or row_id or index),
            id=None if row_id is None else str(row_id),
        ))
    return rows, images


def _open(path: str | None, kind: str, preloaded: dict):
    if path is None:
        return None
    if path in preloaded:
        return preloaded[path][kind]
    with Image.open(path) as im:
        im.load()
        return im


def run_evaluate_images(args: argparse.Namespace) -> int:
    from .evaluate import ALL_METRICS, EvalConfig, evaluate_images, write_metrics_table

    rows, preloaded = read_rows(args)
    if args.limit:
        rows = rows[: args.limit]
    if not rows:
        logger.error("no rows to evaluate")
        return 1
    metrics = tuple(m.strip() for m in args.metrics.split(",")) if args.metrics else ALL_METRICS
    config = EvalConfig(
        clip_model=args.clip_model, pickscore_model=args.pickscore_model,
        pickscore_processor=args.pickscore_processor or None,
        aesthetic_weights=None if args.aesthetic_weights == "random" else args.aesthetic_weights,
        fid=args.fid, inception_weights=args.inception_weights, metrics=metrics, ring_width=args.ring_width,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
    )
    generated = [_open(r.generated, "generated", {}) for r in rows]
    references = [_open(r.reference, "reference", preloaded) for r in rows]
    cutouts = [_open(r.cutout, "cutout", preloaded) for r in rows]
    masks = [_open(r.mask, "mask", preloaded) for r in rows]
    # A row without a mask file takes its product mask from the cutout's alpha.
    masks = [m if m is not None or c is None or not has_alpha(c) else product_mask_from_alpha(c)
             for m, c in zip(masks, cutouts)]
    texts = [r.text or r.name for r in rows] if any(r.text for r in rows) else None
    result = evaluate_images(
        generated,
        None if any(r is None for r in references) else references,
        None if any(c is None for c in cutouts) else cutouts,
        None if any(m is None for m in masks) else masks,
        [r.name for r in rows],
        config,
        texts=texts,
    )
    method = args.method or os.path.basename(os.path.normpath(args.generated or os.path.dirname(rows[0].generated)))
    table_rows = {}
    json_path = os.path.join(args.output_dir, "metrics.json")
    if args.append and os.path.exists(json_path):
        with open(json_path, encoding="utf-8") as f:
            table_rows = json.load(f).get("rows", {})
    table_rows[method] = result
    paths = write_metrics_table(table_rows, args.output_dir)
    with open(paths["markdown"], encoding="utf-8") as f:
        print(f.read())
    print(f"wrote {paths['markdown']} and {paths['json']}")
    return 0


def add_metric_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The metric model flags, shared with the model-running ``evaluate`` command."""
    from .aesthetics import DEFAULT_AESTHETIC_WEIGHTS
    from .clip_scores import DEFAULT_CLIP_MODEL
    from .pickscore import DEFAULT_PICKSCORE_MODEL, DEFAULT_PICKSCORE_PROCESSOR

    g = parser.add_argument_group("metric models (Hub ids or local folders)")
    g.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                   help="CLIP for CLIP-c-I/-B, aesthetics embeddings and FD-CLIP (default %(default)s)")
    g.add_argument("--pickscore-model", default=DEFAULT_PICKSCORE_MODEL, help="default %(default)s")
    g.add_argument("--pickscore-processor", default=DEFAULT_PICKSCORE_PROCESSOR,
                   help="processor/tokenizer of the PickScore model (default %(default)s)")
    g.add_argument("--aesthetic-weights", default=DEFAULT_AESTHETIC_WEIGHTS,
                   help="LAION aesthetic predictor v2: a .pth/.safetensors file or owner/repo/filename "
                        "(default %(default)s); 'random' for smoke tests")
    g.add_argument("--fid", choices=("auto", "inception", "fd-clip", "none"), default="auto",
                   help="inception = real FID (needs torch-fidelity); fd-clip = Frechet distance on CLIP "
                        "features, reported as FD-CLIP; auto = inception if available (default)")
    g.add_argument("--inception-weights", default=None,
                   help="local weights-inception-2015-12-05-6726825d.pth (else downloaded by torch-fidelity)")
    g.add_argument("--metrics", default=None,
                   help="comma list of frechet,pickscore,aesthetics,clip_c_i,clip_c_b,fidelity (default all)")
    g.add_argument("--ring-width", type=int, default=None, help="object-expansion ring width in px")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")


def register_commands(subparsers) -> None:
    """Add ``evaluate-images`` to the ``product2img`` CLI's subparsers."""
    p = subparsers.add_parser(
        "evaluate-images",
        help="score generated images against real ones: FID, PickScore, Aesthetics, CLIP-c-I/-B, fidelity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--generated", default=None, help="folder of generated PNGs (<id>.png)")
    p.add_argument("--jsonl", default=None, help="rows of generated/reference/cutout/mask/name")
    p.add_argument("--dataset", default=None, help="exported EPBD-style folder or dataset id")
    p.add_argument("--config", default=None, help="dataset config name")
    p.add_argument("--split", default="test")
    p.add_argument("--id-column", default="id")
    p.add_argument("--image-column", default="image")
    p.add_argument("--cutout-column", default="cutout")
    p.add_argument("--mask-column", default="mask")
    p.add_argument("--name-column", default="product_name")
    p.add_argument("--method", default=None, help="row name in the table (default: the generated folder's name)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--append", action="store_true", help="keep the rows already in output-dir/metrics.json")
    p.add_argument("--limit", type=int, default=None)
    add_metric_model_arguments(p)
    p.set_defaults(func=run_evaluate_images)
