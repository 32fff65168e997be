"""The LMM scorer of IDR-LMM (paper section 4.4, eqs. 6-8): score, feedback and summary requests.

Three kinds of request go to a large multimodal model (LMM):

* **score** ``R(x, p_R, c_R, f_{i-1})``: one training sample (product image + product name) is
  scored 1-5 with the prompt ``p_R`` (``prompts/score.txt``), the in-context examples ``c_R`` and
  the previous round's feedback ``f_{i-1}``; samples with ``score >= gamma`` (4) are kept (eq. 8);
* **feedback** ``F(x_dev, I_dev, p_F)``: one generated validation image is reviewed (``p_F``);
* **summary** ``SUM(..., p_S)``: all feedback texts are merged into ``f_i`` (``p_S``, eq. 7).

The backend is the ``openai`` client against any OpenAI-compatible server (OpenAI itself, or vLLM,
SGLang, LM Studio, ... through ``base_url``). The model name is a required setting. The API key
is read from an environment variable only and is never logged or persisted.

Every reply is asked for as JSON validated by a schema (reasoning first, then the score). A reply
that does not parse is retried once with a repair instruction and then recorded as a *failure*;
nothing is ever given a default score. Requests run concurrently (bounded), are retried with
exponential backoff that honours ``retry-after``, and time out. Each result is appended to a
JSONL :class:`ResultStore` (flushed and fsynced) as soon as it arrives, keyed by
``(kind, round, sample id, hash of prompt + model + feedback + examples + request settings)``,
so a run that is killed and restarted re-sends nothing that was already answered.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import email.utils
import hashlib
import io
import json
import logging
import os
import queue
import random
import re
import string
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import openai
from openai.types.chat import ChatCompletion
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

try:  # advisory lock against two processes writing one store (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = [
    "Kind",
    "ScoreReply",
    "FeedbackReply",
    "SummaryReply",
    "Sample",
    "Example",
    "PromptSet",
    "ScorerConfig",
    "LMMResult",
    "RunReport",
    "ResultStore",
    "StoreLockedError",
    "ScorerError",
    "ScorerAuthError",
    "LMMScorer",
    "OpenAICompatibleScorer",
    "load_examples",
    "encode_image",
    "parse_reply",
    "ReplyParseError",
    "select_samples",
    "add_scorer_args",
    "scorer_config_from_args",
    "prompts_from_args",
    "DEFAULT_EXAMPLES",
    "SAMPLE_ID_HEADER",
]

Kind = Literal["score", "feedback", "summary"]
KINDS: tuple[str, ...] = ("score", "feedback", "summary")

#: Header carrying the sample id with each online request (ignored by real servers; the simulated
#: LMM counts requests per sample with it). Batch requests carry the id in ``custom_id`` instead.
SAMPLE_ID_HEADER = "X-Product2Img-Sample-Id"
SUMMARY_ID = "__summary__"
DEFAULT_EXAMPLES = "examples_epbd_synth.json"


# ----------------------------------------------------------------------------------------------
# Reply schemas
# ----------------------------------------------------------------------------------------------


class ScoreReply(BaseModel):
    """A score reply: the reasoning first (chain of thought), then the score on the paper's 1-5 scale."""

    model_config = ConfigDict(extra="ignore")
    reasoning: str
    score: int = Field(ge=1, le=5)


class FeedbackReply(BaseModel):
    """A review of one generated validation image (``p_F``)."""

    model_config = ConfigDict(extra="ignore")
    feedback: str


class SummaryReply(BaseModel):
    """The merged feedback ``f_i`` (``p_S``)."""

    model_config = ConfigDict(extra="ignore")
    summary: str


REPLY_MODELS: dict[str, type[BaseModel]] = {
    "score": ScoreReply,
    "feedback": FeedbackReply,
    "summary": SummaryReply,
}

#: Strict JSON schemas, written by hand so that they are accepted by OpenAI's strict structured
#: outputs and by vLLM/SGLang guided decoding alike (``enum`` rather than min/max on the score).
JSON_SCHEMAS: dict[str, dict[str, Any]] = {
    "score": {
        "type": "object",
        "properties": {
            "reasoning": {"type": "string"},
            "score": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
        },
        "required": ["reasoning", "score"],
        "additionalProperties": False,
    },
    "feedback": {
        "type": "object",
        "properties": {"feedback": {"type": "string"}},
        "required": ["feedback"],
        "additionalProperties": False,
    },
    "summary": {
        "type": "object",
        "properties": {"summary": {"type": "string"}},
        "required": ["summary"],
        "additionalProperties": False,
    },
}
SCHEMA_NAMES = {kind: f"product2img_{kind}" for kind in KINDS}


class ReplyParseError(ValueError):
    """The LMM reply is not a JSON object matching the schema."""


_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def _json_candidates(text: str) -> list[str]:
    out = [text.strip()]
    out += [m.strip() for m in _FENCE_RE.findall(text)]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        out.append(text[start : end + 1])
    return out


def parse_reply(content: str | None, kind: str) -> BaseModel:
    """Parse and validate a reply of ``kind``; plain JSON, fenced JSON or JSON inside prose.

    The fallback matters for servers that ignore ``response_format``. Raises
    :class:`ReplyParseError` with a short reason.
    """
    model_cls = REPLY_MODELS[kind]
    if content is None or not content.strip():
        raise ReplyParseError("the reply is empty")
    last_error = "no JSON object found"
    for candidate in _json_candidates(content):
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError as e:
            last_error = f"invalid JSON ({e.msg})"
            continue
        if not isinstance(data, dict):
            last_error = "the JSON value is not an object"
            continue
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            errs = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            last_error = f"schema mismatch ({errs})"
    raise ReplyParseError(last_error)


# ----------------------------------------------------------------------------------------------
# Samples, examples, prompts
# ----------------------------------------------------------------------------------------------

ImageLike = Any  # PIL.Image.Image | str | os.PathLike | bytes | Callable[[], PIL.Image.Image]


@dataclass
class Sample:
    """One item to send: a product image and its product name.

    ``image`` is a PIL image, a file path, encoded bytes, or a zero-argument callable returning one
    of these (decoded lazily, only when the sample is actually sent). ``cutout`` (optional) is the
    product cutout with alpha; it is sent as a second image when ``ScorerConfig.send_cutout``.
    """

    id: str
    product_name: str
    image: ImageLike
    category: str | None = None
    cutout: ImageLike | None = None

    @classmethod
    def from_mapping(
        cls,
        row: Mapping[str, Any],
        *,
        id_key: str = "id",
        image_key: str = "image",
        cutout_key: str | None = "cutout",
    ) -> Sample:
        """Build from a dataset row (EPBD columns ``id``, ``product_name``, ``category``, images)."""
        return cls(
            id=str(row[id_key]),
            product_name=str(row["product_name"]),
            image=row[image_key],
            category=row.get("category"),
            cutout=row.get(cutout_key) if cutout_key else None,
        )


def _as_sample(obj: Sample | Mapping[str, Any]) -> Sample:
    if isinstance(obj, Sample):
        return obj
    if isinstance(obj, Mapping):
        return Sample.from_mapping(obj)
    raise TypeError(f"expected a Sample or a mapping, got {type(obj).__name__}")


@dataclass
class Example:
    """One in-context example of ``c_R``: a sample with the score and reasons a designer gave it.

    An example has an ``image`` (path, sent as a picture) or only a ``description`` of the image in
    words (sent as text), or both.
    """

    product_name: str
    score: int
    reasoning: str
    category: str | None = None
    description: str | None = None
    image: str | None = None

    def __post_init__(self):
        if not 1 <= int(self.score) <= 5:
            raise ValueError(f"example score must be 1..5, got {self.score}")
        if self.image is None and not self.description:
            raise ValueError(f"example {self.product_name!r} needs an image path or a description")


def load_examples(path: str | os.PathLike | None = None) -> list[Example]:
    """Load ``c_R`` from a JSON file (a list of examples, or ``{"examples": [...]}``).

    ``None`` loads the default set shipped for EPBD-synth. Relative image paths are resolved
    against the file's folder.
    """
    if path is None:
        text = resources.files(__package__).joinpath("prompts", DEFAULT_EXAMPLES).read_text("utf-8")
        base = None
    else:
        text = Path(path).read_text(encoding="utf-8")
        base = Path(path).resolve().parent
    data = json.loads(text)
    if isinstance(data, dict):
        data = data["examples"]
    examples = []
    for item in data:
        ex = Example(**{k: item[k] for k in item if k in {f.name for f in dataclasses.fields(Example)}})
        if ex.image is not None and base is not None and not os.path.isabs(ex.image):
            ex.image = str(base / ex.image)
        examples.append(ex)
    return examples


FEEDBACK_SECTION = """
Feedback from the previous round: the images generated by the model trained on the previously
selected data were reviewed, and the problems below were found. The model learned them from its
training data, so look especially hard for them and give low scores to images that show them.
<feedback>
$feedback
</feedback>
"""


@dataclass
class PromptSet:
    """The three templates ``p_R`` (score), ``p_F`` (feedback), ``p_S`` (summary).

    Templates use ``string.Template`` syntax. ``p_R`` may place ``${feedback_section}``; if it does
    not and there is feedback, the section is appended at the end.
    """

    score: str
    feedback: str
    summarize: str
    feedback_section: str = FEEDBACK_SECTION

    @classmethod
    def default(cls) -> PromptSet:
        return cls.load()

    @classmethod
    def load(
        cls,
        score: str | os.PathLike | None = None,
        feedback: str | os.PathLike | None = None,
        summarize: str | os.PathLike | None = None,
    ) -> PromptSet:
        """The shipped templates, with any of them replaced by the file given."""

        def read(path, name):
            if path is not None:
                return Path(path).read_text(encoding="utf-8")
            return resources.files(__package__).joinpath("prompts", name).read_text("utf-8")

        return cls(
            score=read(score, "score.txt"),
            feedback=read(feedback, "feedback.txt"),
            summarize=read(summarize, "summarize.txt"),
        )

    def render_score(self, feedback: str | None) -> str:
        section = ""
        if feedback and feedback.strip():
            section = string.Template(self.feedback_section).safe_substitute(feedback=feedback.strip())
        if section and "feedback_section" not in self.score:
            return self.score.rstrip() + "\n" + section
        return string.Template(self.score).safe_substitute(feedback_section=section).rstrip() + "\n"

    def render(self, kind: str, feedback: str | None = None) -> str:
        if kind == "score":
            return self.render_score(feedback)
        text = self.feedback if kind == "feedback" else self.summarize
        return string.Template(text).safe_substitute(feedback_section="").rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def _load_image(image: ImageLike) -> Image.Image:
    if callable(image) and not isinstance(image, Image.Image):
        image = image()
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image))
    if isinstance(image, Mapping) and image.get("bytes") is not None:  # datasets' Image() storage
        return Image.open(io.BytesIO(image["bytes"]))
    if isinstance(image, Mapping) and image.get("path"):
        return Image.open(image["path"])
    if isinstance(image, (str, os.PathLike)):
        return Image.open(image)
    raise TypeError(f"cannot read an image from {type(image).__name__}")


def encode_image(
    image: ImageLike,
    *,
    max_side: int = 512,
    fmt: Literal["png", "jpeg"] = "png",
    quality: int = 90,
    keep_alpha: bool = False,
) -> tuple[str, str]:
    """Downscale (longest side <= ``max_side``) and encode as a base64 data URL.

    Returns ``(data_url, sha256 of the encoded bytes)``. With ``keep_alpha`` an image with an
    alpha channel (a cutout) is sent as RGBA PNG whatever ``fmt`` says.
    """
    img = _load_image(image)
    img.load()
    has_alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
    if keep_alpha and has_alpha:
        img, fmt = img.convert("RGBA"), "png"
    elif img.mode != "RGB":
        img = img.convert("RGB")
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
        mime = "image/jpeg"
    else:
        img.save(buf, format="PNG", compress_level=1)
        mime = "image/png"
    raw = buf.getvalue()
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}", hashlib.sha256(raw).hexdigest()


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


@dataclass
class ScorerConfig:
    """Settings of the OpenAI-compatible scorer. ``model`` is required; there is no default model.

    Examples of ``model``/``base_url``:

    * OpenAI: ``model="gpt-4o-2024-08-06"`` or ``"gpt-4.1-mini"`` (``base_url=None``);
    * vLLM: ``model="Qwen/Qwen2.5-VL-7B-Instruct"``, ``base_url="http://localhost:8000/v1"``
      (started with ``vllm serve Qwen/Qwen2.5-VL-7B-Instruct``);
    * SGLang: ``base_url="http://localhost:30000/v1"``; LM Studio: ``base_url="http://localhost:1234/v1"``.

    The API key is read from the environment variable named by ``api_key_env`` (never from a
    setting). If it is unset and ``base_url`` is given (a local server without auth), ``"EMPTY"``
    is sent, as vLLM's docs do.

    ``temperature=None`` leaves the parameter out (reasoning models accept only their default).
    ``extra_body`` is merged into every request body (e.g. vLLM's ``{"top_k": 1}``).
    """

    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    # throughput
    concurrency: int = 16
    timeout: float = 120.0
    max_retries: int = 5
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    retry_after_max: float = 300.0
    # request
    temperature: float | None = 0.0
    max_completion_tokens: int | None = None
    structured_output: Literal["json_schema", "json_object", "none"] = "json_schema"
    image_max_side: int = 512
    image_detail: Literal["low", "high", "auto"] = "low"
    image_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = 90
    send_cutout: bool = True  # x = {C, P, I}: the cutout lets the LMM check "product unaltered"
    extra_body: dict[str, Any] | None = None
    # cost (USD per 1M tokens; 0 = unknown/free)
    price_input_per_1m: float = 0.0
    price_output_per_1m: float = 0.0
    # selection and re-runs
    gamma: int = 4
    retry_failed: bool = False
    #: stop the run (ScorerError; everything so far is saved) after this many transient failures in
    #: a row with no success between them -- a dead server or an exhausted quota. None: never.
    abort_after_failures: int | None = 20
    show_progress: bool = True

    def __post_init__(self):
        if not self.model or not isinstance(self.model, str):
            raise ValueError(
                "ScorerConfig.model is required, e.g. 'gpt-4o-2024-08-06' (OpenAI) or "
                "'Qwen/Qwen2.5-VL-7B-Instruct' (vLLM with base_url='http://localhost:8000/v1')"
            )
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.image_detail not in ("low", "high", "auto"):
            raise ValueError(f"image_detail must be low/high/auto, got {self.image_detail!r}")
        if self.structured_output not in ("json_schema", "json_object", "none"):
            raise ValueError(f"unknown structured_output {self.structured_output!r}")
        if not 1 <= self.gamma <= 5:
            raise ValueError("gamma must be on the 1..5 scale")

    def request_settings(self) -> dict[str, Any]:
        """What changes the LMM's answer (goes into the result key hash); no secrets, no URL."""
        return {
            "model": self.model,
            "temperature": self.temperature,
            "max_completion_tokens": self.max_completion_tokens,
            "image_max_side": self.image_max_side,
            "image_detail": self.image_detail,
            "image_format": self.image_format,
            "send_cutout": self.send_cutout,
            "extra_body": self.extra_body,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy, safe to persist (it never contains the key itself)."""
        return dataclasses.asdict(self)

    def cost(self, prompt_tokens: int, completion_tokens: int, factor: float = 1.0) -> float:
        return factor * (
            prompt_tokens * self.price_input_per_1m + completion_tokens * self.price_output_per_1m
        ) / 1e6


# ----------------------------------------------------------------------------------------------
# Results and the append-only store
# ----------------------------------------------------------------------------------------------


@dataclass
class LMMResult:
    """One persisted result. ``status`` is ``"ok"`` or ``"failed"``; failures carry ``error_type``
    (``refusal``, ``unparseable``, ``bad_request``, ``rate_limited``, ``timeout``, ``connection``,
    ``server_error``, ``batch_error``) and ``transient`` (retried by a later run)."""

    key: str
    kind: str
    sample_id: str
    round: int
    config_hash: str
    status: str
    score: int | None = None
    reasoning: str | None = None
    text: str | None = None
    error_type: str | None = None
    error: str | None = None
    transient: bool = False
    raw: str | None = None
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    model: str | None = None
    source: str = "online"
    created: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LMMResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def make_key(kind: str, round: int, sample_id: str, config_hash: str) -> str:
    """The result key, also used as the Batch API ``custom_id``: ``kind:round:config_hash:sample_id``."""
    return f"{kind}:{int(round)}:{config_hash}:{sample_id}"


def split_key(key: str) -> tuple[str, int, str, str]:
    """Inverse of :func:`make_key` (sample ids may contain ``:``)."""
    kind, rnd, chash, sample_id = key.split(":", 3)
    return kind, int(rnd), chash, sample_id


class StoreLockedError(RuntimeError):
    """Another live process is writing the same result store."""


class ResultStore:
    """Append-only JSONL of :class:`LMMResult`, one line per record, fsynced before it counts.

    * Opening reads every record back; a torn last line (a write cut by ``kill -9``) is cut off.
    * An ``ok`` record for a key is final: it is never written twice and never replaced.
      A failure may be followed by a later ``ok`` record for the same key (a retry).
    * One writer process at a time (an advisory ``flock``; released by the OS when the process
      dies, even by ``kill -9``).
    * :meth:`aappend` hands lines to one writer thread that writes and fsyncs whatever is queued
      in one go (group commit), so the event loop never waits on the disk and slow disks do not
      cap the request rate.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(self._fd)
                raise StoreLockedError(
                    f"{self.path} is open in another scorer or process; close it first (scorer.close())"
                ) from e
        self._latest: dict[str, LMMResult] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._load()

    # reading ------------------------------------------------------------------------------
    def _load(self):
        size = os.fstat(self._fd).st_size
        with open(self.path, "rb") as f:
            data = f.read(size)
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            logger.warning("%s: dropping a torn last line (%d bytes)", self.path, len(data) - cut)
            os.ftruncate(self._fd, cut)
            data = data[:cut]
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = LMMResult.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError) as e:
                logger.warning("%s:%d: skipping an unreadable record (%s)", self.path, n, e)
                continue
            self._index(rec)

    def _index(self, rec: LMMResult):
        old = self._latest.get(rec.key)
        if old is not None and old.ok:
            return  # ok is final
        self._latest[rec.key] = rec

    def get(self, key: str) -> LMMResult | None:
        return self._latest.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._latest

    def __len__(self) -> int:
        return len(self._latest)

    def results(self, kind: str | None = None, round: int | None = None) -> list[LMMResult]:
        return [
            r
            for r in self._latest.values()
            if (kind is None or r.kind == kind) and (round is None or r.round == round)
        ]

    # writing ------------------------------------------------------------------------------
    def _write_durably(self, data: bytes):
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def append(self, rec: LMMResult) -> bool:
        """Write one record durably (blocking). Returns False if an ok record already exists."""
        with self._lock:
            old = self._latest.get(rec.key)
            if old is not None and old.ok:
                return False
            self._write_durably((rec.to_json() + "\n").encode("utf-8"))
            self._index(rec)
            return True

    async def aappend(self, rec: LMMResult) -> bool:
        """Write one record durably without blocking the event loop (group commit)."""
        old = self._latest.get(rec.key)
        if old is not None and old.ok:
            return False
        if self._thread is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._writer, name="product2img-store", daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put(((rec.to_json() + "\n").encode("utf-8"), fut, loop))
        await fut
        self._index(rec)
        return True

    def _writer(self):
        while True:
            item = self._queue.get()
            items = [item]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(i is None for i in items)
            items = [i for i in items if i is not None]
            exc = None
            if items:
                try:
                    with self._lock:
                        self._write_durably(b"".join(line for line, _, _ in items))
                except OSError as e:
                    exc = e
            for _, fut, loop in items:
                loop.call_soon_threadsafe(_settle, fut, exc)
            if stop:
                return

    def close(self):
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing releases the flock
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def _settle(fut: asyncio.Future, exc: BaseException | None):
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


@dataclass
class RunReport:
    """What one call returned: results per sample id (cached and new) and the run's counters."""

    kind: str
    round: int
    config_hash: str
    results: dict[str, LMMResult]
    n_sent: int = 0
    n_cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    elapsed: float = 0.0

    @property
    def n_ok(self) -> int:
        return sum(r.ok for r in self.results.values())

    @property
    def n_failed(self) -> int:
        return sum(not r.ok for r in self.results.values())

    def failures(self) -> dict[str, LMMResult]:
        return {k: r for k, r in self.results.items() if not r.ok}

    def scores(self) -> dict[str, int]:
        """Scores of the samples that were scored (failures are absent, never defaulted)."""
        return {k: r.score for k, r in self.results.items() if r.ok and r.score is not None}

    def selected(self, gamma: int = 4) -> list[str]:
        """Eq. 6/8: ids with ``score >= gamma``. Failed samples are not selected."""
        return select_samples(self.results.values(), gamma)

    def summary_line(self) -> str:
        return (
            f"{self.kind} round {self.round}: {self.n_ok} ok, {self.n_failed} failed "
            f"({self.n_sent} sent, {self.n_cached} from store), "
            f"{self.prompt_tokens}+{self.completion_tokens} tokens, ${self.cost:.4f}, {self.elapsed:.1f}s"
        )


def select_samples(results: Iterable[LMMResult], gamma: int = 4) -> list[str]:
    """Eq. 6/8: the sample ids whose score is ``>= gamma``."""
    return [r.sample_id for r in results if r.ok and r.score is not None and r.score >= gamma]


# ----------------------------------------------------------------------------------------------
# Errors and secrets
# ----------------------------------------------------------------------------------------------


class ScorerError(RuntimeError):
    """A run cannot go on (wrong model name, unusable server, failed summary, ...)."""


class ScorerAuthError(ScorerError):
    """The server refused the credentials (401/403). The message never contains the key."""


_KEYLIKE_RE = re.compile(r"\b(sk|hf|key)[-_][A-Za-z0-9_\-]{8,}")


class _Redactor:
    def __init__(self, secrets: Sequence[str]):
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def __call__(self, text: Any) -> str:
        text = str(text)
        for s in self.secrets:
            text = text.replace(s, "***")
            # servers often echo a masked key (first/last few characters): drop those too
            if len(s) >= 16:
                text = text.replace(s[:8], "***").replace(s[-6:], "***")
        return _KEYLIKE_RE.sub("***", text)


class _Failure(Exception):
    def __init__(self, error_type: str, message: str, transient: bool, raw: str | None = None):
        super().__init__(message)
        self.error_type, self.message, self.transient, self.raw = error_type, message, transient, raw
        self.usage: dict | None = None


REPAIR_INSTRUCTION = (
    "Your previous reply could not be used: {error}. Reply again with only one JSON object that "
    "matches this schema, with no other text: {schema}"
)


def _retry_after_seconds(exc: openai.APIStatusError) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


# ----------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------


class LMMScorer(ABC):
    """The scorer interface used by the IDR-LMM rounds (Algorithm 1).

    Implementations persist every result and skip what a previous run already answered.
    Each method has a synchronous form and an ``a``-prefixed coroutine form.
    """

    @abstractmethod
    async def ascore_samples(
        self, samples: Iterable[Sample | Mapping], *, round: int = 1, feedback: str | None = None
    ) -> RunReport:
        """Score training samples with ``p_R``, ``c_R`` and ``f_{i-1}`` (eq. 8)."""

    @abstractmethod
    async def afeedback_on_outputs(self, outputs: Iterable[Sample | Mapping], *, round: int = 1) -> RunReport:
        """Review generated validation images with ``p_F`` (eq. 7, ``F``)."""

    @abstractmethod
    async def asummarize_feedback(self, feedbacks: Sequence[str], *, round: int = 1) -> str:
        """Merge feedback texts into ``f_i`` with ``p_S`` (eq. 7, ``SUM``)."""

    def score_samples(self, samples, *, round: int = 1, feedback: str | None = None) -> RunReport:
        return _run_sync(self.ascore_samples(samples, round=round, feedback=feedback))

    def feedback_on_outputs(self, outputs, *, round: int = 1) -> RunReport:
        return _run_sync(self.afeedback_on_outputs(outputs, round=round))

    def summarize_feedback(self, feedbacks: Sequence[str], *, round: int = 1) -> str:
        return _run_sync(self.asummarize_feedback(feedbacks, round=round))

    def select(self, report: RunReport, gamma: int | None = None) -> list[str]:
        """Eq. 6/8: ids with ``score >= gamma`` (default: the config's gamma, 4)."""
        if gamma is None:
            gamma = getattr(getattr(self, "config", None), "gamma", 4)
        return report.selected(gamma)


def _run_sync(coro):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError("an event loop is running here: await the 'a'-prefixed method instead")


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool, config: ScorerConfig, cached: int):
        self.ok = self.failed = self.prompt_tokens = self.completion_tokens = 0
        self.config = config
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True)
            if cached:
                self.bar.write(f"{desc}: {cached} results already in the store, not re-sent")

    def update(self, rec: LMMResult):
        if rec.ok:
            self.ok += 1
        else:
            self.failed += 1
        self.prompt_tokens += rec.prompt_tokens
        self.completion_tokens += rec.completion_tokens
        if self.bar is not None:
            tokens = self.prompt_tokens + self.completion_tokens
            cost = self.config.cost(self.prompt_tokens, self.completion_tokens)
            self.bar.set_postfix_str(f"done={self.ok} failed={self.failed} tok={tokens} ${cost:.4f}", refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class OpenAICompatibleScorer(LMMScorer):
    """IDR-LMM scorer on the ``openai`` client (OpenAI, vLLM, SGLang, LM Studio, ...).

    Args:
        config: the settings; ``config.model`` is required.
        store: a :class:`ResultStore` or a path to its JSONL file (created if missing). Required:
            results are always persisted so that runs resume.
        prompts: the templates (default: the shipped ``p_R``/``p_F``/``p_S``).
        examples: ``c_R`` -- a list of :class:`Example`, a path to a JSON file, or ``None`` for the
            shipped EPBD-synth set. Pass ``[]`` for none.
        client: an ``openai.AsyncOpenAI`` to use instead of building one from the settings (its
            own ``max_retries`` should be 0; this class does the retries).
    """

    def __init__(
        self,
        config: ScorerConfig,
        store: ResultStore | str | os.PathLike,
        *,
        prompts: PromptSet | None = None,
        examples: Sequence[Example] | str | os.PathLike | None = None,
        client: openai.AsyncOpenAI | None = None,
    ):
        self.config = config
        self.store = store if isinstance(store, ResultStore) else ResultStore(store)
        self.prompts = prompts or PromptSet.default()
        if examples is None or isinstance(examples, (str, os.PathLike)):
            examples = load_examples(examples)
        self.examples = list(examples)
        self._client = client
        self._structured = config.structured_output
        self._pause_until = 0.0
        self._example_messages: list[dict] | None = None
        self._example_digest: str | None = None
        self._redact = _Redactor([os.environ.get(config.api_key_env, "")])

    # client ---------------------------------------------------------------------------------
    def _api_key(self) -> str:
        key = os.environ.get(self.config.api_key_env)
        if key:
            return key
        if self.config.base_url:
            return "EMPTY"
        raise ScorerError(
            f"no API key: set the environment variable {self.config.api_key_env} "
            "(or give base_url for a local server without auth)"
        )

    def _make_client(self) -> openai.AsyncOpenAI:
        key = self._api_key()
        self._redact = _Redactor([key if key != "EMPTY" else ""])
        kwargs: dict[str, Any] = {"api_key": key, "max_retries": 0, "timeout": self.config.timeout}
        if self.config.base_url:
            kwargs["base_url"] = self.config.base_url
        return openai.AsyncOpenAI(**kwargs)

    # messages -------------------------------------------------------------------------------
    def _image_part(self, url: str) -> dict:
        return {"type": "image_url", "image_url": {"url": url, "detail": self.config.image_detail}}

    def _encode(self, image: ImageLike, keep_alpha: bool = False) -> tuple[str, str]:
        c = self.config
        return encode_image(
            image, max_side=c.image_max_side, fmt=c.image_format, quality=c.jpeg_quality, keep_alpha=keep_alpha
        )

    @staticmethod
    def _sample_text(product_name: str, category: str | None, lead: str) -> str:
        text = f"{lead}\nProduct name: {product_name}"
        if category:
            text += f"\nCategory: {category}"
        return text

    def _examples_block(self) -> tuple[list[dict], str]:
        """``c_R`` as user/assistant turns, and a digest of it for the key hash (built once)."""
        if self._example_messages is None:
            msgs, digest = [], hashlib.sha256()
            for ex in self.examples:
                parts: list[dict] = [
                    {"type": "text", "text": self._sample_text(ex.product_name, ex.category, "Candidate image:")}
                ]
                if ex.image:
                    url, h = self._encode(ex.image)
                    parts.append(self._image_part(url))
                    digest.update(h.encode())
                if ex.description:
                    parts.append({"type": "text", "text": f"(Image described in words) {ex.description}"})
                reply = json.dumps({"reasoning": ex.reasoning, "score": int(ex.score)}, ensure_ascii=False)
                msgs += [{"role": "user", "content": parts}, {"role": "assistant", "content": reply}]
                digest.update(json.dumps(dataclasses.asdict(ex), sort_keys=True, default=str).encode())
            self._example_messages, self._example_digest = msgs, digest.hexdigest()
        return self._example_messages, self._example_digest

    def config_hash(self, kind: str, feedback: str | None = None) -> str:
        """Hash of everything besides the sample that shapes the answer: prompt, model, feedback,
        examples (score only) and request settings."""
        payload = {
            "kind": kind,
            "prompt": self.prompts.render(kind, feedback),
            "feedback": (feedback or "").strip() if kind == "score" else None,
            "examples": self._examples_block()[1] if kind == "score" else None,
            "settings": self.config.request_settings(),
            "schema": JSON_SCHEMAS[kind],
        }
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]

    def build_messages(self, kind: str, item: Sample | Sequence[str], feedback: str | None = None) -> list[dict]:
        """The chat messages of one request (also used to write Batch API / offline JSONL)."""
        system = {"role": "system", "content": self.prompts.render(kind, feedback)}
        if kind == "summary":
            items = "\n".join(f"<feedback_item>\n{t.strip()}\n</feedback_item>" for t in item)
            return [system, {"role": "user", "content": f"{len(item)} review notes:\n{items}"}]
        sample = item
        lead = "Candidate image:" if kind == "score" else "Generated image:"
        parts: list[dict] = [{"type": "text", "text": self._sample_text(sample.product_name, sample.category, lead)}]
        parts.append(self._image_part(self._encode(sample.image)[0]))
        if self.config.send_cutout and sample.cutout is not None:
            parts.append({"type": "text", "text": "Product cutout (input, transparent background):"})
            parts.append(self._image_part(self._encode(sample.cutout, keep_alpha=True)[0]))
        examples = self._examples_block()[0] if kind == "score" else []
        return [system, *examples, {"role": "user", "content": parts}]

    def request_body(self, kind: str, messages: list[dict]) -> dict[str, Any]:
        """The JSON body of a chat completions request (online, Batch API and offline alike)."""
        c = self.config
        body: dict[str, Any] = {"model": c.model, "messages": messages}
        if c.temperature is not None:
            body["temperature"] = c.temperature
        if c.max_completion_tokens is not None:
            body["max_completion_tokens"] = c.max_completion_tokens
        if self._structured == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": SCHEMA_NAMES[kind], "strict": True, "schema": JSON_SCHEMAS[kind]},
            }
        elif self._structured == "json_object":
            body["response_format"] = {"type": "json_object"}
        if c.extra_body:
            body.update(c.extra_body)
        return body

    # one request ----------------------------------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        c = self.config
        return min(c.backoff_max, c.backoff_initial * 2**attempt) * random.uniform(0.5, 1.0)

    async def _wait_for_pause(self):
        while True:
            delay = self._pause_until - time.monotonic()
            if delay <= 0:
                return
            await asyncio.sleep(delay)

    async def _create(self, kind: str, sample_id: str, messages: list[dict], usage: dict):
        """One chat completion with retries; returns the response or raises ``_Failure``."""
        c = self.config
        last_type, last_msg = "connection", ""
        attempt = 0
        while True:
            await self._wait_for_pause()
            used_format = self._structured
            body = self.request_body(kind, messages)
            usage["attempts"] += 1
            try:
                # POST /chat/completions through the client's generic ``post``: the same request,
                # auth, errors and ``ChatCompletion`` reply as ``chat.completions.create``, minus
                # its re-walk of the whole message tree (several ms per request with c_R images,
                # which caps the request rate on a small machine). The body is plain JSON already.
                return await self._client.post(
                    "/chat/completions",
                    cast_to=ChatCompletion,
                    body=body,
                    options={"headers": {SAMPLE_ID_HEADER: sample_id}, "timeout": c.timeout},
                )
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise ScorerAuthError(
                    f"the server refused the credentials ({e.status_code}): {self._redact(e.message)}"
                ) from None
            except openai.NotFoundError as e:
                raise ScorerError(
                    f"model {c.model!r} or endpoint not found at {c.base_url or 'api.openai.com'}: "
                    f"{self._redact(e.message)}"
                ) from None
            except openai.RateLimitError as e:
                retry_after = _retry_after_seconds(e)
                last_type, last_msg = "rate_limited", self._redact(e.message)
                if retry_after is not None:
                    if retry_after > c.retry_after_max:
                        raise _Failure(last_type, f"retry-after {retry_after:.0f}s is too long", True) from None
                    # everybody waits: the limit is per key, not per request
                    self._pause_until = max(self._pause_until, time.monotonic() + retry_after)
                    delay = 0.0
                else:
                    delay = self._backoff(attempt)
            except openai.BadRequestError as e:
                msg = self._redact(e.message)
                if used_format != "none" and re.search(r"response_format|json_schema|json_object", msg, re.I):
                    if self._structured == used_format:  # (concurrent requests may have stepped down already)
                        self._structured = "json_object" if used_format == "json_schema" else "none"
                        logger.warning("server rejected response_format=%s (%s); using %s", used_format, msg,
                                       self._structured)
                    usage["attempts"] -= 1
                    continue  # not counted as an attempt: the server did no work
                raise _Failure("bad_request", msg, False) from None
            except openai.APITimeoutError:
                last_type, last_msg, delay = "timeout", f"no reply within {c.timeout}s", self._backoff(attempt)
            except openai.APIConnectionError as e:
                last_type, last_msg, delay = "connection", self._redact(e), self._backoff(attempt)
            except openai.APIStatusError as e:
                if e.status_code in (408, 409) or e.status_code >= 500:
                    last_type, last_msg = "server_error", f"{e.status_code}: {self._redact(e.message)}"
                    retry_after = _retry_after_seconds(e)
                    delay = min(retry_after, c.retry_after_max) if retry_after is not None else self._backoff(attempt)
                else:
                    raise _Failure("bad_request", f"{e.status_code}: {self._redact(e.message)}", False) from None
            if attempt >= c.max_retries:
                raise _Failure(last_type, f"{last_msg} (after {attempt + 1} attempts)", True)
            attempt += 1
            logger.debug("%s %s: %s, retry %d in %.2fs", kind, sample_id, last_type, attempt, delay)
            await asyncio.sleep(delay)

    async def _ask(
        self, kind: str, sample_id: str, messages: list[dict], first_reply: str | None = None,
        usage: dict | None = None,
    ) -> tuple[BaseModel, dict]:
        """Request, parse, repair once. Returns (reply, usage) or raises ``_Failure`` (with usage).

        With ``first_reply`` (an unparseable reply that came from a batch), only the repair
        request is sent.
        """
        usage = dict(usage or {"prompt_tokens": 0, "completion_tokens": 0, "attempts": 0})
        for phase in ("first", "repair"):
            if phase == "first" and first_reply is not None:
                content = first_reply
            else:
                try:
                    resp = await self._create(kind, sample_id, messages, usage)
                except _Failure as f:
                    f.usage = usage
                    raise
                if resp.usage is not None:
                    usage["prompt_tokens"] += resp.usage.prompt_tokens or 0
                    usage["completion_tokens"] += resp.usage.completion_tokens or 0
                choice = resp.choices[0] if resp.choices else None
                message = choice.message if choice else None
                refusal = getattr(message, "refusal", None) if message else None
                if refusal or (choice is not None and choice.finish_reason == "content_filter"):
                    f = _Failure("refusal", self._redact(refusal or "content filter"), False)
                    f.usage = usage
                    raise f
                content = message.content if message else None
            try:
                return parse_reply(content, kind), usage
            except ReplyParseError as e:
                if phase == "repair":
                    f = _Failure("unparseable", f"after a repair request: {e}", False, raw=(content or "")[:2000])
                    f.usage = usage
                    raise f from None
                schema = json.dumps(JSON_SCHEMAS[kind], separators=(",", ":"))
                messages = [
                    *messages,
                    {"role": "assistant", "content": content or ""},
                    {"role": "user", "content": REPAIR_INSTRUCTION.format(error=e, schema=schema)},
                ]
        raise AssertionError("unreachable")

    def make_record(
        self, kind, round, sample_id, chash, reply=None, usage=None, failure=None, source="online", cost_factor=1.0
    ) -> LMMResult:
        """Build the :class:`LMMResult` of one reply (``reply``) or failure (``failure``)."""
        usage = usage or {}
        pt, ct = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        rec = LMMResult(
            key=make_key(kind, round, sample_id, chash),
            kind=kind,
            sample_id=sample_id,
            round=round,
            config_hash=chash,
            status="ok" if failure is None else "failed",
            attempts=usage.get("attempts", 0),
            prompt_tokens=pt,
            completion_tokens=ct,
            cost=self.config.cost(pt, ct, cost_factor),
            model=self.config.model,
            source=source,
        )
        if failure is not None:
            rec.error_type, rec.error, rec.transient, rec.raw = (
                failure.error_type, failure.message, failure.transient, failure.raw
            )
        elif isinstance(reply, ScoreReply):
            rec.score, rec.reasoning = reply.score, reply.reasoning
        elif isinstance(reply, FeedbackReply):
            rec.text = reply.feedback
        elif isinstance(reply, SummaryReply):
            rec.text = reply.summary
        return rec

    # runs -----------------------------------------------------------------------------------
    def is_done(self, key: str) -> bool:
        """Whether a stored result makes sending ``key`` again unnecessary."""
        rec = self.store.get(key)
        if rec is None:
            return False
        if rec.ok:
            return True
        return not (rec.transient or self.config.retry_failed)

    async def _run(self, kind: str, items: Iterable[Sample | Mapping], round: int, feedback: str | None) -> RunReport:
        t0 = time.perf_counter()
        chash = self.config_hash(kind, feedback)
        samples = [_as_sample(s) for s in items]
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate sample ids in the {kind} input")
        report = RunReport(kind=kind, round=round, config_hash=chash, results={})
        todo = []
        for s in samples:
            key = make_key(kind, round, s.id, chash)
            if self.is_done(key):
                report.results[s.id] = self.store.get(key)
                report.n_cached += 1
            else:
                todo.append(s)
        progress = _Progress(len(todo), f"LMM {kind} r{round}", self.config.show_progress, self.config,
                             report.n_cached)
        own_client = self._client is None
        if own_client:
            self._client = self._make_client()
        sem = asyncio.Semaphore(self.config.concurrency)

        streak = [0]  # transient failures in a row
        limit = self.config.abort_after_failures

        async def one(sample: Sample):
            async with sem:
                try:
                    messages = await asyncio.to_thread(self.build_messages, kind, sample, feedback)
                    reply, usage = await self._ask(kind, sample.id, messages)
                    rec = self.make_record(kind, round, sample.id, chash, reply=reply, usage=usage)
                except _Failure as f:
                    rec = self.make_record(kind, round, sample.id, chash, usage=getattr(f, "usage", None), failure=f)
                    logger.warning("%s %s failed: %s: %s", kind, sample.id, f.error_type, f.message)
                await self.store.aappend(rec)
                report.results[sample.id] = self.store.get(rec.key)
                progress.update(rec)
                streak[0] = streak[0] + 1 if (not rec.ok and rec.transient) else 0
                if limit is not None and streak[0] >= limit:
                    raise ScorerError(
                        f"{streak[0]} transient failures in a row (last: {rec.error_type}: {rec.error}); "
                        f"stopping. {len(report.results)} results are saved in {self.store.path}; "
                        "run again to resume."
                    )

        try:
            tasks = [asyncio.ensure_future(one(s)) for s in todo]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        finally:
            progress.close()
            if own_client:
                await self._client.close()
                self._client = None
        report.n_sent = len(todo)
        new = [report.results[s.id] for s in todo]
        report.prompt_tokens = sum(r.prompt_tokens for r in new)
        report.completion_tokens = sum(r.completion_tokens for r in new)
        report.cost = self.config.cost(report.prompt_tokens, report.completion_tokens)
        report.elapsed = time.perf_counter() - t0
        report.results = {i: report.results[i] for i in ids}
        logger.info(report.summary_line())
        return report

    async def ascore_samples(self, samples, *, round: int = 1, feedback: str | None = None) -> RunReport:
        return await self._run("score", samples, round, feedback)

    async def afeedback_on_outputs(self, outputs, *, round: int = 1) -> RunReport:
        return await self._run("feedback", outputs, round, None)

    async def asummarize_feedback(self, feedbacks: Sequence[str], *, round: int = 1) -> str:
        feedbacks = [f for f in feedbacks if f and f.strip()]
        if not feedbacks:
            raise ScorerError("no feedback to summarise")
        kind = "summary"
        chash = hashlib.sha256(
            (self.config_hash(kind) + "\x00".join(feedbacks)).encode("utf-8")
        ).hexdigest()[:32]
        key = make_key(kind, round, SUMMARY_ID, chash)
        rec = self.store.get(key)
        if rec is None or not self.is_done(key):
            own_client = self._client is None
            if own_client:
                self._client = self._make_client()
            try:
                messages = self.build_messages(kind, feedbacks)
                try:
                    reply, usage = await self._ask(kind, SUMMARY_ID, messages)
                    rec = self.make_record(kind, round, SUMMARY_ID, chash, reply=reply, usage=usage)
                except _Failure as f:
                    rec = self.make_record(kind, round, SUMMARY_ID, chash, usage=getattr(f, "usage", None), failure=f)
                await self.store.aappend(rec)
            finally:
                if own_client:
                    await self._client.close()
                    self._client = None
        if not rec.ok:
            raise ScorerError(f"the feedback summary failed: {rec.error_type}: {rec.error}")
        return rec.text

    def close(self):
        """Close the result store (and release its lock)."""
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------
# Command-line settings (the CLI and the round loop add these to their parsers)
# ----------------------------------------------------------------------------------------------


def add_scorer_args(parser: argparse.ArgumentParser, prefix: str = "lmm") -> argparse.ArgumentParser:
    """Add ``--lmm-*`` options (model, server, throughput, prices) and the prompt overrides
    ``--score-prompt``, ``--feedback-prompt``, ``--summarize-prompt``, ``--examples``.

    Every option also answers to its underscore spelling (``--lmm_model``, ``--lmm_base_url``), as
    diffusers' training scripts spell their flags.
    """
    g = parser.add_argument_group("LMM scorer (IDR-LMM)")

    def add(name: str, **kwargs):
        return g.add_argument(name, name.replace("-", "_").replace("__", "--", 1), **kwargs)

    p = f"--{prefix}-"
    add(f"{p}model", required=False, help=(
        "LMM model name (required to score), e.g. gpt-4o-2024-08-06, gpt-4.1-mini, or a vLLM-served "
        "Qwen/Qwen2.5-VL-7B-Instruct"))
    add(f"{p}base-url", default=None, help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
    add(f"{p}api-key-env", default="OPENAI_API_KEY",
        help="name of the environment variable holding the API key (the key is never a flag)")
    add(f"{p}concurrency", type=int, default=16)
    add(f"{p}timeout", type=float, default=120.0)
    add(f"{p}temperature", type=lambda v: None if v.lower() == "none" else float(v), default=0.0,
        help="sampling temperature; 'none' to leave it out (reasoning models reject other values)")
    add(f"{p}max-retries", type=int, default=5)
    add(f"{p}image-detail", choices=["low", "high", "auto"], default="low")
    add(f"{p}image-max-side", type=int, default=512)
    add(f"{p}image-format", choices=["png", "jpeg"], default="png")
    add(f"{p}structured-output", choices=["json_schema", "json_object", "none"], default="json_schema")
    add(f"{p}no-cutout", dest=f"{prefix.replace('-', '_')}_send_cutout", action="store_false",
        help="send only the product image, not the cutout as a second image")
    add(f"{p}price-input", type=float, default=0.0, help="USD per 1M input tokens (for the estimate)")
    add(f"{p}price-output", type=float, default=0.0, help="USD per 1M output tokens")
    add(f"{p}retry-failed", action="store_true", help="re-send samples whose stored result is a failure")
    g.add_argument("--gamma", type=int, default=4, help="keep samples with score >= gamma (paper: 4)")
    add("--score-prompt", default=None, help="file replacing the shipped p_R (score.txt)")
    add("--feedback-prompt", default=None, help="file replacing the shipped p_F (feedback.txt)")
    add("--summarize-prompt", default=None, help="file replacing the shipped p_S (summarize.txt)")
    g.add_argument("--examples", default=None, help="JSON file of in-context examples c_R (default: EPBD-synth set)")
    return parser


def scorer_config_from_args(args: argparse.Namespace, prefix: str = "lmm") -> ScorerConfig:
    a = {k: v for k, v in vars(args).items()}
    p = prefix.replace("-", "_") + "_"
    return ScorerConfig(
        model=a[p + "model"],
        base_url=a[p + "base_url"],
        api_key_env=a[p + "api_key_env"],
        concurrency=a[p + "concurrency"],
        timeout=a[p + "timeout"],
        temperature=a[p + "temperature"],
        max_retries=a[p + "max_retries"],
        image_detail=a[p + "image_detail"],
        image_max_side=a[p + "image_max_side"],
        image_format=a[p + "image_format"],
        structured_output=a[p + "structured_output"],
        send_cutout=a[p + "send_cutout"],
        price_input_per_1m=a[p + "price_input"],
        price_output_per_1m=a[p + "price_output"],
        retry_failed=a[p + "retry_failed"],
        gamma=a["gamma"],
    )


def prompts_from_args(args: argparse.Namespace) -> tuple[PromptSet, list[Example]]:
    prompts = PromptSet.load(args.score_prompt, args.feedback_prompt, args.summarize_prompt)
    return prompts, load_examples(args.examples)
