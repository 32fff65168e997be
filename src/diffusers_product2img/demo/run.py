"""The offline end-to-end demo: ``python -m diffusers_product2img.demo --output_dir demo_output [--quick]``.

On a machine with no Hub access, one command:

1. builds the demo world (:mod:`.world`): EPBD-synth (30% planted low-quality training samples),
   its Hub-native export, and a small "pretrained SD-Inpainting" (a pretrained autoencoder and a
   UNet pretrained on generic scene inpainting), cached after the first run;
2. for every seed: runs **IDR-LMM** for 3 rounds (:func:`diffusers_product2img.idr.rounds.run_idr`)
   against the simulated LMM server through the real ``openai`` client
   (:class:`~diffusers_product2img.idr.scorer.OpenAICompatibleScorer`), training each round with
   CBA through ``examples/train_product2img.py`` (its ``round_trainer``); trains the same steps
   **without IDR** (all data) and round 1 **without CBA** (round-1 data); evaluates every model on
   ``test`` and ``test_unseen`` with the weight-free stand-ins (:mod:`.standins`);
3. runs a Table-1-style comparison through ``run_benchmark`` and the metrics library, with a random
   tiny CLIP (plumbing only: those numbers are not comparable to the paper's);
4. writes ``report.md``, ``report.html``, ``tables.json``, ``rounds.png`` (Figure 8) and image
   grids, and prints the ablation tables.

Every hyperparameter of the demo world was chosen on the validation split (see :data:`SELECTION`);
the test splits are only reported. ``--quick`` is a smaller run for smoke tests (under 3 minutes
on 2 CPU cores), ``--smoke`` an even smaller one for the test suite. The numbers of those modes are
not meant to show the ablations.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .alignment import alignment_check
from .world import WorldConfig, build_world, default_demo_cache_dir

__all__ = ["DemoSettings", "MODES", "SELECTION", "run_demo", "main", "load_train_script"]

logger = logging.getLogger(__name__)

SPLITS = ("test", "test_unseen")


@dataclass
class DemoSettings:
    """One demo run. The learning rates, guidance scale and sampler steps are the demo world's, chosen on
    the validation split (:data:`SELECTION`); the paper's 1e-5/1e-6 are for fine-tuning the real SD."""

    mode: str = "full"
    world: WorldConfig = field(default_factory=WorldConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    round_steps: tuple[int, ...] = (130, 45, 45)  # the paper's 3000/1000/1000, scaled to the CPU budget
    train_batch_size: int = 64
    learning_rate: float = 1e-3  # UNet + <background> row
    text_encoder_learning_rate: float = 1e-4
    lr_warmup_steps: int = 20
    cba_weight: float = 0.01  # lambda, paper 5.1.1
    gamma: float = 4.0  # paper 5.1.1
    inference_steps: int = 20
    guidance_scale: float = 2.0
    test_limit: int | None = None
    grid_products: int = 6
    table1: bool = True
    lmm_miss_prob: float = 0.4  # the simulated LMM's imperfection (its defaults)
    lmm_miss_prob_named: float = 0.05

    def to_json(self) -> dict:
        d = asdict(self)
        d["world"] = asdict(self.world)
        return d


#: What was compared on the validation split to choose the demo world's settings (filled in by the
#: selection run documented in the README; the test splits were not looked at).
SELECTION: dict = {
    "command": "python -m diffusers_product2img.demo.select --batch_size 64 --steps 400 --learning_rates 5e-4,1e-3,2e-3",
    "note": "one model per UNet learning rate (seed 0, CBA, all training data), validation products generated at each "
            "guidance scale; ranked by validation scene accuracy (ties: FD-BG). Chosen: lr 1e-3, guidance 2. The "
            "test splits were not read.",
    "split": "validation", "n_validation": 96, "seed": 0, "steps": 400, "batch_size": 64,
    "rows": [
        {"learning_rate": 0.0005, "guidance_scale": 1, "SceneAcc": 0.3125, "DefectRate": 0.0312, "FD-BG": 503.0},
        {"learning_rate": 0.0005, "guidance_scale": 2, "SceneAcc": 0.3958, "DefectRate": 0.0104, "FD-BG": 438.8},
        {"learning_rate": 0.0005, "guidance_scale": 3, "SceneAcc": 0.3438, "DefectRate": 0.0000, "FD-BG": 537.6},
        {"learning_rate": 0.001, "guidance_scale": 1, "SceneAcc": 0.3229, "DefectRate": 0.0417, "FD-BG": 573.9},
        {"learning_rate": 0.001, "guidance_scale": 2, "SceneAcc": 0.4271, "DefectRate": 0.0104, "FD-BG": 383.3},
        {"learning_rate": 0.001, "guidance_scale": 3, "SceneAcc": 0.3438, "DefectRate": 0.0104, "FD-BG": 788.7},
        {"learning_rate": 0.002, "guidance_scale": 1, "SceneAcc": 0.3438, "DefectRate": 0.0417, "FD-BG": 654.6},
        {"learning_rate": 0.002, "guidance_scale": 2, "SceneAcc": 0.3854, "DefectRate": 0.0312, "FD-BG": 507.5},
        {"learning_rate": 0.002, "guidance_scale": 3, "SceneAcc": 0.3750, "DefectRate": 0.0104, "FD-BG": 576.3}
    ],
    "chosen": {"learning_rate": 1e-3, "guidance_scale": 2.0},
}
"""The validation-split comparison that chose the demo world's learning rate and guidance scale (numbers of the
run recorded in the README; rerun it with the command above)."""

MODES: dict[str, DemoSettings] = {
    "full": DemoSettings(),
    "quick": DemoSettings(
        mode="quick",
        world=WorldConfig(num_train=240, num_validation=16, num_test=32, num_test_unseen=32, vae_steps=150,
                          unet_pretrain_steps=200, pretrain_images=500),
        seeds=(0,), round_steps=(60, 20, 20), train_batch_size=32, grid_products=4,
    ),
    "smoke": DemoSettings(
        mode="smoke",
        world=WorldConfig(num_train=72, num_validation=4, num_test=8, num_test_unseen=8, vae_steps=20,
                          unet_pretrain_steps=10, pretrain_images=64),
        seeds=(0,), round_steps=(6, 3, 3), train_batch_size=8, inference_steps=4, grid_products=3,
    ),
}


# ------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------


class Progress:
    """Timestamped progress lines on stdout (the training script adds its own step bars on stderr)."""

    def __init__(self, quiet: bool = False):
        self.start = time.perf_counter()
        self.quiet = quiet
        self.marks: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        if not self.quiet:
            m, s = divmod(int(self.elapsed()), 60)
            print(f"[{m:02d}:{s:02d}] {message}", flush=True)

    def timed(self, key: str):
        progress = self

        class _Timer:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                progress.marks[key] = progress.marks.get(key, 0.0) + time.perf_counter() - self.t

        return _Timer()


# ------------------------------------------------------------------------------------------------
# The training script
# ------------------------------------------------------------------------------------------------


def load_train_script(path: str | os.PathLike | None = None):
    """Import ``examples/train_product2img.py`` (not a package module) from its path.

    Looked up in: ``path``, ``$PRODUCT2IMG_TRAIN_SCRIPT``, the source checkout this package was
    installed from (editable install), ``./examples/``.
    """
    here = Path(__file__).resolve()
    candidates = [path, os.environ.get("PRODUCT2IMG_TRAIN_SCRIPT"),
                  here.parents[3] / "examples" / "train_product2img.py",
                  Path.cwd() / "examples" / "train_product2img.py"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            spec = importlib.util.spec_from_file_location("product2img_train_script", str(candidate))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise FileNotFoundError(
        "examples/train_product2img.py not found: run the demo from the repository checkout, or pass "
        "--train_script PATH (or set PRODUCT2IMG_TRAIN_SCRIPT)")


def _model_done(model_dir: Path) -> bool:
    # save_output writes the pipeline, then the model card last
    return (model_dir / "model_index.json").exists() and (model_dir / "README.md").exists()


# ------------------------------------------------------------------------------------------------
# Generation and evaluation of one model
# ------------------------------------------------------------------------------------------------


class Evaluator:
    """Generates the test splits with a model (``run_benchmark``) and scores them with the stand-ins."""

    def __init__(self, splits: dict[str, list], settings: DemoSettings, progress: Progress):
        self.splits, self.settings, self.progress = splits, settings, progress

    def generate(self, model_dir: str | Path, samples: list, seed: int) -> list:
        from ..baselines.methods import Product2ImgMethod

        method = Product2ImgMethod.from_pretrained(str(model_dir))
        res = self.settings.world.resolution
        return method.generate([s.product_name for s in samples], [s.product_image for s in samples],
                               [s.product_mask for s in samples], height=res, width=res,
                               num_inference_steps=self.settings.inference_steps,
                               guidance_scale=self.settings.guidance_scale,
                               seed=[seed + i for i in range(len(samples))])

    def __call__(self, model_dir: str | Path, out_dir: Path, seed: int) -> dict:
        from PIL import Image

        from ..baselines.benchmark import run_benchmark
        from ..baselines.methods import Product2ImgMethod
        from .standins import standin_metrics

        result_path = out_dir / "standins.json"
        if result_path.exists():
            return json.loads(result_path.read_text(encoding="utf-8"))
        with self.progress.timed("evaluate"):
            method = Product2ImgMethod.from_pretrained(str(model_dir))
            res = self.settings.world.resolution
            results = {}
            for split, samples in self.splits.items():
                run_benchmark([method], samples, out_dir / split, resolution=res,
                              num_inference_steps=self.settings.inference_steps,
                              guidance_scale=self.settings.guidance_scale, seed=seed, batch_size=len(samples),
                              skip_metrics=True, extra_settings={"model": str(model_dir), "split": split})
                generated = []
                for s in samples:
                    with Image.open(out_dir / split / method.name / f"{s.id}.png") as im:
                        generated.append(im.convert("RGB"))
                results[split] = standin_metrics(generated, [s.reference for s in samples],
                                                 [s.product_image for s in samples], [s.product_mask for s in samples],
                                                 [s.category for s in samples])
        result_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        return results


# ------------------------------------------------------------------------------------------------
# One seed: IDR-LMM (CBA), w/o IDR, w/o CBA
# ------------------------------------------------------------------------------------------------


def _common_train_args(world, settings: DemoSettings, seed: int, cache_root: Path) -> list[str]:
    return [
        "--clip_model_name_or_path", str(world.clip_model),
        "--train_data_dir", str(world.export_dir),
        "--resolution", str(settings.world.resolution),
        "--train_batch_size", str(settings.train_batch_size),
        "--learning_rate", str(settings.learning_rate),
        "--text_encoder_learning_rate", str(settings.text_encoder_learning_rate),
        "--lr_warmup_steps", str(settings.lr_warmup_steps),
        "--cba_weight", str(settings.cba_weight),
        "--seed", str(seed),
        "--use_feature_cache", "--feature_cache_dir", str(cache_root / "features"),
        "--cache_dir", str(cache_root / "datasets"),
        "--report_to", "none", "--checkpointing_steps", "0", "--validation_steps", "0",
        "--num_validation_products", "0",
    ]


def run_seed(seed: int, world, settings: DemoSettings, train_script, evaluator: Evaluator, out: Path,
             progress: Progress, validation: list) -> dict:
    from ..data.layout import SCORES_DIR, EPBDLayout
    from ..idr.rounds import IDRConfig, run_idr
    from ..idr.scorer import OpenAICompatibleScorer, ScorerConfig
    from ..idr.simulated_lmm import SimulatedLMMServer
    from .standins import selection_quality

    root = out / "runs" / f"seed-{seed}"
    data = root / "epbd_synth"
    if not data.exists():  # each seed's IDR writes its own round scores into its own copy
        shutil.copytree(world.data_root, data, ignore=shutil.ignore_patterns(SCORES_DIR))
    lay = EPBDLayout(data)
    train_samples = lay.split_samples("train")
    quality = {s.id: s.extra["quality"] for s in train_samples}
    all_ids = [s.id for s in train_samples]
    common = _common_train_args(world, settings, seed, out / "cache")
    cba_trainer = train_script.round_trainer(common)
    plain_trainer = train_script.round_trainer([*common, "--no_cba"])
    steps = tuple(settings.round_steps)
    by_id = {s.id: s for s in validation}
    result: dict = {"seed": seed, "idr": {}, "no_idr": {}, "no_cba": {}}

    def train(trainer, label, round_index, ids, init, n_steps, out_dir: Path) -> Path:
        if _model_done(out_dir):
            progress(f"seed {seed} · {label}: done earlier ({out_dir})")
            return out_dir
        progress(f"seed {seed} · {label}: training {n_steps} steps on {len(ids)} samples")
        with progress.timed("train"):
            trainer(round_index, ids, init, n_steps, out_dir)
        return out_dir

    def generate_validation(model_dir, samples):
        with progress.timed("idr_validation"):
            return evaluator.generate(model_dir, [by_id[s.id] for s in samples], seed * 10_000)

    def on_round_end(rec, state):
        layout = EPBDLayout(data)
        selection = selection_quality(layout.kept_ids(rec.round - 1), layout.kept_ids(rec.round), quality,
                                      initial=all_ids)
        progress(f"seed {seed} · IDR round {rec.round}: evaluating on {', '.join(SPLITS)}")
        evaluation = evaluator(rec.model_dir, root / "eval" / f"idr-round-{rec.round}", seed * 10_000)
        return {"selection": selection, "eval": evaluation}

    # 1. IDR-LMM with CBA, 3 rounds
    def idr_trainer(round_index, kept_ids, init_model, n_steps, output_dir):
        return train(cba_trainer, f"IDR round {round_index}", round_index, kept_ids, init_model, n_steps,
                     Path(output_dir))

    progress(f"seed {seed} · IDR-LMM: simulated LMM server + OpenAI-compatible scorer")
    with SimulatedLMMServer(seed=seed, miss_prob=settings.lmm_miss_prob,
                            miss_prob_named=settings.lmm_miss_prob_named) as server:
        config = ScorerConfig(model="sim-lmm", base_url=server.base_url, show_progress=False, concurrency=8)
        with OpenAICompatibleScorer(config, store=root / "lmm_results.jsonl") as scorer:
            with progress.timed("idr_total"):
                state = run_idr(
                    IDRConfig(rounds=len(steps), round_steps=steps, gamma=settings.gamma), data_root=data,
                    scorer=scorer, train_round=idr_trainer, generate_validation=generate_validation,
                    work_dir=root / "idr", init_model=str(world.base_model), on_round_end=on_round_end,
                )
        result["lmm_requests"] = server.chat_requests
    for r, rec in sorted(state.rounds.items()):
        sel = rec.extra["selection"]
        result["idr"][r] = {"steps_total": sum(steps[:r]), "kept": rec.kept, "candidates": rec.candidates,
                            "feedback_used": rec.feedback_used, "feedback": rec.feedback,
                            "selection": sel, "eval": rec.extra["eval"], "model_dir": rec.model_dir}
        progress(f"seed {seed} · IDR round {r}: kept {rec.kept}/{rec.candidates}; low-quality removed "
                 f"{_pct(sel['recall'])} (precision {_pct(sel['precision'])}), cumulative "
                 f"{_pct(sel['cumulative_low_quality_removed'])}; scene acc. test "
                 f"{_pct(rec.extra['eval']['test']['metrics']['SceneAcc'])}")
    result["idr_state"] = str(root / "idr" / "idr_state.json")

    # 2. Same steps without IDR (all training data), chained like the rounds
    previous = str(world.base_model)
    for i, n in enumerate(steps, start=1):
        model_dir = train(cba_trainer, f"w/o IDR stage {i}", i, all_ids, previous, n,
                          root / "no_idr" / f"stage-{i}" / "model")
        evaluation = evaluator(model_dir, root / "eval" / f"no-idr-{i}", seed * 10_000)
        result["no_idr"][i] = {"steps_total": sum(steps[:i]), "eval": evaluation, "model_dir": str(model_dir)}
        previous = str(model_dir)

    # 3. Round 1 without CBA: same data (round-1 selection), same steps
    kept_1 = EPBDLayout(data).kept_ids(1)
    model_dir = train(plain_trainer, "w/o CBA (round-1 data)", 1, kept_1, str(world.base_model), steps[0],
                      root / "no_cba" / "model")
    result["no_cba"] = {"steps_total": steps[0], "eval": evaluator(model_dir, root / "eval" / "no-cba", seed * 10_000),
                        "model_dir": str(model_dir)}
    return result


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


# ------------------------------------------------------------------------------------------------
# Table 1 (plumbing, tiny CLIP) on the first seed's models
# ------------------------------------------------------------------------------------------------


def run_table1(world, settings: DemoSettings, seed_result: dict, samples: list, out: Path, progress: Progress) -> dict:
    from PIL import Image

    from ..baselines.benchmark import LazyMethod, run_benchmark
    from ..baselines.methods import Product2ImgMethod, SDInpaintingMethod
    from ..metrics.evaluate import EvalConfig
    from .standins import standin_metrics

    steps = settings.round_steps
    rows = [
        ("sd-inpainting", "SD-Inpainting (demo base, not fine-tuned)",
         lambda: SDInpaintingMethod.from_pretrained(str(world.base_model))),
        ("no-cba", f"w/o CBA (round-1 data, {steps[0]} steps)", seed_result["no_cba"]["model_dir"]),
        ("no-idr", f"w/o IDR (CBA, all data, {sum(steps)} steps)", seed_result["no_idr"][len(steps)]["model_dir"]),
        ("product2img", f"Product2Img (CBA + IDR-LMM, {sum(steps)} steps)",
         seed_result["idr"][len(steps)]["model_dir"]),
    ]

    def lazy(name, display, source):
        def build():
            method = source() if callable(source) else Product2ImgMethod.from_pretrained(str(source))
            method.display_name = display
            return method

        return LazyMethod(name, build, display)

    config = EvalConfig(clip_model=str(world.clip_model), pickscore_model=str(world.clip_model),
                        pickscore_processor=str(world.clip_model), aesthetic_weights=None, fid="fd-clip",
                        batch_size=16)
    progress("Table 1 (plumbing): benchmark harness + metrics library with the random tiny CLIP")
    res = settings.world.resolution
    with progress.timed("table1"):
        result = run_benchmark([lazy(*r) for r in rows], samples, out / "table1", resolution=res,
                               num_inference_steps=settings.inference_steps, guidance_scale=settings.guidance_scale,
                               seed=settings.seeds[0] * 10_000, batch_size=len(samples), eval_config=config)
        standins = {}
        for name, display, _ in rows:
            generated = []
            for s in samples:
                with Image.open(out / "table1" / name / f"{s.id}.png") as im:
                    generated.append(im.convert("RGB"))
            standins[display] = standin_metrics(generated, [s.reference for s in samples],
                                                [s.product_image for s in samples], [s.product_mask for s in samples],
                                                [s.category for s in samples])
    return {"metrics": {k: v["metrics"] for k, v in result["metrics"].items()}, "standins": standins,
            "details": {k: v.get("details") for k, v in result["metrics"].items()},
            "table": {k: os.path.relpath(v, out) for k, v in result["table"].items()}}


# ------------------------------------------------------------------------------------------------
# The whole demo
# ------------------------------------------------------------------------------------------------


def run_demo(output_dir: str | os.PathLike, settings: DemoSettings, *, cache_dir: Path | None = None,
             train_script: str | None = None, quiet: bool = False) -> dict:
    """Run the demo into ``output_dir``; returns the ``tables.json`` payload."""
    from ..baselines.benchmark import load_benchmark_samples
    from . import summary

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(quiet=quiet)
    progress(f"Product2Img offline demo ({settings.mode} mode): seeds {list(settings.seeds)}, round steps "
             f"{list(settings.round_steps)}, batch {settings.train_batch_size}, output {out}")
    tp = load_train_script(train_script)

    with progress.timed("world"):
        world = build_world(out / "world", settings.world, cache_dir=cache_dir, log=progress)
    res = settings.world.resolution
    splits = {split: load_benchmark_samples(world.data_root, split, limit=settings.test_limit, resolution=res)
              for split in SPLITS}
    validation = load_benchmark_samples(world.data_root, "validation", resolution=res)
    evaluator = Evaluator(splits, settings, progress)

    seeds = {}
    for k, seed in enumerate(settings.seeds, start=1):
        progress(f"=== seed {seed} ({k}/{len(settings.seeds)}) ===")
        seeds[seed] = run_seed(seed, world, settings, tp, evaluator, out, progress, validation)

    # Why CBA does or does not show in Table 2: did the text features move towards the backgrounds?
    progress("CBA mechanism check: do the names' <background> features group by scene?")
    with progress.timed("alignment"):
        alignment = alignment_check(world.data_root, world.clip_model, splits, seeds, res)

    table1 = None
    if settings.table1:
        table1 = run_table1(world, settings, seeds[settings.seeds[0]], splits["test"], out, progress)

    progress("writing the report")
    payload = summary.write_outputs(out, settings, world, seeds, table1, splits, progress, alignment)
    progress(f"done in {progress.elapsed() / 60:.1f} min: {out / 'report.md'} and {out / 'report.html'}")
    return payload


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m diffusers_product2img.demo", description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default="demo_output")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a smaller run for smoke tests (< 3 min on 2 cores)")
    mode.add_argument("--smoke", action="store_true", help="the smallest run (the test suite's; numbers meaningless)")
    p.add_argument("--seeds", default=None, help="comma list of seeds (default: 0,1,2 full, 0 quick)")
    p.add_argument("--cache_dir", default=None,
                   help="cache of the demo world's pretrained models (default $DIFFUSERS_PRODUCT2IMG_CACHE or "
                        "~/.cache/diffusers_product2img)")
    p.add_argument("--no_cache", action="store_true", help="always pretrain the demo world's models")
    p.add_argument("--train_script", default=None, help="path of examples/train_product2img.py")
    p.add_argument("--no_table1", action="store_true", help="skip the Table-1-style plumbing table")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    # The training script configures logging at INFO when nothing else has; keep the demo's output to
    # its own progress lines and the training step bars.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()

    settings = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.seeds:
        settings = replace(settings, seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()))
    if args.no_table1:
        settings = replace(settings, table1=False)
    cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_demo_cache_dir()
    run_demo(args.output_dir, settings, cache_dir=cache_dir, train_script=args.train_script, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
