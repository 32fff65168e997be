"""A simulated LMM: a small local OpenAI-compatible HTTP server that judges EPBD-synth images.

No real LMM can be reached in tests or the offline demo, so this server stands in for one. It
speaks enough of the OpenAI HTTP API for the real ``openai`` client to drive it on 127.0.0.1:

* ``GET /v1/models``; ``POST /v1/chat/completions`` (text + ``image_url`` data-URL parts,
  ``response_format`` ``json_schema``/``json_object``, token ``usage``);
* ``POST /v1/files`` (multipart), ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``,
  ``POST /v1/batches``, ``GET /v1/batches[/{id}]``, ``POST /v1/batches/{id}/cancel`` -- the Batch API.

**How it judges.** It decodes the image of the request and looks at its pixels with the EPBD-synth
detectors (:mod:`diffusers_product2img.data.synth`: ``detect_defects``, ``classify_scene``,
``category_scene``), against the category given in (or inferred from) the prompt:

* a defect it perceives (watermark/text, plain white background, clutter, a scene that belongs to
  another category) gives a low score (1-3); a clean image in the right scene gives 4-5;
* it is imperfect: each defect is missed with probability ``miss_prob`` (default 0.4), drawn from
  a seeded hash of (image, defect kind), so the same image is judged the same way every time;
* it improves with feedback: a defect named in the ``<feedback>`` section of the scoring prompt is
  missed only with probability ``miss_prob_named`` (0.05). This is IDR-LMM's self-improvement
  (eq. 8), made observable. Because the draw per (image, kind) is fixed, a defect caught without
  feedback is still caught with it.

Feedback requests (``p_F``) describe the defects of a generated image with stock phrases, and
summary requests (``p_S``) count those phrases over all ``<feedback_item>`` s and name the most
common problems. Request kinds are told apart by the ``response_format`` schema name, then by the
marker line of the shipped templates, then by keywords.

**Fault injection** (tests): :class:`Fault` rules -- ``rate_limit`` (429 + ``retry-after``),
``server_error`` (500), ``delay`` (sleep, to trigger client timeouts), ``malformed`` (content that is
not the JSON asked for), ``refusal`` -- per sample id, a number of times, or with a probability; and
``die_after=N``: the server drops every connection and stops after N chat requests.

Run it::

    python -m diffusers_product2img.idr.simulated_lmm --port 8011 --latency 0.2

or in tests::

    with SimulatedLMMServer(latency=0.05) as server:
        config = ScorerConfig(model="sim-lmm", base_url=server.base_url)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "SimulatedLMMServer",
    "Fault",
    "PixelJudge",
    "HashJudge",
    "DEFECT_PATTERNS",
    "defects_named_in",
    "request_kind",
]

SAMPLE_ID_HEADER = "x-product2img-sample-id"  # same as scorer.SAMPLE_ID_HEADER (HTTP headers are case-blind)

#: How the judge recognises a defect kind named in feedback text (and counts them in summaries).
DEFECT_PATTERNS: dict[str, re.Pattern] = {
    "watermark": re.compile(r"watermark|\btexts?\b|\blogos?\b|caption|lettering|marketing|slogan", re.I),
    "plain_white": re.compile(
        r"white background|plain white|plain background|blank background|empty background|no scene|"
        r"studio background",
        re.I,
    ),
    "clutter": re.compile(r"clutter|busy background|messy|distracting", re.I),
    "wrong_scene": re.compile(
        r"wrong scene|does not match|doesn't match|mismatch|irrelevant|unrelated|not relevant|"
        r"belongs to (?:a |an )?(?:other|different)",
        re.I,
    ),
}

#: The stock phrase the judge uses for each defect kind (each matches its own pattern above).
DEFECT_PHRASES = {
    "watermark": "watermark text over the background (marketing text or logo)",
    "plain_white": "plain white background with no scene",
    "clutter": "cluttered, distracting background",
    "wrong_scene": "scene does not match the product",
}
SEVERITY = {"watermark": 2, "plain_white": 2, "wrong_scene": 2, "clutter": 3}


def defects_named_in(text: str | None) -> set[str]:
    """The defect kinds that a feedback text names."""
    if not text:
        return set()
    return {kind for kind, pat in DEFECT_PATTERNS.items() if pat.search(text)}


def _uniform(*parts: Any) -> float:
    """A reproducible uniform draw in [0, 1) from the hash of ``parts``."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


# ----------------------------------------------------------------------------------------------
# Judges
# ----------------------------------------------------------------------------------------------


@dataclass
class Judgement:
    score: int
    reasoning: str
    perceived: list[str]
    present: list[str]


class PixelJudge:
    """Judges EPBD-synth images from their pixels (see the module docstring)."""

    def __init__(self, seed: int = 0, miss_prob: float = 0.4, miss_prob_named: float = 0.05,
                 threshold: float = 0.5):
        from ..data import synth  # the EPBD-synth world: detectors and the category -> scene rules

        self.synth = synth
        self.seed, self.miss_prob, self.miss_prob_named, self.threshold = seed, miss_prob, miss_prob_named, threshold

    # helpers --------------------------------------------------------------------------------
    def infer_category(self, product_name: str, category: str | None) -> str | None:
        """The category given in the prompt, else the one whose product noun the name contains."""
        cats = self.synth.CATEGORIES
        if category and category in cats:
            return category
        name, best, best_len = (product_name or "").lower(), None, 0
        for cat, spec in cats.items():
            for noun in getattr(spec, "nouns", ()):
                if noun.lower() in name and len(noun) > best_len:
                    best, best_len = cat, len(noun)
        return best

    def present_defects(self, image, mask: np.ndarray | None, category: str | None) -> tuple[list[str], str]:
        """Defect kinds the pixels show (no misses), and the scene seen."""
        conf = self.synth.detect_defects(image, product_mask=mask)
        present = [k for k in ("watermark", "plain_white", "clutter") if conf.get(k, 0.0) >= self.threshold]
        scene = self.synth.classify_scene(image, product_mask=mask)
        # a scene counts as wrong only when it is recognised as another category's scene
        if (category is not None and "plain_white" not in present and scene not in ("plain_white", "unknown")
                and scene != self.synth.category_scene(category)):
            present.append("wrong_scene")
        return present, scene

    # requests -------------------------------------------------------------------------------
    def score(self, image, mask, image_hash: str, product_name: str, category: str | None,
              feedback: str | None) -> Judgement:
        category = self.infer_category(product_name, category)
        present, scene = self.present_defects(image, mask, category)
        named = defects_named_in(feedback)
        perceived = []
        for kind in present:
            p_miss = self.miss_prob_named if kind in named else self.miss_prob
            if _uniform(self.seed, image_hash, kind) >= p_miss:
                perceived.append(kind)
        notes = [f"The background looks like a {scene.replace('_', ' ')} scene."]
        if category:
            notes.append(f"The product is a {category.replace('_', ' ')} item.")
        if perceived:
            notes += [f"Problem: {DEFECT_PHRASES[k]}." for k in perceived]
            score = 1 if len(perceived) > 1 else SEVERITY[perceived[0]]
            notes.append("Not suitable as a training image.")
        else:
            notes.append("The product is intact, there is no text or logo, and the scene fits the product.")
            score = 5 if _uniform(self.seed, image_hash, "good") < 0.6 else 4
        return Judgement(score, " ".join(notes), perceived, present)

    def feedback(self, image, mask, image_hash: str, product_name: str, category: str | None) -> str:
        category = self.infer_category(product_name, category)
        present, scene = self.present_defects(image, mask, category)
        if not present:
            return "no problems: clean background that fits the product"
        parts = [DEFECT_PHRASES[k] for k in present]
        if "wrong_scene" in present and category:
            parts[present.index("wrong_scene")] += (
                f" (a {scene.replace('_', ' ')} scene for a {category.replace('_', ' ')} product)"
            )
        return "; ".join(parts)


class HashJudge:
    """No decoding at all: a score drawn from the hash of the request (benchmarks, fault tests)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, image, mask, image_hash, product_name, category, feedback) -> Judgement:
        score = 1 + int(_uniform(self.seed, image_hash) * 5)
        return Judgement(score, f"Hash-based judgement of {product_name!r}.", [], [])

    def feedback(self, image, mask, image_hash, product_name, category) -> str:
        return "no problems"


def summarize_feedback_items(items: Sequence[str]) -> str:
    """Count the defect kinds named in the feedback items and name the most common ones."""
    n = len(items)
    counts = Counter(kind for text in items for kind in defects_named_in(text))
    common = [(k, c) for k, c in counts.most_common() if c >= 2 or (n <= 5 and c >= 1)]
    if not common:
        return f"No recurring problems were found in the {n} generated images."
    listed = "; ".join(f"{DEFECT_PHRASES[k]} ({c} of {n} images)" for k, c in common)
    reject = ", ".join(DEFECT_PHRASES[k] for k, _ in common)
    return (
        f"Most common problems in the generated images: {listed}. "
        f"Reject training images that show: {reject}."
    )


# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _images_of(content: Any) -> list[str]:
    if not isinstance(content, list):
        return []
    out = []
    for p in content:
        if isinstance(p, dict) and p.get("type") == "image_url":
            iu = p.get("image_url")
            out.append(iu.get("url") if isinstance(iu, dict) else iu)
    return out


def request_kind(body: dict) -> str:
    """``score``, ``feedback`` or ``summary`` for a chat request of the scorer."""
    rf = body.get("response_format") or {}
    name = (rf.get("json_schema") or {}).get("name", "") if isinstance(rf, dict) else ""
    for kind in ("score", "feedback", "summary"):
        if name == f"product2img_{kind}":
            return kind
    messages = body.get("messages") or []
    instructions = "\n".join(_text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
    everything = instructions + "\n" + "\n".join(_text_of(m.get("content")) for m in messages)
    m = re.search(r"\[product2img task:\s*(score|feedback|summari[sz]e)", everything)
    if m:
        return {"summarise": "summary", "summarize": "summary"}.get(m.group(1), m.group(1))
    if "<feedback_item>" in everything or re.search(r"summari[sz]e", instructions, re.I):
        return "summary"
    if re.search(r"generated", instructions, re.I) and not re.search(r"\bscore\b", instructions, re.I):
        return "feedback"
    return "score"


def decode_data_url(url: str) -> tuple[Image.Image, str]:
    if not url or not url.startswith("data:") or ";base64," not in url:
        raise ValueError("only base64 data URLs are supported by the simulated LMM")
    raw = base64.b64decode(url.split(";base64,", 1)[1])
    return Image.open(io.BytesIO(raw)), hashlib.sha256(raw).hexdigest()


def image_tokens(detail: str | None, size: tuple[int, int] | None) -> int:
    """OpenAI's accounting: 85 tokens at low detail, 85 + 170 per 512px tile at high detail."""
    if detail == "low" or size is None:
        return 85
    w, h = size
    scale = min(1.0, 2048 / max(w, h))
    w, h = w * scale, h * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * int(np.ceil(w / 512) * np.ceil(h / 512))


@dataclass
class Fault:
    """One fault-injection rule for chat requests (online or inside a batch).

    ``kind``: ``rate_limit`` | ``server_error`` | ``delay`` | ``malformed`` | ``refusal``.
    It applies to requests whose sample id is in ``sample_ids`` (``None``: all), at most ``times``
    times per sample id (``None``: always), each time with ``probability``.
    """

    kind: str
    sample_ids: set[str] | None = None
    times: int | None = 1
    probability: float = 1.0
    retry_after: float | None = 0.05
    delay: float = 0.0
    fired: Counter = field(default_factory=Counter)

    def __post_init__(self):
        if self.kind not in ("rate_limit", "server_error", "delay", "malformed", "refusal"):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.sample_ids is not None:
            self.sample_ids = set(self.sample_ids)


class _Dropped(Exception):
    """The server is dead: close the connection without replying."""


class SimulatedLMMServer:
    """The simulated LMM server (see the module docstring). Also a context manager.

    Args:
        host, port: where to listen (``port=0``: a free port; see :attr:`base_url`).
        latency: seconds each chat request takes (plus uniform ``jitter``).
        judge: ``"pixel"`` (EPBD-synth pixel judge, the default), ``"hash"`` (no decoding), or an
            object with ``score(...)``/``feedback(...)`` like :class:`PixelJudge`.
        seed, miss_prob, miss_prob_named: the pixel judge's imperfection.
        faults: :class:`Fault` rules; ``die_after``: stop after that many chat requests.
        require_api_key: if set, requests must carry ``Authorization: Bearer <key>`` (401 otherwise,
            echoing a masked key as OpenAI does).
        reject_response_format: answer 400 to ``response_format`` (a server without structured output).
        schema_free_style: how JSON is wrapped when no schema was asked for: ``"json"`` or ``"prose"``
            (JSON in a fenced block after some words, as many open models do).
        batch_latency: seconds per request while a batch runs.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency: float = 0.0,
        jitter: float = 0.0,
        judge: str | Any = "pixel",
        seed: int = 0,
        miss_prob: float = 0.4,
        miss_prob_named: float = 0.05,
        faults: Iterable[Fault] = (),
        die_after: int | None = None,
        require_api_key: str | None = None,
        reject_response_format: bool = False,
        schema_free_style: str = "json",
        batch_latency: float = 0.0,
        model_names: Sequence[str] = ("sim-lmm",),
        record_bodies: bool = False,
    ):
        self.host, self.port = host, port
        self.latency, self.jitter = latency, jitter
        if judge == "pixel":
            judge = PixelJudge(seed=seed, miss_prob=miss_prob, miss_prob_named=miss_prob_named)
        elif judge == "hash":
            judge = HashJudge(seed=seed)
        self.judge = judge
        self.faults = list(faults)
        self.die_after = die_after
        self.require_api_key = require_api_key
        self.reject_response_format = reject_response_format
        self.schema_free_style = schema_free_style
        self.batch_latency = batch_latency
        self.model_names = list(model_names)
        self.record_bodies = record_bodies
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.dead = False
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.reset_stats()

    # stats ----------------------------------------------------------------------------------
    def reset_stats(self):
        with self._lock:
            self.chat_requests = 0
            self.requests_per_sample: Counter = Counter()  # every chat request received
            self.answered_per_sample: Counter = Counter()  # 200 replies written out
            self.requests_per_kind: Counter = Counter()
            self.status_counts: Counter = Counter()
            self.auth_headers_seen: list[str] = []
            self.bodies: list[dict] = []  # chat request bodies, when record_bodies
            self.in_flight = 0
            self.max_in_flight = 0

    # lifecycle ------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> SimulatedLMMServer:
        server = self

        class Handler(_Handler):
            sim = server

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024  # the default backlog of 5 drops bursts of connections

        self._httpd = Server((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="simulated-lmm", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def die(self):
        """Stop answering: in-flight requests are dropped, new connections refused."""
        self.dead = True
        threading.Thread(target=self.stop, daemon=True).start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # chat -----------------------------------------------------------------------------------
    def _fault_for(self, sample_id: str | None) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.sample_ids is not None and sample_id not in f.sample_ids:
                    continue
                if f.times is not None and f.fired[sample_id] >= f.times:
                    continue
                if f.probability < 1.0 and self._rng.random() >= f.probability:
                    continue
                f.fired[sample_id] += 1
                return f
        return None

    def chat(self, body: dict, sample_id: str | None, latency: float) -> tuple[int, dict, dict]:
        """Handle one chat completion; returns ``(status, json body, extra headers)``."""
        kind = request_kind(body)
        with self._lock:
            self.chat_requests += 1
            n = self.chat_requests
            self.requests_per_sample[sample_id] += 1
            self.requests_per_kind[kind] += 1
            if self.record_bodies:
                self.bodies.append(body)
        if self.die_after is not None and n > self.die_after:
            self.die()
            raise _Dropped()
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self._chat(kind, body, sample_id, latency)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _chat(self, kind: str, body: dict, sample_id: str | None, latency: float) -> tuple[int, dict, dict]:
        if self.reject_response_format and body.get("response_format"):
            return 400, _error("response_format is not supported by this server", "invalid_request_error"), {}
        fault = self._fault_for(sample_id)
        if fault is not None and fault.kind == "rate_limit":
            headers = {"retry-after": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
            return 429, _error("Rate limit reached for requests", "rate_limit_exceeded"), headers
        if fault is not None and fault.kind == "server_error":
            return 500, _error("The server had an error while processing your request.", "server_error"), {}
        if latency > 0:
            time.sleep(latency + (self._rng.uniform(0, self.jitter) if self.jitter else 0.0))
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.delay)
        if self.dead:
            raise _Dropped()
        refusal, content = None, None
        if fault is not None and fault.kind == "refusal":
            refusal = "I'm sorry, but I can't help with evaluating this image."
        elif fault is not None and fault.kind == "malformed":
            content = 'Sure! The image looks good. {"reasoning": "clean background", "score": '  # cut off
        else:
            content = self._answer(kind, body)
        prompt_tokens = self._prompt_tokens(body)
        completion = {
            "id": f"chatcmpl-sim-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model_names[0]),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "finish_reason": "stop",
                "logprobs": None,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": max(1, len(content or refusal or "") // 4),
                "total_tokens": prompt_tokens + max(1, len(content or refusal or "") // 4),
            },
        }
        return 200, completion, {}

    def _prompt_tokens(self, body: dict) -> int:
        n = 0
        for m in body.get("messages") or []:
            n += 4 + len(_text_of(m.get("content"))) // 4
            content = m.get("content")
            if isinstance(content, list):
                for p in content:
                    if isinstance(p, dict) and p.get("type") == "image_url":
                        iu = p.get("image_url") or {}
                        n += image_tokens(iu.get("detail", "auto") if isinstance(iu, dict) else "auto", (512, 512))
        return n

    def _answer(self, kind: str, body: dict) -> str:
        messages = body.get("messages") or []
        users = [m for m in messages if m.get("role") == "user"]
        with_images = [m for m in users if _images_of(m.get("content"))]
        # the sample is the last user turn with an image (a repair turn that follows is text only)
        last = (with_images or users or [{}])[-1].get("content") or ""
        if kind == "summary":
            text = _text_of(last)
            items = re.findall(r"<feedback_item>(.*?)</feedback_item>", text, re.S)
            if not items:
                items = [line for line in text.splitlines() if line.strip()]
            reply = {"summary": summarize_feedback_items(items)}
        else:
            text = _text_of(last)
            name_m = re.search(r"Product name:\s*(.+)", text)
            cat_m = re.search(r"Category:\s*(.+)", text)
            product_name = name_m.group(1).strip() if name_m else ""
            category = cat_m.group(1).strip() if cat_m else None
            urls = _images_of(last)
            if not urls:
                raise ValueError("no image in the last user message")
            if isinstance(self.judge, HashJudge):
                image, image_hash, mask = None, hashlib.sha256(urls[0].encode()).hexdigest(), None
            else:
                image, image_hash = decode_data_url(urls[0])
                image = image.convert("RGB")
                mask = None
                if len(urls) > 1:  # the cutout: its alpha is the product mask
                    cutout, _ = decode_data_url(urls[1])
                    if cutout.mode in ("RGBA", "LA"):
                        alpha = cutout.getchannel("A").resize(image.size, Image.Resampling.BILINEAR)
                        mask = np.asarray(alpha, dtype=np.float32) / 255.0
            if kind == "score":
                system = "\n".join(_text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
                fb = re.search(r"<feedback>(.*?)</feedback>", system, re.S)
                j = self.judge.score(image, mask, image_hash, product_name, category, fb.group(1) if fb else None)
                reply = {"reasoning": j.reasoning, "score": j.score}
            else:
                reply = {"feedback": self.judge.feedback(image, mask, image_hash, product_name, category)}
        out = json.dumps(reply)
        rf = body.get("response_format") or {}
        if rf.get("type") != "json_schema" and self.schema_free_style == "prose":
            out = f"Here is my assessment.\n```json\n{out}\n```\nLet me know if you need more."
        return out

    # files and batches ----------------------------------------------------------------------
    def create_file(self, filename: str, purpose: str, data: bytes) -> dict:
        fid = f"file-sim{uuid.uuid4().hex[:16]}"
        obj = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed"}
        with self._lock:
            self.files[fid] = {"meta": obj, "data": data}
        return obj

    def create_batch(self, body: dict) -> tuple[int, dict]:
        fid = body.get("input_file_id")
        if fid not in self.files:
            return 400, _error(f"No such file: {fid}", "invalid_request_error")
        if body.get("endpoint") != "/v1/chat/completions":
            return 400, _error("only /v1/chat/completions is supported", "invalid_request_error")
        now = int(time.time())
        bid = f"batch_sim{uuid.uuid4().hex[:16]}"
        batch = {
            "id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None,
            "input_file_id": fid, "completion_window": body.get("completion_window", "24h"),
            "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now,
            "in_progress_at": None, "expires_at": now + 86400, "completed_at": None, "failed_at": None,
            "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        with self._lock:
            self.batches[bid] = batch
        threading.Thread(target=self._run_batch, args=(bid,), daemon=True).start()
        return 200, batch

    def _run_batch(self, bid: str):
        batch = self.batches[bid]
        lines = [json.loads(x) for x in self.files[batch["input_file_id"]]["data"].decode("utf-8").splitlines()
                 if x.strip()]
        batch["request_counts"]["total"] = len(lines)
        batch["status"], batch["in_progress_at"] = "in_progress", int(time.time())
        out, err = [], []
        for line in lines:
            if batch["status"] == "cancelling":
                break
            cid = line.get("custom_id")
            sample_id = cid.split(":", 3)[-1] if cid and cid.count(":") >= 3 else cid
            try:
                status, body, _ = self.chat(line.get("body") or {}, sample_id, self.batch_latency)
            except _Dropped:
                return
            except Exception as e:  # a bad line fails alone
                status, body = 400, _error(str(e), "invalid_request_error")
            rec = {"id": f"batch_req_{uuid.uuid4().hex[:12]}", "custom_id": cid,
                   "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
                   "error": None}
            if status == 200:
                out.append(rec)
                batch["request_counts"]["completed"] += 1
                with self._lock:
                    self.answered_per_sample[sample_id] += 1
            else:
                err.append(rec)
                batch["request_counts"]["failed"] += 1
        if out:
            batch["output_file_id"] = self.create_file(f"{bid}_output.jsonl", "batch_output",
                                                       "".join(json.dumps(r) + "\n" for r in out).encode())["id"]
        if err:
            batch["error_file_id"] = self.create_file(f"{bid}_error.jsonl", "batch_output",
                                                      "".join(json.dumps(r) + "\n" for r in err).encode())["id"]
        if batch["status"] == "cancelling":
            batch["status"], batch["cancelled_at"] = "cancelled", int(time.time())
        else:
            batch["status"], batch["completed_at"] = "completed", int(time.time())


def _error(message: str, type_: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code or type_}}


def _parse_multipart(content_type: str, data: bytes) -> dict[str, tuple[str | None, bytes]]:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ValueError("multipart body without a boundary")
    boundary = b"--" + m.group(1).encode()
    fields = {}
    for part in data.split(boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, _, body = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
        body = body[:-2] if body.endswith(b"\r\n") else body
        disp = head.decode("utf-8", "replace")
        name = re.search(r'name="([^"]*)"', disp)
        filename = re.search(r'filename="([^"]*)"', disp)
        if name:
            fields[name.group(1)] = (filename.group(1) if filename else None, body)
    return fields


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else Nagle + delayed ACK stall small replies by ~40 ms
    sim: SimulatedLMMServer

    def log_message(self, format, *args):  # quiet
        pass

    def _send(self, status: int, payload: Any, headers: dict | None = None, raw: bytes | None = None):
        data = raw if raw is not None else json.dumps(payload).encode("utf-8")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self._headers_buffer.append(b"\r\n")  # end_headers() without its separate flush
            self.wfile.write(b"".join(self._headers_buffer) + data)
            self._headers_buffer = []
        with self.sim._lock:
            self.sim.status_counts[status] += 1

    def _drop(self):
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(2)

    def _auth_ok(self) -> bool:
        auth = self.headers.get("Authorization", "")
        with self.sim._lock:
            self.sim.auth_headers_seen.append(auth)
        key = self.sim.require_api_key
        if key is None or auth == f"Bearer {key}":
            return True
        given = auth.removeprefix("Bearer ")
        masked = given[:3] + "*" * 8 + given[-4:] if len(given) > 8 else "***"
        self._send(401, _error(f"Incorrect API key provided: {masked}.", "invalid_request_error", "invalid_api_key"))
        return False

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self):
        if self.sim.dead:
            return self._drop()
        if not self._auth_ok():
            return
        path = self.path.split("?")[0].rstrip("/")
        sim = self.sim
        if path == "/v1/models":
            return self._send(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "simulated"} for m in sim.model_names]})
        m = re.fullmatch(r"/v1/files/([^/]+)(/content)?", path)
        if m:
            f = sim.files.get(m.group(1))
            if f is None:
                return self._send(404, _error("No such file", "invalid_request_error"))
            return self._send(200, None, raw=f["data"]) if m.group(2) else self._send(200, f["meta"])
        if path == "/v1/batches":
            data = sorted(sim.batches.values(), key=lambda b: b["created_at"], reverse=True)
            return self._send(200, {"object": "list", "data": data, "first_id": None, "last_id": None,
                                    "has_more": False})
        m = re.fullmatch(r"/v1/batches/([^/]+)", path)
        if m and m.group(1) in sim.batches:
            return self._send(200, sim.batches[m.group(1)])
        self._send(404, _error(f"Unknown path {path}", "invalid_request_error"))

    def do_POST(self):
        if self.sim.dead:
            self._body()
            return self._drop()
        raw = self._body()
        if not self._auth_ok():
            return
        path = self.path.split("?")[0].rstrip("/")
        sim = self.sim
        if path == "/v1/chat/completions":
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                return self._send(400, _error("invalid JSON body", "invalid_request_error"))
            sample_id = self.headers.get(SAMPLE_ID_HEADER)
            try:
                status, payload, headers = sim.chat(body, sample_id, sim.latency)
            except _Dropped:
                return self._drop()
            except Exception as e:
                return self._send(400, _error(f"bad request: {e}", "invalid_request_error"))
            self._send(status, payload, headers)
            if status == 200:
                with sim._lock:
                    sim.answered_per_sample[sample_id] += 1
            return
        if path == "/v1/files":
            fields = _parse_multipart(self.headers.get("Content-Type", ""), raw)
            filename, data = fields.get("file", (None, b""))
            purpose = fields.get("purpose", (None, b""))[1].decode()
            return self._send(200, sim.create_file(filename or "upload.jsonl", purpose, data))
        if path == "/v1/batches":
            status, payload = sim.create_batch(json.loads(raw or b"{}"))
            return self._send(status, payload)
        m = re.fullmatch(r"/v1/batches/([^/]+)/cancel", path)
        if m and m.group(1) in sim.batches:
            b = sim.batches[m.group(1)]
            if b["status"] in ("validating", "in_progress"):
                b["status"] = "cancelling"
            return self._send(200, b)
        self._send(404, _error(f"Unknown path {path}", "invalid_request_error"))


def main(argv: Sequence[str] | None = None, ready: Callable[[SimulatedLMMServer], None] | None = None):
    parser = argparse.ArgumentParser(description="A simulated OpenAI-compatible LMM that judges EPBD-synth images.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011, help="0 picks a free port (printed on start)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per chat request")
    parser.add_argument("--jitter", type=float, default=0.0)
    parser.add_argument("--judge", choices=["pixel", "hash"], default="pixel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--miss-prob", type=float, default=0.4)
    parser.add_argument("--miss-prob-named", type=float, default=0.05)
    parser.add_argument("--die-after", type=int, default=None)
    parser.add_argument("--rate-limit-prob", type=float, default=0.0, help="chance of a 429 per request")
    parser.add_argument("--error-prob", type=float, default=0.0, help="chance of a 500 per request")
    parser.add_argument("--malformed-prob", type=float, default=0.0)
    args = parser.parse_args(argv)
    faults = []
    for kind, prob in (("rate_limit", args.rate_limit_prob), ("server_error", args.error_prob),
                       ("malformed", args.malformed_prob)):
        if prob > 0:
            faults.append(Fault(kind, times=None, probability=prob))
    server = SimulatedLMMServer(
        args.host, args.port, latency=args.latency, jitter=args.jitter, judge=args.judge, seed=args.seed,
        miss_prob=args.miss_prob, miss_prob_named=args.miss_prob_named, faults=faults, die_after=args.die_after,
    ).start()
    print(f"simulated LMM listening on {server.base_url}", flush=True)
    if ready is not None:
        ready(server)
    try:
        while server._httpd is not None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
