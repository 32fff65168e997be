"""EPBD: the raw layout, EPBD-synth, preprocessing shared with training, and the Hub-native export.

Heavy dependencies (``datasets``, ``huggingface_hub``) are imported only by the functions that need
them, so ``import diffusers_product2img.data`` stays cheap.
"""

from .layout import (
    DEFAULT_THRESHOLD,
    SPLITS,
    EPBDLayout,
    EPBDLayoutError,
    EPBDMissingScoresError,
    kept_ids,
    read_round_scores,
    round_config_name,
    score_column,
    write_round_scores,
)
from .preprocessing import load_epbd, prepare_example
from .synth import (
    CATEGORIES,
    DEFECT_KINDS,
    QUALITY_LABELS,
    SCENES,
    SynthConfig,
    category_scene,
    classify_scene,
    detect_defects,
    generate_epbd_synth,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "SPLITS",
    "EPBDLayout",
    "EPBDLayoutError",
    "EPBDMissingScoresError",
    "kept_ids",
    "read_round_scores",
    "round_config_name",
    "score_column",
    "write_round_scores",
    "load_epbd",
    "prepare_example",
    "CATEGORIES",
    "DEFECT_KINDS",
    "QUALITY_LABELS",
    "SCENES",
    "SynthConfig",
    "category_scene",
    "classify_scene",
    "detect_defects",
    "generate_epbd_synth",
    "export_epbd",
    "add_round_config",
    "push_epbd_to_hub",
]


def __getattr__(name):
    # The export pulls in datasets / huggingface_hub: import it on first use only.
    if name in ("export_epbd", "add_round_config", "push_epbd_to_hub"):
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
