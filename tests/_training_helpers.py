"""Shared by tests/test_training.py and the two-process worker (tests/_dist_train_worker.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "examples" / "train_product2img.py"


def load_train_script():
    """examples/train_product2img.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_product2img", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_epbd_synth(root: Path, num_train: int = 16) -> Path:
    from diffusers_product2img.data.synth import SynthConfig, generate_epbd_synth

    return generate_epbd_synth(root, SynthConfig(
        seed=0, resolution=64, num_train=num_train, num_validation=2, num_test=0, num_test_unseen=0,
        num_unseen_categories=0,
    ))


def epbd_train_dataset(root: Path):
    """The train split of a raw EPBD(-synth) folder, exported next to it and loaded with load_epbd."""
    from diffusers_product2img.data import export_epbd, load_epbd

    exported = root.with_name(root.name + "-export")
    if not (exported / "README.md").exists():
        export_epbd(root, exported)
    return load_epbd(exported, None, split="train")


def base_args(inpainting_dir, clip_dir, output_dir, *extra) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(inpainting_dir), "--clip_model_name_or_path", str(clip_dir),
        "--output_dir", str(output_dir), "--resolution", "64", "--train_batch_size", "4",
        "--report_to", "none", "--num_validation_products", "0", "--lr_warmup_steps", "0",
        "--checkpointing_steps", "0", "--seed", "0", *map(str, extra),
    ]
