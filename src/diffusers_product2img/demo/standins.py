"""Offline stand-ins for the paper's metrics on EPBD-synth, where the ground truth is known.

The paper's metrics (FID, PickScore, aesthetics, CLIP-c-I/-B) need Inception/CLIP weights from the
Hub. On EPBD-synth three weight-free measurements answer the same questions:

* **Scene accuracy** (stand-in for CLIP-c-B, "does the background suit the product"): the share
  of generated images whose background the fixed procedural
  :func:`~diffusers_product2img.data.synth.classify_scene` assigns to the scene family of the
  product's category (:func:`~diffusers_product2img.data.synth.category_scene`).
* **Defect rate** (stand-in for aesthetics): the share of generated images in which the procedural
  :func:`~diffusers_product2img.data.synth.detect_defects` sees a plain white background, overlaid
  text or clutter (confidence >= 0.5), the defects planted in the low-quality training samples.
* **FD-BG** (stand-in for FID): the Fréchet distance between generated and real test images in a
  fixed, hand-made feature space of the *background* (:data:`BG_FEATURES`, :func:`background_features`),
  computed with :func:`diffusers_product2img.metrics.frechet_distance_from_features`.
* **Exact product pixels**: :func:`diffusers_product2img.metrics.exact_pixel_rate` against the
  product canvas the model was given (the product must come back bit for bit).

:func:`selection_quality` scores an IDR-LMM round's data selection against the planted ground truth.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "BG_FEATURES",
    "background_features",
    "frechet_bg",
    "scene_hits",
    "defect_flags",
    "standin_metrics",
    "selection_quality",
    "STANDIN_COLUMNS",
]

BG_FEATURES = (
    "BG-bands-v1: for the top, middle and bottom third of the image, over background pixels only "
    "(product mask dilated by 1 px removed): mean and standard deviation of R, G, B and the mean "
    "absolute horizontal+vertical gradient (7 x 3 = 21 values), plus the background's share of "
    "near-white pixels (min channel > 0.92) and of vivid pixels (saturation > 0.7); all x100. 23 dims, "
    "no learned weights."
)

# (key, header, better, multiplier, decimals) for tables
STANDIN_COLUMNS = (
    ("SceneAcc", "Scene acc. %", "higher", 100.0, 1),
    ("DefectRate", "Defects %", "lower", 100.0, 1),
    ("FD-BG", "FD-BG", "lower", 1.0, 1),
    ("ExactPixel", "Exact px %", "higher", 100.0, 2),
)


def _float_rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _background(mask: Image.Image, shape: tuple[int, int]) -> np.ndarray:
    m = np.asarray(mask.convert("L"), dtype=np.uint8)
    if m.shape != shape:
        raise ValueError(f"mask is {m.shape}, image {shape}")
    product = m > 8
    grown = product.copy()
    grown[1:] |= product[:-1]
    grown[:-1] |= product[1:]
    grown[:, 1:] |= product[:, :-1]
    grown[:, :-1] |= product[:, 1:]
    return ~grown


def background_features(image: Image.Image, product_mask: Image.Image) -> np.ndarray:
    """The :data:`BG_FEATURES` vector (23 floats) of one image and its product mask (L, 255 = product)."""
    img = _float_rgb(image)
    h, w = img.shape[:2]
    keep = _background(product_mask, (h, w))
    if not keep.any():
        keep = np.ones((h, w), bool)
    grad = np.zeros((h, w), np.float32)
    grad[:, 1:] += np.abs(np.diff(img, axis=1)).mean(-1)
    grad[1:, :] += np.abs(np.diff(img, axis=0)).mean(-1)
    feats = []
    for a, b in ((0, h // 3), (h // 3, 2 * h // 3), (2 * h // 3, h)):
        sel = keep[a:b]
        if sel.sum() < 4:
            sel, band, g = keep, img, grad
        else:
            band, g = img[a:b], grad[a:b]
        pix = band[sel]
        feats += list(pix.mean(0)) + list(pix.std(0)) + [float(g[sel].mean())]
    bg = img[keep]
    mx, mn = bg.max(-1), bg.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    feats += [float((mn > 0.92).mean()), float(((sat > 0.7) & (mx > 0.4)).mean())]
    return np.asarray(feats, dtype=np.float64) * 100.0


def frechet_bg(generated: Sequence[Image.Image], references: Sequence[Image.Image],
               masks: Sequence[Image.Image]) -> float:
    """FD-BG: Fréchet distance of :func:`background_features` between generated and real images."""
    from ..metrics.frechet import frechet_distance_from_features

    fake = np.stack([background_features(g, m) for g, m in zip(generated, masks)])
    real = np.stack([background_features(r, m) for r, m in zip(references, masks)])
    return float(frechet_distance_from_features(fake, real))


def scene_hits(images: Sequence[Image.Image], masks: Sequence[Image.Image], categories: Sequence[str]) -> list[dict]:
    """Per image: the scene seen by ``classify_scene``, the scene the category calls for, and whether they agree."""
    from ..data.synth import category_scene, classify_scene

    out = []
    for image, mask, category in zip(images, masks, categories):
        seen = classify_scene(image, mask)
        wanted = category_scene(category)
        out.append({"scene": seen, "expected": wanted, "hit": seen == wanted})
    return out


def defect_flags(images: Sequence[Image.Image], masks: Sequence[Image.Image], threshold: float = 0.5) -> list[list[str]]:
    """Per image: the pixel defects (``plain_white``, ``watermark``, ``clutter``) seen with confidence >= threshold."""
    from ..data.synth import detect_defects

    flags = []
    for image, mask in zip(images, masks):
        conf = detect_defects(image, mask)
        flags.append(sorted(k for k, v in conf.items() if v >= threshold))
    return flags


def standin_metrics(generated: Sequence[Image.Image], references: Sequence[Image.Image],
                    canvases: Sequence[Image.Image], masks: Sequence[Image.Image],
                    categories: Sequence[str]) -> dict:
    """All stand-ins for one model on one split.

    Args:
        generated: the model's images; references: the real images (FD-BG's real set);
        canvases: the product canvases the model was given (exact-pixel source);
        masks: product masks (L, 255 = product); categories: EPBD-synth categories.
    Returns:
        ``{"metrics": {SceneAcc, DefectRate, FD-BG, ExactPixel}, "scenes": Counter of seen scenes,
        "defects": Counter, "n_images"}``.
    """
    from ..metrics.fidelity import exact_pixel_rate

    n = len(generated)
    if not n or not (len(references) == len(canvases) == len(masks) == len(categories) == n):
        raise ValueError("generated, references, canvases, masks and categories must be aligned and non-empty")
    hits = scene_hits(generated, masks, categories)
    flags = defect_flags(generated, masks)
    exact = [exact_pixel_rate(g, c, m) for g, c, m in zip(generated, canvases, masks)]
    exact = [v for v in exact if not math.isnan(v)]
    return {
        "n_images": n,
        "metrics": {
            "SceneAcc": float(np.mean([h["hit"] for h in hits])),
            "DefectRate": float(np.mean([bool(f) for f in flags])),
            "FD-BG": frechet_bg(generated, references, masks) if n >= 2 else None,
            "ExactPixel": float(np.mean(exact)) if exact else None,
        },
        "scenes": dict(Counter(h["scene"] for h in hits)),
        "defects": dict(Counter(k for f in flags for k in f)),
    }


def selection_quality(candidates: Sequence[str], kept: Sequence[str], quality: dict[str, str],
                      initial: Sequence[str] | None = None) -> dict:
    """How well one IDR-LMM round's selection matches the planted ground truth.

    Args:
        candidates: ids scored this round (``D_{i-1}``); kept: ids with score >= gamma (``D_i``).
        quality: id -> ``"good"`` or a defect kind (EPBD-synth's ``quality`` column).
        initial: ``D_0`` (all train ids), for the cumulative share removed so far.
    Returns:
        the rejection's precision (removed that are low quality / removed) and recall (low quality
        removed / low quality among the candidates), the share of good samples removed, the
        low-quality share before and after, per-kind removal, and with ``initial`` the cumulative
        share of planted low-quality samples removed since round 0.
    """
    kept_set = set(kept)
    removed = [i for i in candidates if i not in kept_set]
    bad = [i for i in candidates if quality[i] != "good"]
    good = [i for i in candidates if quality[i] == "good"]
    removed_bad = [i for i in removed if quality[i] != "good"]

    def ratio(a, b):
        return a / b if b else None

    by_kind = {}
    for kind in sorted({quality[i] for i in bad}):
        in_kind = [i for i in candidates if quality[i] == kind]
        by_kind[kind] = {"candidates": len(in_kind), "removed": sum(i not in kept_set for i in in_kind)}
    out = {
        "candidates": len(candidates), "kept": len(kept_set), "removed": len(removed),
        "low_quality_candidates": len(bad), "low_quality_removed": len(removed_bad),
        "precision": ratio(len(removed_bad), len(removed)),
        "recall": ratio(len(removed_bad), len(bad)),
        "good_removed_fraction": ratio(len(removed) - len(removed_bad), len(good)),
        "low_quality_share_before": ratio(len(bad), len(candidates)),
        "low_quality_share_after": ratio(sum(quality[i] != "good" for i in kept_set), len(kept_set)),
        "by_kind": by_kind,
    }
    if initial is not None:
        planted = [i for i in initial if quality[i] != "good"]
        out["cumulative_low_quality_removed"] = ratio(sum(i not in kept_set for i in planted), len(planted))
        out["cumulative_good_removed"] = ratio(
            sum(i not in kept_set for i in initial if quality[i] == "good"),
            sum(quality[i] == "good" for i in initial))
    return out
