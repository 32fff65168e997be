"""How the demo world's training and sampling settings were chosen: on the validation split only.

    python -m diffusers_product2img.demo.select --output_dir demo_selection

Trains one arm per UNet learning rate (CBA, all training data, the full mode's total steps, seed 0)
from the demo world's base model, generates the *validation* products with each model at each
guidance scale, and ranks the settings by validation scene accuracy (ties: lower FD-BG). The test
splits are never read. The winner is what :class:`diffusers_product2img.demo.run.DemoSettings`
uses for every arm and seed; ``selection.md`` / ``selection.json`` record the comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

__all__ = ["run_selection", "main"]

LEARNING_RATES = (5e-4, 1e-3, 2e-3)
GUIDANCE_SCALES = (1.0, 2.0, 3.0)


def run_selection(output_dir, *, learning_rates=LEARNING_RATES, guidance_scales=GUIDANCE_SCALES, seed: int = 0,
                  batch_size: int | None = None, steps: int | None = None, cache_dir=None, train_script=None) -> dict:
    from ..baselines.benchmark import load_benchmark_samples
    from .report import format_table
    from .run import MODES, Evaluator, Progress, _common_train_args, _model_done, load_train_script
    from .standins import standin_metrics
    from .world import build_world

    out = Path(output_dir)
    base = MODES["full"]
    if batch_size:
        base = replace(base, train_batch_size=batch_size)
    progress = Progress()
    tp = load_train_script(train_script)
    world = build_world(out / "world", base.world, cache_dir=cache_dir, log=progress)
    validation = load_benchmark_samples(world.data_root, "validation", resolution=base.world.resolution)
    from ..data.layout import EPBDLayout

    all_ids = [s.id for s in EPBDLayout(world.data_root).split_samples("train")]
    steps = steps or sum(base.round_steps)
    rows = []
    for lr in learning_rates:
        settings = replace(base, learning_rate=lr)
        model_dir = out / f"bs-{base.train_batch_size}-steps-{steps}-lr-{lr:g}" / "model"
        if not _model_done(model_dir):
            progress(f"lr {lr:g}: training {steps} steps (CBA, all training data, seed {seed})")
            trainer = tp.round_trainer(_common_train_args(world, settings, seed, out / "cache"))
            trainer(1, all_ids, str(world.base_model), steps, model_dir)
        for gs in guidance_scales:
            evaluator = Evaluator({}, replace(settings, guidance_scale=gs), progress)
            images = evaluator.generate(model_dir, validation, seed * 10_000)
            m = standin_metrics(images, [s.reference for s in validation], [s.product_image for s in validation],
                                [s.product_mask for s in validation], [s.category for s in validation])["metrics"]
            rows.append({"learning_rate": lr, "guidance_scale": gs, "batch_size": base.train_batch_size, **m})
            progress(f"lr {lr:g}, guidance {gs:g}: validation scene acc. {100 * m['SceneAcc']:.1f}%, "
                     f"FD-BG {m['FD-BG']:.1f}")
    best = max(rows, key=lambda r: (r["SceneAcc"], -r["FD-BG"]))
    payload = {"split": "validation", "seed": seed, "steps": steps, "batch_size": base.train_batch_size,
               "n_validation": len(validation), "text_encoder_learning_rate":
               base.text_encoder_learning_rate, "rows": rows, "best": best}
    (out / "selection.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    table = format_table(["UNet lr", "guidance", "val. scene acc. %", "val. defects %", "val. FD-BG"],
                         [[f"{r['learning_rate']:g}", f"{r['guidance_scale']:g}", f"{100 * r['SceneAcc']:.1f}",
                           f"{100 * r['DefectRate']:.1f}", f"{r['FD-BG']:.1f}"] for r in rows])
    (out / "selection.md").write_text(
        f"Validation split only ({len(validation)} products), seed {seed}, {steps} steps, batch "
        f"{base.train_batch_size}, CBA, all training data.\n\n{table}\n\n"
        f"Chosen: UNet lr {best['learning_rate']:g}, guidance scale {best['guidance_scale']:g}\n", encoding="utf-8")
    print(table)
    print(f"chosen: UNet lr {best['learning_rate']:g}, guidance scale {best['guidance_scale']:g}")
    return payload


def main(argv=None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m diffusers_product2img.demo.select", description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default="demo_selection")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--train_script", default=None)
    p.add_argument("--batch_size", type=int, default=None, help="default: the full mode's")
    p.add_argument("--steps", type=int, default=None, help="default: the full mode's total steps")
    p.add_argument("--learning_rates", default=",".join(f"{v:g}" for v in LEARNING_RATES))
    p.add_argument("--guidance_scales", default=",".join(f"{v:g}" for v in GUIDANCE_SCALES))
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
    from .world import default_demo_cache_dir

    run_selection(args.output_dir, cache_dir=Path(args.cache_dir) if args.cache_dir else default_demo_cache_dir(),
                  train_script=args.train_script, batch_size=args.batch_size, steps=args.steps,
                  learning_rates=[float(v) for v in args.learning_rates.split(",")],
                  guidance_scales=[float(v) for v in args.guidance_scales.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
