"""IDR-LMM rounds (Algorithm 1): the simulated LMM over the real openai client, EPBD-synth, the real
tiny pipeline for validation outputs, and a recording fake of the Hub API."""

import json
import shutil

import numpy as np
import pytest
import torch

from diffusers_product2img import Product2ImgPipeline
from diffusers_product2img.data.layout import EPBDLayout
from diffusers_product2img.data.synth import generate_epbd_synth
from diffusers_product2img.idr.hub import PublishError, RoundPublisher
from diffusers_product2img.idr.rounds import IDRConfig, data_size_plot, parse_round_steps, run_idr
from diffusers_product2img.idr.scorer import OpenAICompatibleScorer, ScorerConfig
from diffusers_product2img.idr.simulated_lmm import SimulatedLMMServer

CANARY_KEY = "sk-canary-0123456789abcdef"
CANARY_TOKEN = "hf_canary_token_fedcba9876543210"


@pytest.fixture()
def synth_root(tmp_path):
    return generate_epbd_synth(tmp_path / "epbd", seed=3, num_train=60, num_validation=4, num_test=0,
                               num_test_unseen=0, num_unseen_categories=0)


class RecordingTrainer:
    """Stands in for the training script: copies the previous model and records what it was given."""

    def __init__(self, base_dir, fail_on_round=None):
        self.base_dir, self.fail_on_round, self.calls = base_dir, fail_on_round, []

    def __call__(self, round_index, kept_ids, init_model, steps, output_dir):
        if round_index == self.fail_on_round:
            raise KeyboardInterrupt("killed during training")
        self.calls.append({"round": round_index, "kept": list(kept_ids), "init": init_model, "steps": steps})
        shutil.copytree(init_model or self.base_dir, output_dir, dirs_exist_ok=True)
        return output_dir


class FakeHubApi:
    """Records create_repo / create_branch / upload_folder calls; can fail the first N uploads."""

    def __init__(self, fail_uploads=0):
        self.calls, self.fail_uploads = [], fail_uploads
        self.branches = {}

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False, **kw):
        self.calls.append(("create_repo", repo_id, repo_type))

    def create_branch(self, repo_id, branch, repo_type=None, exist_ok=False, **kw):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, repo_type=None, revision=None, commit_message=None, **kw):
        if self.fail_uploads:
            self.fail_uploads -= 1
            raise ConnectionError("hub unreachable")
        files = sorted(p.relative_to(folder_path).as_posix() for p in __import__("pathlib").Path(folder_path).rglob("*") if p.is_file())
        self.branches.setdefault((repo_id, revision), []).append(files)
        self.calls.append(("upload_folder", repo_id, revision, commit_message))


def make_validation_generator(root):
    lay = EPBDLayout(root)

    def generate(model_dir, samples):
        from PIL import Image

        pipe = Product2ImgPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        cutouts = [Image.open(lay.root / s.cutout_file) for s in samples]
        out = pipe([s.product_name for s in samples], cutouts, height=64, width=64, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0))
        return out.images

    return generate


def test_three_rounds_chain_feedback_and_resume(synth_root, tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY_KEY)
    work = tmp_path / "idr"
    config = IDRConfig(rounds=3, round_steps=(30, 10, 10))
    with SimulatedLMMServer(require_api_key=CANARY_KEY) as server:
        scorer_cfg = ScorerConfig(model="sim-lmm", base_url=server.base_url, show_progress=False)
        trainer = RecordingTrainer(tiny_pipeline_dir, fail_on_round=2)
        with OpenAICompatibleScorer(scorer_cfg, store=work / "lmm_results.jsonl") as scorer:
            with pytest.raises(KeyboardInterrupt):
                run_idr(config, data_root=synth_root, scorer=scorer, train_round=trainer,
                        generate_validation=make_validation_generator(synth_root), work_dir=work)
        requests_before = server.chat_requests
        assert [c["round"] for c in trainer.calls] == [1]

        # resume: round 1 is not redone, no answered LMM request is re-sent
        trainer.fail_on_round = None
        with OpenAICompatibleScorer(scorer_cfg, store=work / "lmm_results.jsonl") as scorer:
            state = run_idr(config, data_root=synth_root, scorer=scorer, train_round=trainer,
                            generate_validation=make_validation_generator(synth_root), work_dir=work)
        assert [c["round"] for c in trainer.calls] == [1, 2, 3]
        lay = EPBDLayout(synth_root)
        round2_candidates = len(lay.kept_ids(1))
        # after the restart only round 2's and 3's requests went out (round-2 scores, feedback, summaries)
        assert server.chat_requests - requests_before <= round2_candidates + len(lay.kept_ids(2)) + 2 * (4 + 1)

    # chaining: each round scores what the previous round kept, trains from the previous model
    assert [c["steps"] for c in trainer.calls] == [30, 10, 10]
    assert trainer.calls[0]["init"] is None
    assert trainer.calls[1]["init"] == state.rounds[1].model_dir
    assert trainer.calls[2]["init"] == state.rounds[2].model_dir
    sizes = [len(lay.kept_ids(k)) for k in range(4)]
    assert sizes[0] == 60 and sizes[0] >= sizes[1] >= sizes[2] >= sizes[3] > 0
    for k in (1, 2, 3):
        assert sorted(trainer.calls[k - 1]["kept"]) == sorted(lay.kept_ids(k))
        assert state.rounds[k].candidates == sizes[k - 1] and state.rounds[k].kept == sizes[k]
        assert sum(state.rounds[k].score_histogram.values()) == sizes[k - 1] - state.rounds[k].failed
    # f_{i-1} is what round i's selection used, and it is a real summary from round i-1's evaluation
    assert state.rounds[1].feedback_used is None
    assert state.rounds[2].feedback_used == state.rounds[1].feedback and state.rounds[1].feedback
    assert state.rounds[3].feedback_used == state.rounds[2].feedback
    # validation images were written for each round
    assert len(list((work / "round-3" / "validation").glob("*.png"))) == 4

    # selection removes planted low-quality samples: their share falls round by round
    quality = {s.id: s.extra["quality"] for s in lay.samples}
    bad_share = [np.mean([quality[i] != "good" for i in lay.kept_ids(k)]) for k in range(4)]
    assert bad_share[1] < bad_share[0] and bad_share[3] <= bad_share[1]

    # Figure 8 plot and no secret anywhere on disk
    plot = data_size_plot(state, work / "rounds.png", total_train=60)
    assert plot.stat().st_size > 1000
    for path in list(work.rglob("*.json")) + list(work.rglob("*.jsonl")) + list((synth_root / "scores").iterdir()):
        assert CANARY_KEY not in path.read_text(errors="ignore")


def test_changed_settings_refuse_to_resume(synth_root, tiny_pipeline_dir, tmp_path):
    work = tmp_path / "idr"
    work.mkdir()
    (work / "idr_state.json").write_text(json.dumps({"config": {"rounds": 2}, "rounds": {}}))
    with pytest.raises(ValueError, match="different IDR settings"):
        run_idr(IDRConfig(rounds=3), data_root=synth_root, scorer=None, train_round=None,
                generate_validation=None, work_dir=work)
    with pytest.raises(ValueError, match="round_steps has 2 entries"):
        IDRConfig(rounds=3, round_steps=(1, 2))
    assert parse_round_steps("3000,1000,1000") == (3000, 1000, 1000)


def test_publisher_branches_retries_and_keeps_local(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY_TOKEN)
    api = FakeHubApi(fail_uploads=1)
    waits = []
    pub = RoundPublisher("me/product2img", api=api, retries=3, backoff=0.5, sleep=waits.append)
    assert pub.publish_model(1, tiny_pipeline_dir) == "round-1"
    assert waits == [0.5]  # the failed upload was retried after a backoff
    pub.publish_model(2, tiny_pipeline_dir)
    uploads = [c for c in api.calls if c[0] == "upload_folder"]
    assert [(c[2]) for c in uploads] == ["round-1", "main", "round-2", "main"]
    assert ("create_branch", "me/product2img", "round-2") in api.calls
    files = api.branches[("me/product2img", "round-2")][0]
    assert "model_index.json" in files and "learned_embeds.safetensors" in files and "pipeline.py" in files
    assert not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files)

    down = FakeHubApi(fail_uploads=10)
    pub = RoundPublisher("me/product2img", api=down, retries=2, backoff=0.0, sleep=lambda s: None)
    with pytest.raises(PublishError, match="after 2 attempts"):
        pub.publish_model(3, tiny_pipeline_dir)
    assert (tiny_pipeline_dir and (__import__("pathlib").Path(tiny_pipeline_dir) / "model_index.json").exists())
    with pytest.raises(PublishError, match="not a complete pipeline folder"):
        pub.publish_model(3, tmp_path)
