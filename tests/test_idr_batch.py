"""Batch API and offline (``vllm run-batch``) modes of the IDR-LMM scorer, on the simulated LMM."""

from __future__ import annotations

import json
import random

import openai
import pytest
from PIL import Image

from diffusers_product2img.idr.batch import BatchRunner, import_batch_output, read_jsonl, write_batch_jsonl
from diffusers_product2img.idr.scorer import OpenAICompatibleScorer, Sample, ScorerConfig, make_key
from diffusers_product2img.idr.simulated_lmm import Fault, SimulatedLMMServer

KEY_ENV = "P2I_TEST_LMM_KEY"


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def samples(n, prefix="s"):
    return [Sample(f"{prefix}{i}", f"Ceramic Coffee Mug {i}", Image.new("RGB", (24, 24), (i, 40, 200)))
            for i in range(n)]


def scorer_for(server, path, **kw):
    config = ScorerConfig(model="sim-lmm", base_url=server.base_url, api_key_env=KEY_ENV, show_progress=False,
                          backoff_initial=0.01, max_retries=2, **kw)
    return OpenAICompatibleScorer(config, path, examples=[])


def test_offline_jsonl_is_the_online_request_and_shards(tmp_path):
    items = samples(10)
    with SimulatedLMMServer(judge="hash", record_bodies=True) as server:
        scorer = scorer_for(server, tmp_path / "r.jsonl")
        scorer.score_samples(items[:1])
        paths = write_batch_jsonl(scorer, "score", items, tmp_path / "req.jsonl", max_requests_per_file=4)
    assert [p.name for p in paths] == ["req-00001.jsonl", "req-00002.jsonl", "req-00003.jsonl"]
    lines = [line for p in paths for line in read_jsonl(p)]
    assert len(lines) == 9  # s0 is answered already
    chash = scorer.config_hash("score")
    assert [x["custom_id"] for x in lines] == [make_key("score", 1, f"s{i}", chash) for i in range(1, 10)]
    assert all(x["method"] == "POST" and x["url"] == "/v1/chat/completions" for x in lines)
    # the body is exactly what the online scorer sends
    online = server.bodies[0]
    assert json.loads(json.dumps(scorer.request_body("score", scorer.build_messages("score", items[0])))) == online
    assert lines[0]["body"]["response_format"] == online["response_format"]
    one = len(paths[0].read_bytes().splitlines()[0])
    assert len(write_batch_jsonl(scorer, "score", items, tmp_path / "b.jsonl", max_bytes_per_file=2 * one + 10)) == 5
    with pytest.raises(ValueError, match="larger"):
        write_batch_jsonl(scorer, "score", items, tmp_path / "c.jsonl", max_bytes_per_file=100)


def test_offline_import_joins_unordered_output_and_keeps_exactly_once(tmp_path):
    items = samples(8)
    with SimulatedLMMServer(judge="hash", faults=[Fault("malformed", sample_ids={"s2"})]) as server:
        scorer = scorer_for(server, tmp_path / "r.jsonl")
        (path,) = write_batch_jsonl(scorer, "score", items, tmp_path / "req.jsonl")
        # what `vllm run-batch -i req.jsonl -o out.jsonl` does, with the simulated model behind it
        out = []
        for line in read_jsonl(path):
            sid = line["custom_id"].rsplit(":", 1)[1]
            if sid == "s7":
                continue  # lost
            status, body, _ = server.chat(line["body"], sid, 0.0)
            if sid == "s3":
                status, body = 500, {"error": {"message": "engine crashed"}}
            out.append({"id": f"vllm-{sid}", "custom_id": line["custom_id"],
                        "response": {"status_code": status, "request_id": sid, "body": body}, "error": None})
        random.Random(0).shuffle(out)
        (tmp_path / "out.jsonl").write_text("".join(json.dumps(x) + "\n" for x in out))
        expected = [x["custom_id"] for x in read_jsonl(path)]
        written = import_batch_output(scorer, tmp_path / "out.jsonl", expected=expected)
        assert len(written) == 8
        res = {r.sample_id: r for r in scorer.store.results()}
        assert all(res[f"s{i}"].ok and res[f"s{i}"].source == "offline" for i in (0, 1, 4, 5, 6))
        assert res["s2"].error_type == "unparseable" and not res["s2"].transient
        assert res["s3"].error_type == "batch_error" and res["s3"].transient
        assert res["s7"].error_type == "batch_error" and res["s7"].transient
        # importing the same file again changes nothing
        assert import_batch_output(scorer, tmp_path / "out.jsonl") == {}
        # the next offline file and the online scorer only carry what is still missing
        (again,) = write_batch_jsonl(scorer, "score", items, tmp_path / "req2.jsonl")
        assert {x["custom_id"].rsplit(":", 1)[1] for x in read_jsonl(again)} == {"s3", "s7"}
        server.reset_stats()
        report = scorer.score_samples(items)
        assert set(server.requests_per_sample) == {"s3", "s7"} and report.n_failed == 1  # s2 stays failed


def test_batch_api_run_repairs_online_retries_errors_and_costs_half(tmp_path):
    items = samples(11)
    faults = [Fault("malformed", sample_ids={"s5"}), Fault("server_error", sample_ids={"s6"})]
    with SimulatedLMMServer(judge="hash", faults=faults) as server:
        scorer = scorer_for(server, tmp_path / "r.jsonl", price_input_per_1m=2.0, price_output_per_1m=8.0)
        scorer.score_samples(items[:3])  # some answered online first
        runner = BatchRunner(scorer, tmp_path / "batch", poll_interval=0.02, max_requests_per_file=5)
        report = runner.run("score", items)
        assert len(server.batches) == 2  # 8 requests in shards of <= 5
        res = report.results
        assert report.n_cached == 3 and report.n_ok == 10 and set(report.failures()) == {"s6"}
        assert res["s5"].ok and res["s5"].source == "batch+repair" and server.requests_per_sample["s5"] == 2
        assert res["s6"].error_type == "batch_error" and res["s6"].transient
        assert all(server.requests_per_sample[f"s{i}"] == 1 for i in (0, 1, 2, 3, 4, 7, 8, 9, 10))
        online, batch = res["s0"], res["s7"]
        assert batch.source == "batch" and batch.cost == pytest.approx(0.5 * scorer.config.cost(
            batch.prompt_tokens, batch.completion_tokens))
        assert online.cost == pytest.approx(scorer.config.cost(online.prompt_tokens, online.completion_tokens))
        # a second run submits one batch with only the transient failure
        again = runner.run("score", items)
        assert len(server.batches) == 3 and again.n_ok == 11
        assert sorted(b["request_counts"]["total"] for b in server.batches.values()) == [1, 3, 5]
        assert server.requests_per_sample["s6"] == 2


def test_batch_resume_after_a_crash_never_submits_twice(tmp_path):
    items = samples(6)
    with SimulatedLMMServer(judge="hash", batch_latency=0.01) as server:
        scorer = scorer_for(server, tmp_path / "r.jsonl")
        runner = BatchRunner(scorer, tmp_path / "batch", poll_interval=0.02)
        (name,) = runner.prepare("score", items)
        runner.submit(name)
        del runner  # the process dies while the batch runs
        runner2 = BatchRunner(scorer, tmp_path / "batch", poll_interval=0.02)
        report = runner2.run("score", items)
        assert len(server.batches) == 1 and report.n_ok == 6
        assert set(server.requests_per_sample.values()) == {1}

        # a crash between batches.create and writing the state: the batch is found, not re-created
        more = samples(3, prefix="m")
        (name,) = runner2.prepare("score", more)
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        with open(tmp_path / "batch" / name, "rb") as f:
            file_id = client.files.create(file=(name, f), purpose="batch").id
        runner2.state[name]["file_id"] = file_id
        created = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        assert runner2.submit(name) == created.id
        assert len(server.batches) == 2
        assert runner2.run("score", more).n_ok == 3
        state = json.loads((tmp_path / "batch" / "batches.json").read_text())
        assert all(s["collected"] for s in state.values())
