"""Large IDR-LMM runs: the OpenAI Batch API, and offline JSONL for ``vllm run-batch``-style tools.

Both write the very requests the online scorer would send (same messages, same body), one JSONL
line each::

    {"custom_id": "<result key>", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

The ``custom_id`` is the result key of :class:`~.scorer.ResultStore`
(``kind:round:config_hash:sample_id``), so outputs -- which come back in any order -- join on it
into the same store as online results. Online runs, batch runs and offline imports therefore
share one exactly-once record per sample: whatever is answered in one mode is not sent again in
another.

* :class:`BatchRunner` -- write shards (<= 50,000 requests and < 200 MB each), upload them
  (``files.create(purpose="batch")``), ``batches.create``, poll, download the output and error
  files and join them. Submitted batches are recorded in ``<workdir>/batches.json`` before and
  after each step, so a restarted run resumes polling instead of submitting (and paying) again.
* :func:`write_batch_jsonl` + :func:`import_batch_output` -- the offline mode: write the input
  JSONL, run it elsewhere (``vllm run-batch -i in.jsonl -o out.jsonl --model ...``), import the
  output file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import openai

from .scorer import (
    LMMResult,
    OpenAICompatibleScorer,
    ReplyParseError,
    RunReport,
    Sample,
    _as_sample,
    _Failure,
    make_key,
    parse_reply,
    split_key,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BatchRunner",
    "build_batch_lines",
    "write_batch_jsonl",
    "import_batch_output",
    "read_jsonl",
    "MAX_REQUESTS_PER_FILE",
    "MAX_BYTES_PER_FILE",
    "BATCH_ENDPOINT",
]

BATCH_ENDPOINT = "/v1/chat/completions"
MAX_REQUESTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 190 * 1024 * 1024  # OpenAI's limit is 200 MB; keep a margin
TERMINAL = ("completed", "failed", "expired", "cancelled")


def build_batch_lines(
    scorer: OpenAICompatibleScorer,
    kind: str,
    items: Iterable[Sample | Mapping],
    *,
    round: int = 1,
    feedback: str | None = None,
    skip_done: bool = True,
) -> list[tuple[str, bytes]]:
    """``(custom_id, JSONL line)`` for each item that the store does not already answer."""
    if kind not in ("score", "feedback"):
        raise ValueError("batch mode covers 'score' and 'feedback' requests (the summary is one request)")
    chash = scorer.config_hash(kind, feedback)
    out, seen = [], set()
    for item in items:
        sample = _as_sample(item)
        if sample.id in seen:
            raise ValueError(f"duplicate sample id {sample.id!r}")
        seen.add(sample.id)
        key = make_key(kind, round, sample.id, chash)
        if skip_done and scorer.is_done(key):
            continue
        body = scorer.request_body(kind, scorer.build_messages(kind, sample, feedback))
        line = {"custom_id": key, "method": "POST", "url": BATCH_ENDPOINT, "body": body}
        out.append((key, (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")))
    return out


def _shards(lines: Sequence[tuple[str, bytes]], max_requests: int, max_bytes: int) -> list[list[tuple[str, bytes]]]:
    shards, cur, size = [], [], 0
    for cid, line in lines:
        if len(line) > max_bytes:
            raise ValueError(f"request {cid} alone is larger than {max_bytes} bytes: lower image_max_side")
        if cur and (len(cur) >= max_requests or size + len(line) > max_bytes):
            shards.append(cur)
            cur, size = [], 0
        cur.append((cid, line))
        size += len(line)
    if cur:
        shards.append(cur)
    return shards


def _fsync_write(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_batch_jsonl(
    scorer: OpenAICompatibleScorer,
    kind: str,
    items: Iterable[Sample | Mapping],
    path: str | os.PathLike,
    *,
    round: int = 1,
    feedback: str | None = None,
    max_requests_per_file: int = MAX_REQUESTS_PER_FILE,
    max_bytes_per_file: int = MAX_BYTES_PER_FILE,
) -> list[Path]:
    """Offline mode: write the requests not yet answered as JSONL (``path``, or ``path`` with a
    ``-00001`` suffix per shard when they do not fit one file). Returns the files written.

    Run them with e.g. ``vllm run-batch -i requests.jsonl -o results.jsonl --model <model>``
    and join the results with :func:`import_batch_output`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shards = _shards(
        build_batch_lines(scorer, kind, items, round=round, feedback=feedback),
        max_requests_per_file,
        max_bytes_per_file,
    )
    paths = []
    for n, shard in enumerate(shards):
        p = path if len(shards) == 1 else path.with_name(f"{path.stem}-{n + 1:05d}{path.suffix}")
        _fsync_write(p, b"".join(line for _, line in shard))
        paths.append(p)
    return paths


def read_jsonl(source: str | os.PathLike | bytes | str) -> list[dict]:
    """Lines of a JSONL file (path) or JSONL text/bytes; blank lines are skipped."""
    if isinstance(source, (bytes, bytearray)):
        text = source.decode("utf-8")
    elif isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source and os.path.exists(source)):
        text = Path(source).read_text(encoding="utf-8")
    else:
        text = source
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _result_from_line(scorer: OpenAICompatibleScorer, line: Mapping[str, Any], source: str, cost_factor: float):
    """Turn one output/error line into ``(LMMResult, unparseable_content or None)``."""
    kind, rnd, chash, sample_id = split_key(line["custom_id"])
    response = line.get("response") or {}
    body = response.get("body") or {}
    usage = body.get("usage") or {}
    u = {
        "prompt_tokens": usage.get("prompt_tokens") or 0,
        "completion_tokens": usage.get("completion_tokens") or 0,
        "attempts": 1,
    }

    def fail(error_type, message, transient, raw=None):
        f = _Failure(error_type, scorer._redact(message), transient, raw)
        return scorer.make_record(kind, rnd, sample_id, chash, usage=u, failure=f, source=source,
                                  cost_factor=cost_factor)

    error = line.get("error")
    status = response.get("status_code")
    if error or status != 200:
        msg = (error or {}).get("message") if isinstance(error, Mapping) else error
        if not msg:
            msg = ((body.get("error") or {}).get("message")) or f"HTTP {status}"
        transient = status is None or status == 429 or status >= 500
        return fail("batch_error", f"{status}: {msg}", transient), None
    choices = body.get("choices") or []
    choice = choices[0] if choices else {}
    message = choice.get("message") or {}
    if message.get("refusal") or choice.get("finish_reason") == "content_filter":
        return fail("refusal", message.get("refusal") or "content filter", False), None
    content = message.get("content")
    try:
        reply = parse_reply(content, kind)
    except ReplyParseError as e:
        rec = fail("unparseable", f"batch reply: {e}", False, raw=(content or "")[:2000])
        return rec, content or ""
    rec = scorer.make_record(kind, rnd, sample_id, chash, reply=reply, usage=u, source=source,
                             cost_factor=cost_factor)
    return rec, None


def import_batch_output(
    scorer: OpenAICompatibleScorer,
    output: str | os.PathLike | bytes,
    *,
    source: str = "offline",
    cost_factor: float = 1.0,
    expected: Iterable[str] | None = None,
) -> dict[str, LMMResult]:
    """Join a batch output (OpenAI Batch or ``vllm run-batch`` format) into the scorer's store.

    Lines whose ``custom_id`` already has an ok result are ignored (exactly-once). Unparseable
    replies are recorded as failures (use :meth:`BatchRunner.run` for the online repair).
    ``expected``: custom_ids that should be present; missing ones are recorded as transient
    failures so that the next run sends them again. Returns the records written, by custom_id.
    """
    written: dict[str, LMMResult] = {}
    for line in read_jsonl(output):
        cid = line.get("custom_id")
        old = scorer.store.get(cid) if cid else None
        if not cid or (old is not None and old.ok):
            continue
        rec, _ = _result_from_line(scorer, line, source, cost_factor)
        if old is not None and (old.error_type, old.error) == (rec.error_type, rec.error):
            continue  # the same failure imported again (the same file twice)
        if scorer.store.append(rec):
            written[cid] = rec
    for cid in expected or ():
        if cid not in written and scorer.store.get(cid) is None:
            kind, rnd, chash, sample_id = split_key(cid)
            f = _Failure("batch_error", "no result for this request in the batch output", True)
            rec = scorer.make_record(kind, rnd, sample_id, chash, failure=f, source=source)
            scorer.store.append(rec)
            written[cid] = rec
    return written


class BatchRunner:
    """Score or review samples through the OpenAI Batch API (or any server implementing it).

    Args:
        scorer: the online scorer whose settings, prompts, examples and store are used.
        workdir: where shards and ``batches.json`` (the submission state) live.
        poll_interval: seconds between status polls.
        cost_factor: price multiplier of batch requests (OpenAI bills batches at 50%).
        repair_online: send the repair request online for replies that do not parse (as the online
            scorer does); otherwise they are recorded as failures right away.
        client: an ``openai.OpenAI`` to use (default: built from the scorer's settings).
    """

    def __init__(
        self,
        scorer: OpenAICompatibleScorer,
        workdir: str | os.PathLike,
        *,
        poll_interval: float = 30.0,
        cost_factor: float = 0.5,
        repair_online: bool = True,
        max_requests_per_file: int = MAX_REQUESTS_PER_FILE,
        max_bytes_per_file: int = MAX_BYTES_PER_FILE,
        client: openai.OpenAI | None = None,
    ):
        self.scorer = scorer
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.poll_interval = poll_interval
        self.cost_factor = cost_factor
        self.repair_online = repair_online
        self.max_requests_per_file = max_requests_per_file
        self.max_bytes_per_file = max_bytes_per_file
        self._client = client
        self._feedback: dict[str, str | None] = {}
        self.state_path = self.workdir / "batches.json"
        self.state: dict[str, dict[str, Any]] = (
            json.loads(self.state_path.read_text("utf-8")) if self.state_path.exists() else {}
        )

    # plumbing -------------------------------------------------------------------------------
    @property
    def client(self) -> openai.OpenAI:
        if self._client is None:
            c = self.scorer.config
            kwargs: dict[str, Any] = {"api_key": self.scorer._api_key(), "timeout": c.timeout, "max_retries": 5}
            if c.base_url:
                kwargs["base_url"] = c.base_url
            self._client = openai.OpenAI(**kwargs)
        return self._client

    def _save_state(self):
        _fsync_write(self.state_path, json.dumps(self.state, indent=1, sort_keys=True).encode("utf-8"))

    # steps ----------------------------------------------------------------------------------
    def prepare(self, kind: str, items: Iterable[Sample | Mapping], *, round: int = 1,
                feedback: str | None = None) -> list[str]:
        """Write shards for the requests that are neither answered nor in a pending batch."""
        pending = {cid for s in self.state.values() if not s.get("collected") for cid in s["custom_ids"]}
        lines = [
            (cid, line)
            for cid, line in build_batch_lines(self.scorer, kind, items, round=round, feedback=feedback)
            if cid not in pending
        ]
        names = []
        stamp, first = time.strftime("%Y%m%d-%H%M%S"), len(self.state)
        for n, shard in enumerate(_shards(lines, self.max_requests_per_file, self.max_bytes_per_file)):
            name = f"{kind}-r{round}-{stamp}-{first + n:04d}.jsonl"
            _fsync_write(self.workdir / name, b"".join(line for _, line in shard))
            self.state[name] = {"kind": kind, "round": round, "custom_ids": [cid for cid, _ in shard],
                                "file_id": None, "batch_id": None, "status": "prepared", "collected": False}
            names.append(name)
        self._save_state()
        return names

    def submit(self, name: str) -> str:
        """Upload one shard and create its batch (idempotent across restarts)."""
        s = self.state[name]
        if s["batch_id"]:
            return s["batch_id"]
        if s["file_id"] is None:
            with open(self.workdir / name, "rb") as f:
                s["file_id"] = self.client.files.create(file=(name, f), purpose="batch").id
            self._save_state()
        # a crash between batches.create and the state write must not create a second batch
        batch_id = None
        with contextlib.suppress(openai.APIError):
            for b in self.client.batches.list(limit=100).data:  # newest first
                if b.input_file_id == s["file_id"]:
                    batch_id = b.id
                    break
        if batch_id is None:
            batch = self.client.batches.create(
                input_file_id=s["file_id"], endpoint=BATCH_ENDPOINT, completion_window="24h",
                metadata={"product2img_shard": name[:512]},
            )
            batch_id = batch.id
        s["batch_id"], s["status"] = batch_id, "submitted"
        self._save_state()
        return batch_id

    def wait(self, name: str, timeout: float | None = None, show_progress: bool | None = None):
        """Poll until the shard's batch is in a terminal state; returns the Batch object."""
        s = self.state[name]
        show = self.scorer.config.show_progress if show_progress is None else show_progress
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(s["custom_ids"]), desc=f"batch {s['batch_id']}", unit="req")
        t0 = time.monotonic()
        try:
            while True:
                batch = self.client.batches.retrieve(s["batch_id"])
                counts = batch.request_counts
                if bar is not None and counts is not None:
                    bar.n = counts.completed + counts.failed
                    bar.set_postfix_str(f"{batch.status} done={counts.completed} failed={counts.failed}",
                                        refresh=True)
                if batch.status in TERMINAL:
                    s["status"] = batch.status
                    self._save_state()
                    return batch
                if timeout is not None and time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"batch {s['batch_id']} still {batch.status} after {timeout}s")
                time.sleep(self.poll_interval)
        finally:
            if bar is not None:
                bar.close()

    def collect(self, name: str, batch=None, samples: Mapping[str, Sample] | None = None) -> dict[str, LMMResult]:
        """Download the output and error files of a finished batch and join them into the store.

        ``samples`` (by id) enables the online repair of unparseable replies.
        """
        s = self.state[name]
        batch = batch or self.client.batches.retrieve(s["batch_id"])
        lines: list[dict] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                lines += read_jsonl(self.client.files.content(file_id).content)
        written: dict[str, LMMResult] = {}
        repairs: list[tuple[LMMResult, str]] = []
        expected = set(s["custom_ids"])
        for line in lines:
            cid = line.get("custom_id")
            if cid not in expected:
                logger.warning("batch %s: ignoring an unknown custom_id %r", s["batch_id"], cid)
                continue
            existing = self.scorer.store.get(cid)
            if existing is not None and existing.ok:
                continue
            rec, bad_content = _result_from_line(self.scorer, line, "batch", self.cost_factor)
            if bad_content is not None and self.repair_online and samples is not None and rec.sample_id in samples:
                repairs.append((rec, bad_content))
                continue
            self.scorer.store.append(rec)
            written[cid] = rec
        if repairs:
            written.update(asyncio.run(self._repair(repairs, samples)))
        for cid in expected - set(written):
            if self.scorer.store.get(cid) is None:
                kind, rnd, chash, sample_id = split_key(cid)
                f = _Failure("batch_error", f"no result in the batch output (batch {batch.status})", True)
                rec = self.scorer.make_record(kind, rnd, sample_id, chash, failure=f, source="batch")
                self.scorer.store.append(rec)
                written[cid] = rec
        s["collected"] = True
        self._save_state()
        return written

    async def _repair(self, repairs: list[tuple[LMMResult, str]], samples: Mapping[str, Sample]):
        """The online repair request for unparseable batch replies (one each, bounded concurrency)."""
        sc = self.scorer
        own = sc._client is None
        if own:
            sc._client = sc._make_client()
        sem = asyncio.Semaphore(sc.config.concurrency)
        out: dict[str, LMMResult] = {}

        async def one(rec: LMMResult, content: str):
            async with sem:
                feedback = self._feedback.get(rec.config_hash)
                messages = await asyncio.to_thread(sc.build_messages, rec.kind, samples[rec.sample_id], feedback)
                usage = {"prompt_tokens": rec.prompt_tokens, "completion_tokens": rec.completion_tokens,
                         "attempts": rec.attempts}
                try:
                    reply, usage = await sc._ask(rec.kind, rec.sample_id, messages, first_reply=content, usage=usage)
                    new = sc.make_record(rec.kind, rec.round, rec.sample_id, rec.config_hash, reply=reply,
                                         usage=usage, source="batch+repair")
                except _Failure as f:
                    new = sc.make_record(rec.kind, rec.round, rec.sample_id, rec.config_hash,
                                         usage=f.usage or usage, failure=f, source="batch+repair")
                await sc.store.aappend(new)
                out[new.key] = new

        try:
            await asyncio.gather(*(one(r, c) for r, c in repairs))
        finally:
            if own:
                await sc._client.close()
                sc._client = None
        return out

    # all together ---------------------------------------------------------------------------
    def run(self, kind: str, items: Iterable[Sample | Mapping], *, round: int = 1, feedback: str | None = None,
            timeout: float | None = None) -> RunReport:
        """Resume pending batches, submit what is left, wait, join; the same report as online."""
        t0 = time.perf_counter()
        samples = {s.id: s for s in (_as_sample(i) for i in items)}
        chash = self.scorer.config_hash(kind, feedback)
        self._feedback = {chash: feedback}
        before = {cid for cid in (make_key(kind, round, sid, chash) for sid in samples) if self.scorer.is_done(cid)}
        self.prepare(kind, samples.values(), round=round, feedback=feedback)
        for name, s in list(self.state.items()):
            if s.get("collected"):
                continue
            self.submit(name)
            batch = self.wait(name, timeout=timeout)
            self.collect(name, batch, samples if s["kind"] == kind else None)
        report = RunReport(kind=kind, round=round, config_hash=chash, results={})
        for sid in samples:
            key = make_key(kind, round, sid, chash)
            rec = self.scorer.store.get(key)
            if rec is not None:
                report.results[sid] = rec
                if key in before:
                    report.n_cached += 1
                else:
                    report.n_sent += 1
                    report.prompt_tokens += rec.prompt_tokens
                    report.completion_tokens += rec.completion_tokens
                    report.cost += rec.cost
        report.elapsed = time.perf_counter() - t0
        return report
