"""Metrics of the paper's Table 1 (FID, PickScore, Aesthetics, CLIP-c-I, CLIP-c-B) and product fidelity.

Every model id is an argument (Hub id or local folder); tests run the same code on tiny local
models. See :func:`evaluate_images` and :func:`write_metrics_table`.
"""

from .aesthetics import DEFAULT_AESTHETIC_WEIGHTS, AestheticMLP, aesthetic_scores, load_aesthetic_predictor
from .clip_scores import (
    DEFAULT_CLIP_MODEL,
    CLIPImageEncoder,
    clip_c_b,
    clip_c_i,
    clip_image_similarity,
    cosine_scores,
    cutout_to_rgb,
    generated_backgrounds,
)
from .evaluate import (
    ALL_METRICS,
    EvalConfig,
    MetricModels,
    evaluate_images,
    format_metrics_table,
    write_metrics_table,
)
from .fidelity import default_ring_width, exact_pixel_rate, expansion_rate, object_expansion, product_mae
from .frechet import (
    InceptionFeatureExtractor,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    inception_available,
)
from .pickscore import DEFAULT_PICKSCORE_MODEL, DEFAULT_PICKSCORE_PROCESSOR, PickScorer

__all__ = [
    "ALL_METRICS",
    "DEFAULT_AESTHETIC_WEIGHTS",
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_PICKSCORE_MODEL",
    "DEFAULT_PICKSCORE_PROCESSOR",
    "AestheticMLP",
    "CLIPImageEncoder",
    "EvalConfig",
    "InceptionFeatureExtractor",
    "MetricModels",
    "PickScorer",
    "aesthetic_scores",
    "clip_c_b",
    "clip_c_i",
    "clip_image_similarity",
    "cosine_scores",
    "cutout_to_rgb",
    "default_ring_width",
    "evaluate_images",
    "exact_pixel_rate",
    "expansion_rate",
    "feature_statistics",
    "format_metrics_table",
    "frechet_distance",
    "frechet_distance_from_features",
    "generated_backgrounds",
    "inception_available",
    "load_aesthetic_predictor",
    "object_expansion",
    "product_mae",
    "write_metrics_table",
]
