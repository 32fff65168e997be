"""Algorithm 1 of the paper (IDR-LMM) as a resumable state machine.

Each round ``i``:

1. **select** (eq. 8): the LMM scores every train sample still in ``D_{i-1}`` with ``p_R``, ``c_R``
   and the previous round's feedback ``f_{i-1}``; samples with ``score >= gamma`` form ``D_i``. The
   scores are written into the raw EPBD folder (``scores/round_<i>.csv``), so the round's subset is
   also an EPBD config (``idr_round_<i>``) for ``load_dataset``;
2. **train**: the model of round ``i-1`` is trained on ``D_i`` for that round's steps (eq. 5);
3. **evaluate** (eq. 7): the new model generates the validation set, the LMM reviews each output
   with ``p_F`` and summarises all reviews into ``f_i`` with ``p_S``;
4. **publish**: the round's model (branch ``round-<i>``, ``main`` = latest), its card and the round's
   dataset config are pushed, when a publisher is given.

After every stage the state is written (atomically) to ``<work_dir>/idr_state.json``; a restarted
run continues at the first unfinished stage. Results of LMM calls are themselves persisted by the
scorer, so even a stage interrupted half-way re-sends nothing already answered.

Training and generation are passed in as functions, so the same loop drives the accelerate training
script, a notebook, or a test.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from ..data.layout import EPBDLayout, write_round_scores
from .scorer import LMMScorer, Sample

logger = logging.getLogger(__name__)

__all__ = ["IDRConfig", "RoundRecord", "IDRState", "run_idr", "TrainRound", "GenerateValidation", "STAGES"]

STAGES = ("selected", "trained", "evaluated", "published")
STATE_FILE = "idr_state.json"


class TrainRound(Protocol):
    def __call__(self, round_index: int, kept_ids: list[str], init_model: str | None, steps: int,
                 output_dir: Path) -> Path:
        """Train from ``init_model`` (None: the base model) on ``kept_ids``; return the model folder."""


class GenerateValidation(Protocol):
    def __call__(self, model_dir: Path, samples: list[Any]) -> list[Image.Image]:
        """Generate one image per validation sample (``data.layout.Sample``) with the model."""


@dataclass
class IDRConfig:
    """Settings of the loop (paper 5.1.1 defaults)."""

    rounds: int = 3
    round_steps: tuple[int, ...] = (3000, 1000, 1000)
    gamma: float = 4.0
    #: more failed LMM scores than this fraction of a round's candidates stops the run (a broken
    #: endpoint or prompt); fewer are dropped from the round and reported (never given a score).
    max_failed_fraction: float = 0.05
    validation_limit: int | None = None

    def __post_init__(self):
        self.round_steps = tuple(int(s) for s in self.round_steps)
        if self.rounds < 1:
            raise ValueError("rounds must be >= 1")
        if len(self.round_steps) == 1:
            self.round_steps = self.round_steps * self.rounds
        if len(self.round_steps) != self.rounds:
            raise ValueError(f"round_steps has {len(self.round_steps)} entries for {self.rounds} rounds")
        if any(s < 1 for s in self.round_steps):
            raise ValueError(f"round_steps must be positive, got {self.round_steps}")


@dataclass
class RoundRecord:
    """What happened in one round (persisted in the state file and shown in the model card)."""

    round: int
    stage: str | None = None
    candidates: int = 0
    kept: int = 0
    failed: int = 0
    failed_ids: list[str] = field(default_factory=list)
    score_histogram: dict[str, int] = field(default_factory=dict)
    feedback_used: str | None = None  # f_{i-1}, the feedback that sharpened this round's selection
    feedback: str | None = None  # f_i, produced by this round's evaluation
    steps: int = 0
    model_dir: str | None = None
    validation_dir: str | None = None
    lmm_cost: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class IDRState:
    config: dict
    rounds: dict[int, RoundRecord] = field(default_factory=dict)

    @classmethod
    def load_or_create(cls, path: Path, config: IDRConfig) -> IDRState:
        wanted = asdict(config)
        wanted["round_steps"] = list(config.round_steps)
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            if data["config"] != wanted:
                raise ValueError(
                    f"{path} was written by a run with different IDR settings ({data['config']}); use another "
                    "output folder or the same settings to resume"
                )
            rounds = {int(k): RoundRecord(**v) for k, v in data["rounds"].items()}
            return cls(config=wanted, rounds=rounds)
        return cls(config=wanted)

    def save(self, path: Path) -> None:
        data = {"config": self.config, "rounds": {str(k): asdict(v) for k, v in sorted(self.rounds.items())}}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    def done(self, round_index: int, stage: str) -> bool:
        rec = self.rounds.get(round_index)
        return rec is not None and rec.stage is not None and STAGES.index(rec.stage) >= STAGES.index(stage)


def _histogram(scores: dict[str, float]) -> dict[str, int]:
    counts = Counter(str(int(round(s))) for s in scores.values())
    return {str(k): counts.get(str(k), 0) for k in range(1, 6)}


def _to_lmm_sample(lay: EPBDLayout, sample, image: Image.Image | None = None) -> Sample:
    """A scorer Sample whose images are read from disk only when the request is built."""

    def load(kind: str) -> Callable[[], Image.Image]:
        return lambda: lay.load_sample_files(sample, with_mask=False)[kind]

    return Sample(
        id=sample.id, product_name=sample.product_name, category=sample.category,
        image=image if image is not None else load("image"), cutout=load("cutout"),
    )


def run_idr(
    config: IDRConfig,
    *,
    data_root: str | os.PathLike,
    scorer: LMMScorer,
    train_round: TrainRound,
    generate_validation: GenerateValidation,
    work_dir: str | os.PathLike,
    init_model: str | None = None,
    on_round_end: Callable[[RoundRecord, IDRState], dict | None] | None = None,
    is_main_process: bool = True,
    wait_for_everyone: Callable[[], None] = lambda: None,
) -> IDRState:
    """Run (or resume) IDR-LMM for ``config.rounds`` rounds.

    Args:
        config: rounds, steps per round, gamma.
        data_root: the raw EPBD folder; each round's scores are written into it.
        scorer: the LMM scorer (its result store makes every LMM call exactly-once across restarts).
        train_round: trains one round, see :class:`TrainRound`.
        generate_validation: renders the validation products with a model, see :class:`GenerateValidation`.
        work_dir: where round models, validation images and the state file go.
        init_model: the model round 1 starts from (``M_{S_0}``); None lets ``train_round`` decide.
        on_round_end: called after each round's evaluation (exporting the round config, metrics,
            Hub pushes, plots); it may return a dict stored in the round's ``extra``. It runs again
            on resume until it has returned once, so it must be idempotent.
        is_main_process / wait_for_everyone: under a multi-process launcher every process calls
            ``run_idr``; the LMM stages, validation and publishing run on the main process only,
            training on all of them, and every stage ends with a barrier after which all processes
            re-read the state file.
    Returns:
        the final :class:`IDRState`.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / STATE_FILE
    state = IDRState.load_or_create(state_path, config)
    lay = EPBDLayout(data_root)
    validation = lay.split_samples("validation")[: config.validation_limit]
    if not validation:
        raise ValueError(f"{data_root} has no validation samples: IDR-LMM needs D_dev to produce feedback")
    model = init_model

    for i in range(1, config.rounds + 1):
        rec = state.rounds.setdefault(i, RoundRecord(round=i, steps=config.round_steps[i - 1]))
        previous = state.rounds.get(i - 1)
        feedback_prev = previous.feedback if previous else None

        # 1. Data selection (eq. 8)
        if not state.done(i, "selected") and is_main_process:
            lay = EPBDLayout(data_root)
            candidates = [lay.by_id[sid] for sid in lay.kept_ids(i - 1)]
            logger.info("IDR round %d: scoring %d samples", i, len(candidates))
            report = scorer.score_samples([_to_lmm_sample(lay, s) for s in candidates], round=i, feedback=feedback_prev)
            failures = report.failures()
            if len(failures) > config.max_failed_fraction * max(1, len(candidates)):
                first = next(iter(failures.values()))
                raise RuntimeError(
                    f"round {i}: {len(failures)} of {len(candidates)} LMM scores failed (e.g. {first.sample_id}: "
                    f"{first.error_type}: {first.error}); fix the endpoint/prompt and run again: answered samples "
                    "are not re-sent"
                )
            scores = {sid: float(v) for sid, v in report.scores().items()}
            # A failed sample gets no score; it is recorded as failed and not kept (below gamma by absence).
            write_round_scores(
                data_root, i, {**scores, **{sid: 0.0 for sid in failures}}, threshold=config.gamma,
                info={"scorer_model": getattr(getattr(scorer, "config", None), "model", None),
                      "failed_ids": sorted(failures), "feedback_used": feedback_prev},
                overwrite=i in EPBDLayout(data_root).rounds,
            )
            kept = EPBDLayout(data_root).kept_ids(i)
            rec.candidates, rec.kept, rec.failed = len(candidates), len(kept), len(failures)
            rec.failed_ids = sorted(failures)
            rec.score_histogram = _histogram(scores)
            rec.feedback_used = feedback_prev
            rec.lmm_cost += report.cost
            rec.stage = "selected"
            state.save(state_path)
            logger.info("IDR round %d: kept %d of %d (failed %d)", i, rec.kept, rec.candidates, rec.failed)
            if rec.kept == 0:
                raise RuntimeError(f"round {i}: no sample reached gamma={config.gamma}; nothing to train on")
        state, rec, previous = _sync(state_path, config, i, wait_for_everyone)

        # 2. Model training, from the previous round's model
        if not state.done(i, "trained"):
            kept = EPBDLayout(data_root).kept_ids(i)
            init = previous.model_dir if previous else model
            out = work_dir / f"round-{i}" / "model"
            model_dir = train_round(i, kept, init, config.round_steps[i - 1], out)
            if is_main_process:
                rec.model_dir = str(model_dir)
                rec.stage = "trained"
                state.save(state_path)
        state, rec, previous = _sync(state_path, config, i, wait_for_everyone)

        # 3. Model evaluation and feedback (eq. 7)
        if not state.done(i, "evaluated") and is_main_process:
            val_dir = work_dir / f"round-{i}" / "validation"
            val_dir.mkdir(parents=True, exist_ok=True)
            images = generate_validation(Path(rec.model_dir), validation)
            if len(images) != len(validation):
                raise RuntimeError(f"generate_validation returned {len(images)} images for {len(validation)} samples")
            for sample, img in zip(validation, images):
                tmp = val_dir / f".{sample.id}.png.tmp"
                img.save(tmp, format="PNG")
                os.replace(tmp, val_dir / f"{sample.id}.png")
            lay = EPBDLayout(data_root)
            outputs = [_to_lmm_sample(lay, s, image=img) for s, img in zip(validation, images)]
            report = scorer.feedback_on_outputs(outputs, round=i)
            texts = [r.text for r in report.results.values() if r.ok and r.text]
            if not texts:
                raise RuntimeError(f"round {i}: the LMM gave no usable feedback on the validation outputs")
            rec.feedback = scorer.summarize_feedback(texts, round=i)
            rec.validation_dir = str(val_dir)
            rec.lmm_cost += report.cost
            rec.stage = "evaluated"
            state.save(state_path)
            logger.info("IDR round %d feedback: %s", i, rec.feedback)

        # 4. Publish (export the round config, push, plots): idempotent, retried on resume
        if not state.done(i, "published") and is_main_process:
            if on_round_end is not None:
                extra = on_round_end(rec, state)
                if extra:
                    rec.extra.update(extra)
            rec.stage = "published"
            state.save(state_path)
        state, rec, previous = _sync(state_path, config, i, wait_for_everyone)
    return state


def _sync(state_path: Path, config: IDRConfig, i: int, wait_for_everyone: Callable[[], None]):
    """Barrier, then the state as the main process wrote it (a no-op re-read with one process)."""
    wait_for_everyone()
    state = IDRState.load_or_create(state_path, config)
    return state, state.rounds.setdefault(i, RoundRecord(round=i, steps=config.round_steps[i - 1])), state.rounds.get(i - 1)


def data_size_plot(state: IDRState, path: str | os.PathLike, total_train: int | None = None) -> Path:
    """The paper's Figure 8: training-set size per round and the score distribution of each round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = sorted(state.rounds)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    sizes = [state.rounds[r].kept for r in rounds]
    labels = [f"round {r}" for r in rounds]
    if total_train is not None:
        sizes, labels = [total_train, *sizes], ["all", *labels]
    ax1.bar(labels, sizes, color="#4c72b0")
    for x, v in enumerate(sizes):
        ax1.text(x, v, str(v), ha="center", va="bottom", fontsize=8)
    ax1.set_ylabel("training samples")
    ax1.set_title("Data size per round")
    width = 0.8 / max(1, len(rounds))
    for j, r in enumerate(rounds):
        hist = state.rounds[r].score_histogram
        xs = [int(k) + (j - (len(rounds) - 1) / 2) * width for k in sorted(hist, key=int)]
        ax2.bar(xs, [hist[k] for k in sorted(hist, key=int)], width=width, label=f"round {r}")
    ax2.set_xlabel("LMM score")
    ax2.set_title("Score distribution")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def round_summary_rows(state: IDRState) -> list[dict[str, Any]]:
    """One row per round for reports: candidates, kept, failed, scores, feedback."""
    rows = []
    for r in sorted(state.rounds):
        rec = state.rounds[r]
        rows.append({
            "round": r, "candidates": rec.candidates, "kept": rec.kept, "failed": rec.failed,
            "steps": rec.steps, "score_histogram": rec.score_histogram, "feedback_used": rec.feedback_used,
            "feedback": rec.feedback, "lmm_cost": round(rec.lmm_cost, 6),
        })
    return rows


def parse_round_steps(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"3000,1000,1000"`` -> ``(3000, 1000, 1000)``."""
    if isinstance(text, str):
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"round steps must be comma-separated integers, got {text!r}") from None
    return tuple(int(v) for v in text)
