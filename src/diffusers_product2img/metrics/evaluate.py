"""Evaluate a set of generated product images the way the paper's Table 1 does, plus product fidelity.

:func:`evaluate_images` computes every metric over aligned lists (generated image, real reference
image, product cutout, product mask, product name), loading each backbone once and running it in
batches without gradients. :func:`write_metrics_table` turns ``{method: result}`` into
``metrics.md`` (a Table-1-like markdown table, arrows in the headers) and ``metrics.json``.

Every result carries ``details``: for each metric the implementation, model ids and settings that
produced it, so numbers from different implementations (FID vs FD-CLIP, other weights, other
texts) are never silently put side by side.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from ..placement import product_mask_from_alpha, to_product_mask, to_rgb
from .aesthetics import DEFAULT_AESTHETIC_WEIGHTS, aesthetic_scores, load_aesthetic_predictor
from .clip_scores import (
    DEFAULT_CLIP_MODEL,
    CLIPImageEncoder,
    cosine_scores,
    cutout_to_rgb,
    generated_backgrounds,
)
from .fidelity import exact_pixel_rate, object_expansion, product_mae
from .frechet import InceptionFeatureExtractor, frechet_distance_from_features, inception_available, rank_note
from .pickscore import DEFAULT_PICKSCORE_MODEL, DEFAULT_PICKSCORE_PROCESSOR, PickScorer

__all__ = [
    "ALL_METRICS",
    "EvalConfig",
    "MetricModels",
    "evaluate_images",
    "format_metrics_table",
    "write_metrics_table",
]

logger = logging.getLogger(__name__)

# Metric groups a user can select; "frechet" reports under "FID" or "FD-CLIP".
ALL_METRICS = ("frechet", "pickscore", "aesthetics", "clip_c_i", "clip_c_b", "fidelity")
FID_CHOICES = ("auto", "inception", "fd-clip", "none")


@dataclass
class EvalConfig:
    """What to compute and with which models (all model ids are Hub ids or local folders).

    Attributes:
        clip_model: CLIP for CLIP-c-I, CLIP-c-B, the aesthetic predictor's embeddings and FD-CLIP.
        pickscore_model / pickscore_processor: the PickScore CLIP and where its processor lives.
        aesthetic_weights: LAION aesthetic predictor v2 weights (path or ``owner/repo/filename``);
            ``None`` = a random head (tests only; the scores then mean nothing).
        fid: ``"inception"`` (real FID, needs torch-fidelity), ``"fd-clip"`` (Fréchet distance on
            ``clip_model`` image embeddings, reported as FD-CLIP), ``"auto"`` (inception if importable,
            else fd-clip, with a warning) or ``"none"``.
        inception_weights: local InceptionV3 FID weights (else torch-fidelity downloads them).
        metrics: subset of :data:`ALL_METRICS` to compute (default all).
        ring_width: object-expansion ring width in px (default 10% of the product size).
        batch_size, device, dtype: how the backbones run.
    """

    clip_model: str = DEFAULT_CLIP_MODEL
    pickscore_model: str = DEFAULT_PICKSCORE_MODEL
    pickscore_processor: str | None = DEFAULT_PICKSCORE_PROCESSOR
    aesthetic_weights: str | None = DEFAULT_AESTHETIC_WEIGHTS
    fid: str = "auto"
    inception_weights: str | None = None
    metrics: tuple[str, ...] = ALL_METRICS
    ring_width: int | None = None
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    per_image: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.metrics) - set(ALL_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
        if self.fid not in FID_CHOICES:
            raise ValueError(f"fid must be one of {FID_CHOICES}, got {self.fid!r}")
        self.metrics = tuple(self.metrics)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]

    def resolved_fid(self) -> str:
        if "frechet" not in self.metrics or self.fid == "none":
            return "none"
        if self.fid == "auto":
            if inception_available():
                return "inception"
            logger.warning(
                "torch-fidelity's InceptionV3 is not importable: reporting FD-CLIP (Frechet distance on CLIP "
                "features) instead of FID. The two are not comparable; `pip install torch-fidelity` for FID."
            )
            return "fd-clip"
        return self.fid


class MetricModels:
    """The backbones of one evaluation, loaded once and reusable across methods (e.g. baselines)."""

    def __init__(self, config: EvalConfig):
        self.config = config
        self._clip: CLIPImageEncoder | None = None
        self._pickscore: PickScorer | None = None
        self._aesthetic = None
        self._inception = None
        self.fid_kind = config.resolved_fid()

    def clip(self) -> CLIPImageEncoder:
        if self._clip is None:
            c = self.config
            self._clip = CLIPImageEncoder.from_pretrained(
                c.clip_model, device=c.device, dtype=c.torch_dtype, batch_size=c.batch_size
            )
        return self._clip

    def pickscore(self) -> PickScorer:
        if self._pickscore is None:
            c = self.config
            self._pickscore = PickScorer.from_pretrained(
                c.pickscore_model, c.pickscore_processor, device=c.device, dtype=c.torch_dtype,
                batch_size=c.batch_size,
            )
        return self._pickscore

    def aesthetic(self):
        if self._aesthetic is None:
            width = self.clip().projection_dim
            self._aesthetic = load_aesthetic_predictor(self.config.aesthetic_weights, input_dim=width)
            self._aesthetic.to(self.config.device)
        return self._aesthetic

    def inception(self) -> InceptionFeatureExtractor:
        if self._inception is None:
            self._inception = InceptionFeatureExtractor(
                self.config.inception_weights, device=self.config.device, batch_size=self.config.batch_size
            )
        return self._inception


def _nanmean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _masks_for(cutouts, masks, n: int) -> list[Image.Image]:
    if masks is not None:
        return [to_product_mask(m) for m in masks]
    if cutouts is None:
        raise ValueError("product masks are needed (pass masks, or RGBA cutouts aligned with the images)")
    return [product_mask_from_alpha(c) for c in cutouts]


def evaluate_images(
    generated: Sequence[Image.Image],
    references: Sequence[Image.Image] | None,
    cutouts: Sequence[Image.Image] | None,
    masks: Sequence | None,
    names: Sequence[str] | None,
    config: EvalConfig | None = None,
    *,
    texts: Sequence[str] | None = None,
    sources: Sequence[Image.Image] | None = None,
    models: MetricModels | None = None,
) -> dict:
    """Compute the Table-1 metrics and product fidelity for one method's outputs.

    Args:
        generated: the generated images (PIL, any size/mode).
        references: the real test images (FID's real set; product colours for object expansion;
            default source of product pixels). ``None`` skips what needs them.
        cutouts: product cutouts (RGBA, or RGB on white) for CLIP-c-I / CLIP-c-B; their alpha gives
            the masks when ``masks`` is ``None``.
        masks: product masks (255 = product), aligned with the references (resized to each generated
            image where needed).
        names: product names, the text PickScore scores (unless ``texts`` is given) and the row ids.
        config: models and settings (default :class:`EvalConfig`).
        texts: other texts to score with PickScore (e.g. captions), one per image.
        sources: the exact images the product pixels were given to the model in, for the
            exact-pixel rate (default ``references``).
        models: loaded backbones to reuse (default: loaded here from ``config``).

    Returns:
        ``{"n_images", "metrics": {name: mean}, "counts": {name: n_valid}, "details": {name: {...}},
        "per_image": [...], "config": {...}}``. Metric names: ``FID`` or ``FD-CLIP``, ``PickScore``,
        ``Aesthetics``, ``CLIP-c-I``, ``CLIP-c-B``, ``ExactPixel`` (fraction), ``ProductMAE``
        (0-255), ``Expansion`` (fraction of the ring, minus the reference's).
    """
    if config is None:
        config = models.config if models is not None else EvalConfig()
    models = models or MetricModels(config)
    n = len(generated)
    if n == 0:
        raise ValueError("no generated images")
    for label, seq in (("references", references), ("cutouts", cutouts), ("masks", masks), ("names", names),
                       ("texts", texts), ("sources", sources)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{n} generated images but {len(seq)} {label}")
    generated = [to_rgb(im, "generated image") for im in generated]
    names = list(names) if names is not None else [f"{i:05d}" for i in range(n)]
    wanted = set(config.metrics)
    per_image: list[dict] = [{"name": name} for name in names]
    metrics: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    details: dict[str, dict] = {}

    def record(key: str, values: Sequence[float], detail: dict) -> None:
        values = [float(v) for v in values]
        for row, v in zip(per_image, values):
            row[key] = None if math.isnan(v) else v
        metrics[key] = _nanmean(values)
        counts[key] = sum(not math.isnan(v) for v in values)
        details[key] = detail

    need_clip = bool(wanted & {"aesthetics", "clip_c_i", "clip_c_b"}) or models.fid_kind == "fd-clip"
    gen_embeds = models.clip().embed_images(generated) if need_clip else None
    clip_desc = {"model": config.clip_model, "embedding": "visual_projection(pooled), CLIP image processor"}

    # --- Frechet distance: generated vs real --------------------------------------------------
    if models.fid_kind != "none":
        if references is None or n < 2:
            logger.warning("FID/FD-CLIP skipped: needs the real reference images and at least 2 images")
        else:
            if models.fid_kind == "inception":
                extractor = models.inception()
                fake, real = extractor(generated), extractor(list(references))
                key, detail = "FID", extractor.describe()
            else:
                fake, real = gen_embeds, models.clip().embed_images(list(references))
                key = "FD-CLIP"
                detail = {
                    "metric": "FD-CLIP",
                    "implementation": "float64 eigh Frechet distance on CLIP image embeddings (not FID)",
                    **clip_desc,
                }
            value = frechet_distance_from_features(fake, real)
            detail = {**detail, "n_generated": len(fake), "n_real": len(real), "feature_dim": int(fake.shape[1])}
            note = rank_note(min(len(fake), len(real)), int(fake.shape[1]))
            if note:
                detail["warning"] = note
            metrics[key], counts[key], details[key] = value, min(len(fake), len(real)), detail

    # --- PickScore -----------------------------------------------------------------------------
    if "pickscore" in wanted:
        scorer = models.pickscore()
        scored = list(texts) if texts is not None else names
        record("PickScore", scorer.score(generated, scored).tolist(),
               {**scorer.describe(), "text": "custom texts" if texts is not None else "product name"})

    # --- Aesthetics ----------------------------------------------------------------------------
    if "aesthetics" in wanted:
        scores = aesthetic_scores(models.aesthetic(), gen_embeds).tolist()
        record("Aesthetics", scores, {
            "metric": "LAION aesthetic predictor v2 (MLP on L2-normalised CLIP image embeddings)",
            "weights": config.aesthetic_weights or "random (test only)", **clip_desc,
        })

    # --- CLIP-c-I / CLIP-c-B -------------------------------------------------------------------
    product_masks = None
    if wanted & {"clip_c_b", "fidelity"}:
        product_masks = _masks_for(cutouts, masks, n)
    if wanted & {"clip_c_i", "clip_c_b"}:
        if cutouts is None:
            logger.warning("CLIP-c-I/CLIP-c-B skipped: no cutouts")
        else:
            cut_embeds = models.clip().embed_images([cutout_to_rgb(c) for c in cutouts])
            if "clip_c_i" in wanted:
                record("CLIP-c-I", cosine_scores(cut_embeds, gen_embeds).tolist(), {
                    "definition": "100 * cos(CLIP(cutout on white), CLIP(generated image))", **clip_desc,
                })
            if "clip_c_b" in wanted:
                bg_embeds = models.clip().embed_images(generated_backgrounds(generated, product_masks))
                record("CLIP-c-B", cosine_scores(cut_embeds, bg_embeds).tolist(), {
                    "definition": "100 * cos(CLIP(cutout on white), CLIP(generated image with the product "
                                  "region filled grey 127)), placement.background_only_image",
                    **clip_desc,
                })

    # --- Product fidelity ----------------------------------------------------------------------
    if "fidelity" in wanted:
        src_images = sources if sources is not None else references
        exact, mae, expansion, skipped = [], [], [], 0
        for i in range(n):
            gen, mask = generated[i], product_masks[i]
            src = src_images[i] if src_images is not None else None
            if src is not None and src.size == gen.size and mask.size == gen.size:
                exact.append(exact_pixel_rate(gen, src, mask))
                mae.append(product_mae(gen, src, mask))
            else:
                skipped += 1
                exact.append(float("nan"))
                mae.append(float("nan"))
            ref = references[i] if references is not None else None
            expansion.append(object_expansion(gen, ref, mask, ring_width=config.ring_width))
        size_note = {"skipped_size_mismatch_or_no_source": skipped}
        record("ExactPixel", exact, {
            "definition": "fraction of product pixels (mask == 255) whose uint8 RGB equals the source exactly",
            "source": "sources" if sources is not None else "references", **size_note,
        })
        record("ProductMAE", mae, {
            "definition": "mean |generated - source| over product pixels (mask == 255) and channels, 0-255",
            **size_note,
        })
        record("Expansion", expansion, {
            "definition": "fraction of the ring outside the mask with product-like colour (8^3-bin RGB "
                          "histograms, product vs surrounding band), generated minus reference",
            "ring_width": config.ring_width or "10% of sqrt(product area), >= 2 px",
            "reference_subtracted": references is not None,
        })

    result = {
        "n_images": n,
        "metrics": metrics,
        "counts": counts,
        "details": details,
        "config": {k: v for k, v in asdict(config).items() if k != "extra"},
    }
    if config.per_image:
        result["per_image"] = per_image
    return result


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

# (key in result["metrics"], header, arrow, multiplier, decimals)
TABLE_COLUMNS = (
    ("FID", "FID", "↓", 1.0, 2),
    ("FD-CLIP", "FD-CLIP", "↓", 1.0, 2),
    ("PickScore", "PickScore", "↑", 1.0, 2),
    ("Aesthetics", "Aesthetics", "↑", 1.0, 2),
    ("CLIP-c-I", "CLIP-c-I", "↑", 1.0, 2),
    ("CLIP-c-B", "CLIP-c-B", "↑", 1.0, 2),
    ("ExactPixel", "Exact px %", "↑", 100.0, 2),
    ("ProductMAE", "Product MAE", "↓", 1.0, 2),
    ("Expansion", "Expansion pp", "↓", 100.0, 2),
)


def _metrics_of(result: dict) -> dict:
    return result["metrics"] if isinstance(result.get("metrics"), dict) else result


def _detail_text(detail: dict) -> str:
    return "; ".join(f"{k}: {v}" for k, v in detail.items() if k not in ("metric",))


def format_metrics_table(rows: dict[str, dict]) -> str:
    """A Table-1-like markdown table (one row per method, ``-`` where a metric is missing) + notes."""
    present = [col for col in TABLE_COLUMNS if any(_metrics_of(r).get(col[0]) is not None for r in rows.values())]
    header = "| Method | " + " | ".join(f"{h} {a}" for _, h, a, _, _ in present) + " |"
    lines = [header, "|" + "---|" * (len(present) + 1)]
    for method, result in rows.items():
        values = _metrics_of(result)
        cells = []
        for key, _, _, mult, decimals in present:
            v = values.get(key)
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * mult:.{decimals}f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    notes = []
    for key, header_text, _, _, _ in present:
        seen: dict[str, list[str]] = {}
        for method, result in rows.items():
            detail = result.get("details", {}).get(key) if isinstance(result.get("details"), dict) else None
            if detail:
                seen.setdefault(_detail_text(detail_without_counts(detail)), []).append(method)
        if len(seen) == 1:
            notes.append(f"- **{header_text}**: {next(iter(seen))}")
        elif len(seen) > 1:
            notes.append(f"- **{header_text}**: settings differ between rows, do not compare them:")
            notes += [f"  - {', '.join(methods)}: {text}" for text, methods in seen.items()]
    for method, result in rows.items():
        details = result.get("details") if isinstance(result.get("details"), dict) else {}
        for key, detail in details.items():
            if isinstance(detail, dict) and detail.get("warning"):
                notes.append(f"- warning, {method} {key}: {detail['warning']}")
    n_images = {m: r.get("n_images") for m, r in rows.items() if isinstance(r, dict) and "n_images" in r}
    if n_images:
        notes.append("- images per method: " + ", ".join(f"{m} {k}" for m, k in n_images.items()))
    out = "\n".join(lines) + "\n"
    if notes:
        out += "\n" + "\n".join(notes) + "\n"
    return out


def detail_without_counts(detail: dict) -> dict:
    """Details minus the per-run counts, so that rows with equal settings share one note."""
    return {k: v for k, v in detail.items() if k not in ("n_generated", "n_real", "skipped_size_mismatch_or_no_source",
                                                        "warning", "logit_scale_exp")}


def _atomic_write(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    return obj


def write_metrics_table(rows: dict[str, dict], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``metrics.md`` and ``metrics.json`` into ``out_dir`` (each atomically: temp file + replace).

    ``rows`` maps a method name to an :func:`evaluate_images` result (or a flat ``{metric: value}``).
    Returns the two paths.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    md_path, json_path = os.path.join(out_dir, "metrics.md"), os.path.join(out_dir, "metrics.json")
    payload = {
        "columns": [{"key": k, "header": h, "better": "lower" if a == "↓" else "higher", "table_multiplier": m}
                    for k, h, a, m, _ in TABLE_COLUMNS],
        "rows": rows,
    }
    _atomic_write(json_path, json.dumps(_jsonable(payload), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    _atomic_write(md_path, format_metrics_table(rows))
    return {"markdown": md_path, "json": json_path}

