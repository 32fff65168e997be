"""IDR-LMM scorer (issue #5): the real ``openai`` client against the simulated LMM on 127.0.0.1.

No mocks of the client: every request goes over HTTP to :class:`SimulatedLMMServer`, which counts
what it receives, so "not re-sent", "retried" and "repaired" are checked from the server's side.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from diffusers_product2img.data import synth
from diffusers_product2img.idr.scorer import (
    SAMPLE_ID_HEADER,
    OpenAICompatibleScorer,
    PromptSet,
    ReplyParseError,
    ResultStore,
    Sample,
    ScorerAuthError,
    ScorerConfig,
    ScorerError,
    StoreLockedError,
    add_scorer_args,
    encode_image,
    load_examples,
    make_key,
    parse_reply,
    prompts_from_args,
    scorer_config_from_args,
)
from diffusers_product2img.idr.simulated_lmm import Fault, SimulatedLMMServer

KEY_ENV = "P2I_TEST_LMM_KEY"  # unset: a local server without auth gets "EMPTY"
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def cfg(server: SimulatedLMMServer, **kw) -> ScorerConfig:
    base = dict(model="sim-lmm", base_url=server.base_url, api_key_env=KEY_ENV, show_progress=False,
                backoff_initial=0.01, backoff_max=0.05, max_retries=3, timeout=10)
    base.update(kw)
    return ScorerConfig(**base)


def plain_samples(n: int, prefix: str = "s") -> list[Sample]:
    return [Sample(f"{prefix}{i}", f"Ceramic Coffee Mug {i}", Image.new("RGB", (32, 32), (i % 256, 90, 120)))
            for i in range(n)]


def synth_samples(per_quality: int, seed: int = 7, qualities=synth.QUALITY_LABELS):
    samples, truth = [], {}
    cats = synth.TRAIN_CATEGORIES
    for q in qualities:
        for i in range(per_quality):
            s = synth.render_sample(cats[i % len(cats)], q, seed=(seed, 0, i), resolution=64)
            sid = f"{q}-{i}"
            truth[sid] = q
            samples.append(Sample(sid, s["product_name"], Image.fromarray(s["image"]),
                                  cutout=Image.fromarray(s["cutout"], "RGBA")))
    return samples, truth


# ----------------------------------------------------------------------------------------------
# Parsing, prompts, settings
# ----------------------------------------------------------------------------------------------


def test_parse_reply_json_fenced_prose_and_failures():
    assert parse_reply('{"reasoning": "ok", "score": 4}', "score").score == 4
    assert parse_reply('Sure.\n```json\n{"reasoning": "r", "score": 2}\n```', "score").score == 2
    assert parse_reply('My view: {"reasoning": "r", "score": 5} done', "score").score == 5
    assert parse_reply('{"feedback": "watermark"}', "feedback").feedback == "watermark"
    for bad, why in [(None, "empty"), ("", "empty"), ("no json here", "JSON"),
                     ('{"reasoning": "r", "score": 7}', "score"), ('{"score": 3}', "reasoning"),
                     ('{"reasoning": "r", "score": "high"}', "score"), ("[1, 2]", "not an object")]:
        with pytest.raises(ReplyParseError, match=why):
            parse_reply(bad, "score")


def test_shipped_templates_name_the_paper_criteria_and_feedback_goes_in():
    p = PromptSet.default()
    text = p.score.lower()
    for phrase in ("aesthetic", "relevance", "text", "logo", "product unaltered", "plain white", "reasoning"):
        assert phrase in text
    assert "feedback" in p.feedback.lower() and "summar" in p.summarize.lower()
    assert "<feedback>" not in p.render_score(None)
    rendered = p.render_score("watermark text over the background")
    assert "<feedback>\nwatermark text over the background\n</feedback>" in rendered
    # an override without the placeholder still gets the feedback, appended
    custom = PromptSet(score="Rate it 1-5.", feedback=p.feedback, summarize=p.summarize)
    assert custom.render_score("clutter").startswith("Rate it 1-5.") and "clutter" in custom.render_score("clutter")


def test_default_examples_and_config_needs_a_model():
    examples = load_examples()
    assert len(examples) >= 4 and {e.score for e in examples} >= {2, 5}
    assert all(e.category in synth.CATEGORIES for e in examples)
    with pytest.raises(ValueError, match="model"):
        ScorerConfig(model="")
    with pytest.raises(TypeError):
        ScorerConfig()  # no default model


def test_cli_args_override_prompts_and_examples(tmp_path):
    import argparse

    (tmp_path / "pr.txt").write_text("My own p_R. ${feedback_section}")
    ex = [{"product_name": "Mug", "description": "a mug on a counter", "score": 5, "reasoning": "fine"}]
    (tmp_path / "ex.json").write_text(json.dumps(ex))
    parser = add_scorer_args(argparse.ArgumentParser())
    args = parser.parse_args(["--lmm-model", "Qwen/Qwen2.5-VL-7B-Instruct", "--lmm-base-url", "http://h:8000/v1",
                              "--lmm-concurrency", "7", "--lmm-image-detail", "high", "--lmm-no-cutout",
                              "--lmm-temperature", "none",
                              "--score-prompt", str(tmp_path / "pr.txt"), "--examples", str(tmp_path / "ex.json")])
    config = scorer_config_from_args(args)
    assert (config.model, config.base_url, config.concurrency, config.image_detail, config.send_cutout) == (
        "Qwen/Qwen2.5-VL-7B-Instruct", "http://h:8000/v1", 7, "high", False)
    assert config.temperature is None and config.api_key_env == "OPENAI_API_KEY"
    assert not any("key" in k and "env" not in k for k in vars(args))  # no flag takes the key itself
    prompts, examples = prompts_from_args(args)
    assert prompts.score.startswith("My own p_R.") and "summar" in prompts.summarize.lower()
    assert [e.product_name for e in examples] == ["Mug"]


def test_encode_image_downscales_and_keeps_cutout_alpha():
    url, digest = encode_image(Image.new("RGB", (1024, 700), (10, 20, 30)), max_side=256)
    assert url.startswith("data:image/png;base64,") and len(digest) == 64
    import base64

    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert max(img.size) == 256
    cut = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    url, _ = encode_image(cut, fmt="jpeg", keep_alpha=True)
    assert url.startswith("data:image/png;")  # alpha survives
    assert encode_image(Image.new("RGB", (8, 8)), fmt="jpeg")[0].startswith("data:image/jpeg;")


# ----------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------


def _rec(key_id: str, status="ok", **kw):
    from diffusers_product2img.idr.scorer import LMMResult

    return LMMResult(key=make_key("score", 1, key_id, "h" * 32), kind="score", sample_id=key_id, round=1,
                     config_hash="h" * 32, status=status, **kw)


def test_store_is_append_only_exactly_once_fsynced_and_survives_a_torn_line(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    with ResultStore(path) as store:
        assert store.append(_rec("a", "failed", error_type="timeout", transient=True))
        assert store.append(_rec("a", score=4))  # a failure may be followed by an ok
        assert not store.append(_rec("a", score=1))  # ok is final
        assert store.append(_rec("b", score=2))
        with pytest.raises(StoreLockedError):
            ResultStore(path)  # one writer at a time
    assert len(fsyncs) == 3
    # a kill -9 in the middle of a write leaves a torn last line
    with open(path, "ab") as f:
        f.write(b'{"key": "score:1:hhhh')
    with ResultStore(path) as store:
        assert store.get(make_key("score", 1, "a", "h" * 32)).score == 4
        assert store.append(_rec("c", score=5))
    lines = path.read_bytes().splitlines()
    assert len(lines) == 4 and all(json.loads(x) for x in lines)


# ----------------------------------------------------------------------------------------------
# Requests against the simulated LMM
# ----------------------------------------------------------------------------------------------


def test_request_is_openai_shaped_and_scores_follow_the_pixels(tmp_path):
    samples, truth = synth_samples(4)
    with SimulatedLMMServer(record_bodies=True) as server:
        scorer = OpenAICompatibleScorer(cfg(server, image_detail="high"), tmp_path / "r.jsonl")
        report = scorer.score_samples(samples, round=1)
    assert report.n_ok == len(samples) and report.n_failed == 0 and report.prompt_tokens > 0
    body = server.bodies[0]
    assert body["model"] == "sim-lmm" and body["temperature"] == 0.0
    rf = body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"]["required"] == ["reasoning", "score"]
    roles = [m["role"] for m in body["messages"]]
    assert roles[0] == "system" and roles[-1] == "user" and roles.count("assistant") == len(load_examples())
    parts = body["messages"][-1]["content"]
    images = [p["image_url"] for p in parts if p["type"] == "image_url"]
    assert len(images) == 2 and all(i["url"].startswith("data:image/png;base64,") for i in images)
    assert all(i["detail"] == "high" for i in images)
    # the judge: every clean image is kept, every kept defect was missed (not invented)
    scores = report.scores()
    assert all(scores[i] >= 4 for i in scores if truth[i] == "good")
    assert all(r.reasoning for r in report.results.values())
    kept = set(report.selected(4))
    assert {i for i in truth if truth[i] == "good"} <= kept
    assert len(kept) < len(samples)


def test_feedback_names_defects_and_improves_scoring(tmp_path):
    """Eq. 8: feedback naming a defect makes the LMM catch it (the self-improvement)."""
    samples, truth = synth_samples(16, qualities=("good", "watermark"))
    with SimulatedLMMServer() as server:
        scorer = OpenAICompatibleScorer(cfg(server), tmp_path / "r.jsonl")
        r1 = scorer.score_samples(samples, round=1)
        reviews = scorer.feedback_on_outputs(samples[:4] + samples[16:24], round=1)
        assert all(reviews.results[s.id].text.startswith("no problems") for s in samples[:4])
        # synth's own watermark detector misses faint stamps now and then
        named = sum("watermark" in reviews.results[s.id].text for s in samples[16:24])
        assert named >= 6
        f1 = scorer.summarize_feedback([r.text for r in reviews.results.values()], round=1)
        assert "watermark" in f1 and f"{named} of 12" in f1
        r2 = scorer.score_samples(samples, round=2, feedback=f1)
    missed_before = sum(truth[i] == "watermark" for i in r1.selected())
    missed_after = sum(truth[i] == "watermark" for i in r2.selected())
    assert missed_before - missed_after >= 3, (missed_before, missed_after)
    assert r1.config_hash != r2.config_hash  # feedback is part of the key


def test_faults_are_retried_repaired_or_recorded_never_defaulted(tmp_path):
    faults = [
        Fault("rate_limit", sample_ids={"s0"}, retry_after=0.3),
        Fault("server_error", sample_ids={"s1"}, times=2),
        Fault("malformed", sample_ids={"s2"}, times=1),
        Fault("malformed", sample_ids={"s3"}, times=2),
        Fault("refusal", sample_ids={"s4"}),
        Fault("server_error", sample_ids={"s5"}, times=None),
        Fault("delay", sample_ids={"s6"}, delay=1.5),
    ]
    samples = plain_samples(12)
    with SimulatedLMMServer(judge="hash", faults=faults) as server:
        scorer = OpenAICompatibleScorer(cfg(server, timeout=0.5, max_retries=3), tmp_path / "r.jsonl", examples=[])
        t0 = time.perf_counter()
        report = scorer.score_samples(samples)
        elapsed = time.perf_counter() - t0
    res = report.results
    n = server.requests_per_sample
    assert elapsed >= 0.3  # retry-after honoured
    assert res["s0"].ok and n["s0"] == 2
    assert res["s1"].ok and n["s1"] == 3
    assert res["s2"].ok and n["s2"] == 2 and res["s2"].attempts == 2  # repaired once
    assert not res["s3"].ok and res["s3"].error_type == "unparseable" and res["s3"].score is None
    assert "Sure!" in res["s3"].raw and not res["s3"].transient and n["s3"] == 2
    assert not res["s4"].ok and res["s4"].error_type == "refusal" and res["s4"].score is None
    assert not res["s5"].ok and res["s5"].error_type == "server_error" and res["s5"].transient and n["s5"] == 4
    assert res["s6"].ok and n["s6"] == 2  # timed out once, then answered
    assert all(res[f"s{i}"].ok and n[f"s{i}"] == 1 for i in range(7, 12))
    assert set(report.failures()) == {"s3", "s4", "s5"}
    assert not {"s3", "s4", "s5"} & set(report.selected(1))  # failures are never selected
    # a re-run re-sends only the transient failure
    scorer.close()
    with SimulatedLMMServer(judge="hash") as server2:
        scorer2 = OpenAICompatibleScorer(cfg(server2), tmp_path / "r.jsonl", examples=[])
        again = scorer2.score_samples(samples)
    assert set(server2.requests_per_sample) == {"s5"} and again.results["s5"].ok
    assert again.n_cached == 11 and again.n_sent == 1


def test_structured_output_fallbacks(tmp_path):
    samples = plain_samples(3)
    with SimulatedLMMServer(judge="hash", reject_response_format=True, schema_free_style="prose",
                            record_bodies=True) as server:
        scorer = OpenAICompatibleScorer(cfg(server), tmp_path / "r.jsonl", examples=[])
        report = scorer.score_samples(samples)
    assert report.n_ok == 3
    assert scorer._structured == "none"
    assert "response_format" not in server.bodies[-1]


def test_bounded_concurrency_and_progress_bar(tmp_path, capsys):
    samples = plain_samples(24)
    with SimulatedLMMServer(judge="hash", latency=0.05) as server:
        config = cfg(server, concurrency=5, show_progress=True, price_input_per_1m=2.5, price_output_per_1m=10)
        report = OpenAICompatibleScorer(config, tmp_path / "r.jsonl", examples=[]).score_samples(samples)
    assert server.max_in_flight == 5
    err = capsys.readouterr().err
    assert "done=24" in err and "failed=0" in err and "tok=" in err and "$" in err
    assert report.cost == pytest.approx((report.prompt_tokens * 2.5 + report.completion_tokens * 10) / 1e6)
    assert report.cost > 0


@pytest.mark.parametrize("abort_after", [None, 3])
def test_server_dying_mid_run_then_resume_sends_only_what_is_missing(tmp_path, abort_after):
    samples = plain_samples(30)
    store = tmp_path / "r.jsonl"
    with SimulatedLMMServer(judge="hash", latency=0.01, die_after=12) as server:
        config = cfg(server, concurrency=4, max_retries=1, abort_after_failures=abort_after)
        with OpenAICompatibleScorer(config, store, examples=[]) as scorer:
            if abort_after is None:  # every sample is tried and recorded
                first = scorer.score_samples(samples)
                assert first.n_failed == 30 - first.n_ok and all(r.transient for r in first.failures().values())
                assert {r.error_type for r in first.failures().values()} <= {"connection", "timeout"}
            else:  # the run stops early instead of grinding through a dead server
                with pytest.raises(ScorerError, match="3 transient failures in a row"):
                    scorer.score_samples(samples)
            stored = scorer.store.results()
    ok_first = {r.sample_id for r in stored if r.ok}
    assert 0 < len(ok_first) <= 12
    if abort_after is not None:
        assert len(stored) < 30
    with SimulatedLMMServer(judge="hash") as server2:
        second = OpenAICompatibleScorer(cfg(server2), store, examples=[]).score_samples(samples)
    assert second.n_ok == 30
    assert not ok_first & set(server2.requests_per_sample)
    assert sum(server2.requests_per_sample.values()) == 30 - len(ok_first)


def test_sample_id_header_and_summary_failure_raises(tmp_path):
    with SimulatedLMMServer(judge="hash", faults=[Fault("refusal", sample_ids={"__summary__"})]) as server:
        scorer = OpenAICompatibleScorer(cfg(server), tmp_path / "r.jsonl", examples=[])
        scorer.score_samples(plain_samples(2))
        assert set(server.requests_per_sample) == {"s0", "s1"}  # via SAMPLE_ID_HEADER
        with pytest.raises(ScorerError, match="refusal"):
            scorer.summarize_feedback(["watermark text", "watermark text"], round=1)
    assert SAMPLE_ID_HEADER.lower() == "x-product2img-sample-id"


# ----------------------------------------------------------------------------------------------
# Secrets
# ----------------------------------------------------------------------------------------------

CANARY = "sk-canary-7f3c9e21d4b8a6f0e5c2b1a9d8e7f6a5"


def test_api_key_comes_from_env_and_never_reaches_logs_or_files(tmp_path, monkeypatch, capsys):
    from diffusers_product2img.idr.batch import BatchRunner, write_batch_jsonl

    monkeypatch.setenv(KEY_ENV, CANARY)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        samples = plain_samples(4)
        with SimulatedLMMServer(judge="hash", require_api_key=CANARY,
                                faults=[Fault("malformed", sample_ids={"s1"}, times=2)]) as server:
            config = cfg(server, show_progress=True)
            scorer = OpenAICompatibleScorer(config, tmp_path / "r.jsonl", examples=[])
            report = scorer.score_samples(samples)
            assert report.n_ok == 3 and server.auth_headers_seen[0] == f"Bearer {CANARY}"
            runner = BatchRunner(scorer, tmp_path / "batch", poll_interval=0.02)
            runner.run("score", plain_samples(3, prefix="b"), round=1)
            write_batch_jsonl(scorer, "score", plain_samples(3, prefix="o"), tmp_path / "offline.jsonl")
            (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
            scorer.close()
            # a wrong key: the server echoes part of it; nothing of ours does
            monkeypatch.setenv(KEY_ENV, CANARY[::-1])
            with pytest.raises(ScorerAuthError) as info:
                OpenAICompatibleScorer(config, tmp_path / "r2.jsonl", examples=[]).score_samples(samples)
            assert CANARY[::-1][:8] not in str(info.value) and CANARY[::-1][-6:] not in str(info.value)
            assert not (tmp_path / "r2.jsonl").read_text()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    out = capsys.readouterr()
    texts = {"log": log.getvalue(), "stdout": out.out, "stderr": out.err}
    texts |= {str(p): p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()}
    # the check has teeth: DEBUG logs of openai/httpx2 were captured, and every file was written
    assert "Sending HTTP Request" in texts["log"] and "done=" in texts["stderr"]
    assert {"r.jsonl", "batches.json", "offline.jsonl", "config.json"} <= {Path(k).name for k in texts}
    for where, text in texts.items():
        assert CANARY not in text, where
        assert CANARY[8:24] not in text, where
        assert CANARY[::-1] not in text, where


# ----------------------------------------------------------------------------------------------
# kill -9 and resume
# ----------------------------------------------------------------------------------------------

CHILD = """
import sys, types
m = types.ModuleType("diffusers_product2img"); m.__path__ = [{pkg!r}]
sys.modules["diffusers_product2img"] = m  # the idr package only: no torch/diffusers import
from PIL import Image
from diffusers_product2img.idr.scorer import OpenAICompatibleScorer, Sample, ScorerConfig
samples = [Sample(f"s{{i}}", f"Ceramic Coffee Mug {{i}}", Image.new("RGB", (32, 32), (i, 90, 120)))
           for i in range({n})]
config = ScorerConfig(model="sim-lmm", base_url={url!r}, api_key_env={key_env!r}, concurrency={conc},
                      show_progress=False)
report = OpenAICompatibleScorer(config, {store!r}, examples=[]).score_samples(samples)
print("DONE", report.n_ok, report.n_sent, report.n_cached, flush=True)
"""


def _ok_ids(path: Path) -> Counter:
    ids = Counter()
    for line in path.read_bytes().split(b"\n"):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if rec["status"] == "ok":
            ids[rec["sample_id"]] += 1
    return ids


def test_kill_9_mid_run_then_restart_resends_nothing_answered_and_loses_nothing(tmp_path):
    n, conc = 120, 4
    store = tmp_path / "results.jsonl"
    with SimulatedLMMServer(judge="hash", latency=0.05) as server:
        code = CHILD.format(pkg=str(SRC / "diffusers_product2img"), n=n, url=server.base_url, key_env=KEY_ENV,
                            conc=conc, store=str(store))
        script = tmp_path / "child.py"
        script.write_text(textwrap.dedent(code))
        env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
        child = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if store.exists() and store.read_bytes().count(b"\n") >= 20:
                break
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL
        persisted = _ok_ids(store)
        assert 20 <= len(persisted) < n
        time.sleep(0.1)  # let the requests that were in flight reach the server
        sent_before = Counter(server.requests_per_sample)

        out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"DONE {n} ")
        final = _ok_ids(store)

    # nothing lost, nothing doubled in the store
    assert set(final) == {f"s{i}" for i in range(n)} and set(final.values()) == {1}
    # nothing that was answered and persisted was sent again
    for sid in persisted:
        assert server.requests_per_sample[sid] == 1, sid
    # what was sent twice was only what was in flight at the kill (sent, never persisted)
    twice = {sid for sid, c in server.requests_per_sample.items() if c > 1}
    assert twice <= set(sent_before) - set(persisted)
    assert len(twice) <= conc
    assert sum(server.requests_per_sample.values()) <= n + conc


def test_retry_after_header_forms_and_lazy_exports():
    import email.utils

    import httpx2
    import openai

    from diffusers_product2img import idr
    from diffusers_product2img.idr.scorer import _retry_after_seconds

    def err(headers):
        req = httpx2.Request("POST", "http://x/v1/chat/completions")
        return openai.RateLimitError("slow down", response=httpx2.Response(429, headers=headers, request=req),
                                     body=None)

    assert _retry_after_seconds(err({"retry-after": "2.5"})) == 2.5
    assert _retry_after_seconds(err({"retry-after-ms": "150"})) == 0.15
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _retry_after_seconds(err({"retry-after": date})) <= 31
    assert _retry_after_seconds(err({})) is None
    assert idr.OpenAICompatibleScorer is OpenAICompatibleScorer
    assert idr.BatchRunner.__name__ == "BatchRunner" and idr.SimulatedLMMServer is SimulatedLMMServer
