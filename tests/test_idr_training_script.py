"""`examples/train_product2img.py --idr_rounds ...`: Algorithm 1 end to end through the training script,
the simulated LMM (real openai client on 127.0.0.1), EPBD export configs, and a recording fake Hub."""

import fnmatch
import json
from pathlib import Path

import pytest
from _training_helpers import base_args, load_train_script, make_epbd_synth
from datasets import load_dataset

from diffusers_product2img import Product2ImgPipeline
from diffusers_product2img.data.layout import EPBDLayout
from diffusers_product2img.idr.simulated_lmm import SimulatedLMMServer

CANARY_KEY = "sk-canary-idr-0123456789"
CANARY_TOKEN = "hf_canaryIDRtoken987654321"



class RecordingHubApi:
    """A fake ``huggingface_hub.HfApi``: records repos, branches and the files each upload would send."""

    instances: list = []

    def __init__(self, token=None, **kwargs):
        self.token, self.calls, self.uploads = token, [], []
        RecordingHubApi.instances.append(self)

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False, **kw):
        self.calls.append(("create_repo", repo_id, repo_type or "model"))

    def create_branch(self, repo_id, branch, repo_type=None, exist_ok=False, **kw):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, repo_type=None, revision=None, commit_message=None,
                      allow_patterns=None, ignore_patterns=None, **kw):
        files = []
        for p in sorted(Path(folder_path).rglob("*")):
            rel = p.relative_to(folder_path).as_posix()
            if not p.is_file() or any(fnmatch.fnmatch(rel, pat) for pat in ignore_patterns or []):
                continue
            if allow_patterns and not any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                continue
            files.append((rel, p.read_bytes()))
        self.uploads.append({"repo": repo_id, "type": repo_type or "model", "revision": revision or "main",
                             "files": files})


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from diffusers_product2img.testing import save_tiny_clip_model

    return save_tiny_clip_model(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_idr_rounds_through_the_training_script(tiny_inpainting_dir, clip_dir, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("OPENAI_API_KEY", CANARY_KEY)
    monkeypatch.setenv("HF_TOKEN", CANARY_TOKEN)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHubApi)
    RecordingHubApi.instances.clear()
    script = load_train_script()
    raw = make_epbd_synth(tmp_path / "epbd", num_train=24)
    out = tmp_path / "idr-run"
    with SimulatedLMMServer(require_api_key=CANARY_KEY) as server:
        args = script.parse_args(base_args(
            tiny_inpainting_dir, clip_dir, out, "--train_data_dir", raw, "--cache_dir", tmp_path / "cache",
            "--idr_rounds", 2, "--round_steps", "2,1", "--lmm_model", "sim-lmm", "--lmm_base_url", server.base_url,
            "--num_validation_products", 2, "--validation_inference_steps", 2, "--use_feature_cache",
            "--push_to_hub", "--hub_model_id", "me/product2img", "--hub_dataset_id", "me/epbd",
        ))
        final = script.main(args)
        assert server.requests_per_kind["score"] >= 24 and server.requests_per_kind["summary"] == 2

    # the final model is round 2's, a complete pipeline with its IDR card section
    assert Path(final) == out / "round-2" / "model"
    pipe = Product2ImgPipeline.from_pretrained(final)
    assert pipe.background_token == "<background>"
    card = (Path(final) / "README.md").read_text()
    assert "## IDR-LMM round 2" in card and "Feedback used to sharpen" in card
    state = json.loads((out / "idr_state.json").read_text())
    assert state["rounds"]["2"]["feedback_used"] == state["rounds"]["1"]["feedback"]
    assert (out / "idr_rounds.png").stat().st_size > 0 and json.loads((out / "idr_rounds.json").read_text())[1]["round"] == 2

    # round 2 trained on what round 2 kept, which is a subset of round 1's
    lay = EPBDLayout(raw)
    kept1, kept2 = set(lay.kept_ids(1)), set(lay.kept_ids(2))
    assert kept2 <= kept1 < {s.id for s in lay.split_samples("train")}
    assert set((out / "round-2" / "model" / "train_ids.txt").read_text().split()) == kept2

    # the export gained one config per round; load_dataset reads them with no remote code
    export = Path(json.loads((out / "idr_state.json").read_text())["rounds"]["2"]["extra"]["export_dir"])
    for k, kept in ((1, kept1), (2, kept2)):
        ds = load_dataset(str(export), f"idr_round_{k}", split="train")
        assert sorted(ds["id"]) == sorted(kept)

    # the Hub: branch per round, main = latest, dataset configs pushed; no checkpoints, no secrets
    api = RecordingHubApi.instances[-1]
    model_uploads = [(u["revision"]) for u in api.uploads if u["type"] == "model"]
    assert model_uploads == ["round-1", "main", "round-2", "main"]
    assert ("create_branch", "me/product2img", "round-2") in api.calls
    dataset_uploads = [u for u in api.uploads if u["type"] == "dataset"]
    assert {f for u in dataset_uploads for f, _ in u["files"] if f.startswith("data/idr_round_")}
    for upload in api.uploads:
        names = [f for f, _ in upload["files"]]
        assert not any(n.startswith("checkpoint-") or n.endswith((".bin", ".pt", ".pkl")) for n, _ in upload["files"])
        if upload["type"] == "model":
            assert "model_index.json" in names and "README.md" in names
        for _, data in upload["files"]:
            assert CANARY_KEY.encode() not in data and CANARY_TOKEN.encode() not in data
    for path in out.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert CANARY_KEY.encode() not in blob and CANARY_TOKEN.encode() not in blob, path


def test_no_idr_control_trains_the_total_steps(tiny_inpainting_dir, clip_dir, tmp_path):
    script = load_train_script()
    raw = make_epbd_synth(tmp_path / "epbd", num_train=8)
    args = script.parse_args(base_args(tiny_inpainting_dir, clip_dir, tmp_path / "out", "--train_data_dir", raw,
                                       "--cache_dir", tmp_path / "cache", "--no_idr", "--round_steps", "2,1,1"))
    script.main(args)
    assert args.max_train_steps == 4
    assert Product2ImgPipeline.from_pretrained(tmp_path / "out") is not None


def test_idr_flags_are_checked(tiny_inpainting_dir, clip_dir, tmp_path, capsys):
    script = load_train_script()
    common = base_args(tiny_inpainting_dir, clip_dir, tmp_path / "o")
    for extra, message in [
        (["--idr_rounds", "3"], "--idr_rounds needs --lmm_model"),
        (["--idr_rounds", "3", "--lmm_model", "m", "--round_steps", "5,5"], "--round_steps"),
        (["--idr_rounds", "1", "--no_idr", "--lmm_model", "m"], "--no_idr is the control run"),
    ]:
        with pytest.raises(SystemExit):
            script.parse_args(common + extra)
        assert message in capsys.readouterr().err
    args = script.parse_args(common + ["--idr_rounds", "2", "--lmm_model", "m", "--round_steps", "3",
                                       "--train_data_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="raw EPBD folder"):
        script.run_idr_training(args)
