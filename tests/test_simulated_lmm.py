"""The simulated LMM: its pixel judge on EPBD-synth, request kinds, and its HTTP surface."""

from __future__ import annotations

import threading

import numpy as np
import openai
import pytest
from PIL import Image

from diffusers_product2img.data import synth
from diffusers_product2img.idr.scorer import OpenAICompatibleScorer, PromptSet, Sample, ScorerConfig
from diffusers_product2img.idr.simulated_lmm import (
    DEFECT_PHRASES,
    Fault,
    PixelJudge,
    SimulatedLMMServer,
    defects_named_in,
    main,
    request_kind,
    summarize_feedback_items,
)


def _sample(category, quality, i, seed=3):
    s = synth.render_sample(category, quality, seed=(seed, 0, i), resolution=64)
    return s, s["cutout"][..., 3].astype(np.float32) / 255.0


def test_request_kind_by_schema_marker_and_keywords():
    p = PromptSet.default()
    for kind in ("score", "feedback", "summary"):
        body = {"response_format": {"type": "json_schema", "json_schema": {"name": f"product2img_{kind}"}},
                "messages": [{"role": "system", "content": "anything"}]}
        assert request_kind(body) == kind
    for kind, text in (("score", p.render("score")), ("feedback", p.render("feedback")),
                       ("summary", p.render("summary"))):
        assert request_kind({"messages": [{"role": "system", "content": text}]}) == kind
    # user-written templates without the marker line
    sys_ = lambda t: {"messages": [{"role": "system", "content": t}]}  # noqa: E731
    assert request_kind(sys_("Summarise the notes below.")) == "summary"
    assert request_kind(sys_("Describe problems of this generated image.")) == "feedback"
    assert request_kind(sys_("Give this product photo a score from 1 to 5.")) == "score"


def test_defect_phrases_round_trip_and_summary_counts():
    for kind, phrase in DEFECT_PHRASES.items():
        assert defects_named_in(phrase) == {kind}
    assert defects_named_in("no problems: clean background that fits the product") == set()
    items = [DEFECT_PHRASES["watermark"]] * 5 + [DEFECT_PHRASES["clutter"]] * 2 + [DEFECT_PHRASES["plain_white"]]
    items += ["no problems"] * 4
    summary = summarize_feedback_items(items)
    assert summary.index("watermark") < summary.index("clutter")
    assert "5 of 12" in summary and "2 of 12" in summary and "plain white" not in summary  # seen once
    assert summarize_feedback_items(["no problems"] * 3).startswith("No recurring problems")


def test_category_is_inferred_from_synth_product_names():
    judge = PixelJudge()
    hits = total = 0
    for cat in synth.CATEGORIES:
        for i in range(6):
            name = synth.render_sample(cat, "good", seed=(0, 0, i), resolution=16)["product_name"]
            hits += judge.infer_category(name, None) == cat
            total += 1
    assert hits == total
    assert judge.infer_category("anything", "dumbbell") == "dumbbell"


def test_pixel_judge_scores_misses_and_improves_with_feedback():
    judge = PixelJudge(seed=0, miss_prob=0.4, miss_prob_named=0.05)
    cats = synth.TRAIN_CATEGORIES
    good = []
    for i in range(24):
        s, mask = _sample(cats[i % 12], "good", i)
        good.append(judge.score(Image.fromarray(s["image"]), mask, f"g{i}", s["product_name"], None, None))
    assert all(j.score >= 4 and not j.perceived and not j.present for j in good)
    for quality in ("watermark", "plain_white", "clutter", "wrong_scene"):
        before, after, n_present = 0, 0, 0
        for i in range(40):
            s, mask = _sample(cats[i % 12], quality, i)
            img, name = Image.fromarray(s["image"]), s["product_name"]
            j0 = judge.score(img, mask, f"{quality}{i}", name, None, None)
            j1 = judge.score(img, mask, f"{quality}{i}", name, None, DEFECT_PHRASES[quality])
            assert set(j0.perceived) <= set(j1.perceived)  # feedback never makes it worse
            if quality in j0.present:
                n_present += 1
                before += quality in j0.perceived
                after += quality in j1.perceived
            if j0.perceived:
                assert j0.score <= 3
        assert n_present >= 30, quality  # synth's detectors find most planted defects
        assert 0.4 <= before / n_present <= 0.8, (quality, before / n_present)  # misses ~40%
        assert after / n_present >= 0.9, (quality, after / n_present)  # misses ~5% once named


def _client(server, key="x"):
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=5)


def test_http_surface_models_auth_usage_files_and_death():
    with SimulatedLMMServer(judge="hash", require_api_key="sk-right-key-123456") as server:
        with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
            _client(server, "sk-wrong-key-654321").models.list()
        client = _client(server, "sk-right-key-123456")
        assert [m.id for m in client.models.list().data] == ["sim-lmm"]
        url = f"data:image/png;base64,{__import__('base64').b64encode(_png()).decode()}"
        resp = client.chat.completions.create(model="sim-lmm", messages=[
            {"role": "system", "content": PromptSet.default().render("score")},
            {"role": "user", "content": [{"type": "text", "text": "Product name: Mug"},
                                         {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}])
        assert resp.usage.prompt_tokens > 85 and resp.usage.completion_tokens > 0
        assert '"score"' in resp.choices[0].message.content
        f = client.files.create(file=("in.jsonl", b'{"a": 1}\n'), purpose="batch")
        assert client.files.content(f.id).content == b'{"a": 1}\n' and f.bytes == 9
    with SimulatedLMMServer(judge="hash", die_after=1) as server:
        client = _client(server)
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        client.chat.completions.create(model="m", messages=msgs)
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(model="m", messages=msgs)
        with pytest.raises(openai.APIConnectionError):  # and it stays down
            client.chat.completions.create(model="m", messages=msgs)


def _png():
    import io

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_fault_rules_fire_as_configured(tmp_path):
    faults = [Fault("server_error", sample_ids={"a"}, times=2), Fault("rate_limit", probability=0.0, times=None)]
    with SimulatedLMMServer(judge="hash", faults=faults) as server:
        config = ScorerConfig(model="sim-lmm", base_url=server.base_url, api_key_env="P2I_UNSET_KEY",
                              backoff_initial=0.01, max_retries=3, show_progress=False)
        samples = [Sample(i, "Mug", Image.new("RGB", (8, 8))) for i in ("a", "b")]
        with OpenAICompatibleScorer(config, tmp_path / "r.jsonl", examples=[]) as scorer:
            assert scorer.score_samples(samples).n_ok == 2
    assert server.requests_per_sample == {"a": 3, "b": 1}
    assert server.status_counts[500] == 2 and server.status_counts[429] == 0
    with pytest.raises(ValueError):
        Fault("explode")


def test_module_main_starts_a_server():
    seen = {}

    def ready(server):
        seen["url"] = server.base_url
        seen["models"] = [m.id for m in _client(server).models.list().data]
        threading.Thread(target=server.stop).start()

    main(["--port", "0", "--latency", "0.01", "--judge", "hash", "--error-prob", "0.5"], ready=ready)
    assert seen["url"].startswith("http://127.0.0.1:") and seen["models"] == ["sim-lmm"]
