"""Hub-native EPBD: export, load_dataset per config, add a round, and push through a fake HfApi."""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from huggingface_hub import DatasetCard
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from diffusers_product2img.data import export, layout, load_epbd, synth
from diffusers_product2img.data.layout import EPBDLayout, EPBDLayoutError

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory) -> Path:
    root = synth.generate_epbd_synth(tmp_path_factory.mktemp("raw") / "epbd", seed=2, num_train=40,
                                     num_validation=4, num_test=6, num_test_unseen=4)
    layout.write_round_scores(root, 1, synth.ground_truth_scores(root, 1, error_rate=0.1))
    layout.write_round_scores(root, 2, synth.ground_truth_scores(root, 2, error_rate=0.1))
    return root


@pytest.fixture(scope="module")
def exported(raw_root, tmp_path_factory) -> Path:
    return export.export_epbd(raw_root, tmp_path_factory.mktemp("exp") / "epbd", max_shard_size="20KB")


def _load(path, config=None, split=None, tmp=None, **kw):
    return load_epbd(path, config, split=split, cache_dir=str(tmp / "hf_cache"), **kw)


def _tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_layout_and_card(exported, raw_root):
    assert (exported / "README.md").exists() and (exported / "epbd_export.json").exists()
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    train_shards = sorted((exported / "data" / "default").glob("train-*.parquet"))
    assert len(train_shards) > 1  # the 20KB shard limit splits the train split
    n = len(train_shards)
    assert [p.name for p in train_shards] == [f"train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    card = DatasetCard.load(exported / "README.md")
    configs = card.data.configs
    assert [c["config_name"] for c in configs] == ["default", "idr_round_1", "idr_round_2"]
    assert configs[0]["default"] is True
    assert [f["split"] for f in configs[0]["data_files"]] == ["train", "validation", "test", "test_unseen"]
    assert configs[2]["data_files"] == [{"split": "train", "path": "data/idr_round_2/train-*"}]
    assert card.data.pretty_name == "EPBD-synth" and "synthetic" in card.data.tags
    text = card.text
    for needle in ("`cutout` | Image (RGBA)", "`score_round_2`", "`quality`", "| `idr_round_2` | 2 | 4, 4 |",
                   "test_unseen", "load_dataset("):
        assert needle in text, needle
    assert datasets.get_dataset_config_names(str(exported)) == ["default", "idr_round_1", "idr_round_2"]


def test_load_every_config_matches_raw(exported, raw_root, tmp_path):
    lay = EPBDLayout(raw_root)
    ds = _load(exported, tmp=tmp_path)
    assert set(ds) == {"train", "validation", "test", "test_unseen"}
    for split in ds:
        assert ds[split]["id"] == [s.id for s in lay.split_samples(split)]
        assert ds[split]["product_name"] == [s.product_name for s in lay.split_samples(split)]
    feats = ds["train"].features
    assert isinstance(feats["image"], datasets.Image) and feats["cutout"].mode == "RGBA" and feats["mask"].mode == "L"
    assert feats["score_round_2"].dtype == "float64"
    for row in ds["test"].select(range(3)):
        s = lay.by_id[row["id"]]
        np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(Image.open(raw_root / s.image_file)))
        cut = np.asarray(Image.open(raw_root / s.cutout_file))
        np.testing.assert_array_equal(np.asarray(row["cutout"]), cut)
        np.testing.assert_array_equal(np.asarray(row["mask"]), cut[..., 3])
    scores = lay.scores(1)
    assert ds["train"]["score_round_1"] == [scores.get(i) for i in ds["train"]["id"]]
    assert ds["train"]["quality"] == [lay.by_id[i].extra["quality"] for i in ds["train"]["id"]]
    for k in (1, 2):
        kept = _load(exported, f"idr_round_{k}", split="train", tmp=tmp_path)
        assert kept["id"] == layout.kept_ids(raw_root, k)
        assert f"score_round_{k}" in kept.column_names and f"score_round_{k + 1}" not in kept.column_names
    with pytest.raises(EPBDLayoutError, match="raw EPBD folder; export it first"):
        load_epbd(raw_root)


def test_threshold_on_exported_round(exported, raw_root, tmp_path):
    strict = _load(exported, "idr_round_2", split="train", tmp=tmp_path, threshold=5.0)
    assert strict["id"] == layout.kept_ids(raw_root, 2, threshold=5.0)
    with pytest.raises(ValueError, match="looser"):
        _load(exported, "idr_round_2", split="train", tmp=tmp_path, threshold=3.0)
    with pytest.raises(ValueError, match="idr_round_<k> config"):
        _load(exported, None, split="train", tmp=tmp_path, threshold=4.5)


def test_add_round_config_leaves_other_configs_untouched(raw_root, exported, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(raw_root, raw)
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    before = _tree_digest(out / "data")
    layout.write_round_scores(raw, 3, synth.ground_truth_scores(raw, 3, error_rate=0.1))
    assert export.add_round_config(out, raw, 3) == "idr_round_3"
    after = _tree_digest(out / "data")
    assert {k: v for k, v in after.items() if not k.startswith("idr_round_3/")} == before
    assert any(k.startswith("idr_round_3/train-") for k in after)
    assert datasets.get_dataset_config_names(str(out)) == ["default", "idr_round_1", "idr_round_2", "idr_round_3"]
    assert _load(out, "idr_round_3", split="train", tmp=tmp_path)["id"] == layout.kept_ids(raw, 3)
    # a custom threshold is its own config
    name = export.add_round_config(out, raw, 2, threshold=5.0)
    assert name == "idr_round_2_gamma5"
    assert _load(out, name, split="train", tmp=tmp_path)["id"] == layout.kept_ids(raw, 2, threshold=5.0)
    assert "| `idr_round_2_gamma5` | 2 | 5, 5 |" in (out / "README.md").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    with pytest.raises(EPBDLayoutError, match="already exists"):
        export.add_round_config(out, raw, 3)
    with pytest.raises(layout.EPBDMissingScoresError):
        export.add_round_config(out, raw, 4)


def test_add_round_refuses_changed_history_and_other_sources(raw_root, exported, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(raw_root, raw)
    # rewrite round 2 after it was exported: a round 3 would not chain onto the exported round 2
    (raw / "scores" / "round_2.csv").unlink()
    (raw / "scores" / "round_2.json").unlink()
    layout.write_round_scores(raw, 2, {i: 5.0 for i in layout.kept_ids(raw, 1)})
    layout.write_round_scores(raw, 3, {i: 5.0 for i in layout.kept_ids(raw, 2)})
    with pytest.raises(EPBDLayoutError, match="changed since config 'idr_round_2' was exported"):
        export.add_round_config(exported, raw, 3)
    other = synth.generate_epbd_synth(tmp_path / "other", seed=9, num_train=8, num_validation=1, num_test=1,
                                      num_test_unseen=1)
    with pytest.raises(EPBDLayoutError, match="metadata differs"):
        export.add_round_config(exported, other, 1)
    with pytest.raises(EPBDLayoutError, match="not a folder written by export_epbd"):
        export.add_round_config(tmp_path, raw, 1)
    assert datasets.get_dataset_config_names(str(exported)) == ["default", "idr_round_1", "idr_round_2"]


def test_failed_export_writes_nothing(raw_root, exported, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(raw_root, raw)
    (raw / "cutouts" / "test_unseen-00002.png").unlink()
    with pytest.raises(EPBDLayoutError, match="'test_unseen-00002'.*cutout file is missing"):
        export.export_epbd(raw, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
    # overwriting an existing export that fails keeps the old one intact
    out = tmp_path / "existing"
    shutil.copytree(exported, out)
    before = _tree_digest(out)
    with pytest.raises(EPBDLayoutError):
        export.export_epbd(raw, out, overwrite=True)
    assert _tree_digest(out) == before
    with pytest.raises(FileExistsError):
        export.export_epbd(raw_root, out)
    # a round keeping nothing is a clear error, not an unloadable config
    shutil.copy(raw_root / "cutouts" / "test_unseen-00002.png", raw / "cutouts")
    layout.write_round_scores(raw, 3, {i: 1.0 for i in layout.kept_ids(raw, 2)})
    with pytest.raises(EPBDLayoutError, match="IDR round 3 keeps no train sample"):
        export.export_epbd(raw, tmp_path / "out2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "raw"]


class RecordingHfApi:
    """Records the calls of ``HfApi`` that the push makes, and lays the uploaded files out as a repo."""

    def __init__(self, hub_dir: Path):
        self.hub_dir = hub_dir
        self.calls: list[tuple[str, dict]] = []

    def repo_path(self, repo_id: str) -> Path:
        return self.hub_dir / repo_id

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", dict(repo_id=repo_id, token=token, private=private, repo_type=repo_type,
                                               exist_ok=exist_ok, **kwargs)))
        self.repo_path(repo_id).mkdir(parents=True, exist_ok=True)
        return f"https://huggingface.co/datasets/{repo_id}"

    def create_branch(self, repo_id, *, branch, repo_type=None, exist_ok=False, token=None, **kwargs):
        self.calls.append(("create_branch", dict(repo_id=repo_id, branch=branch, repo_type=repo_type, token=token)))

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, revision=None, commit_message=None,
                      allow_patterns=None, ignore_patterns=None, token=None, create_pr=None, **kwargs):
        folder = Path(folder_path)
        files = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file()]
        uploaded = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        self.calls.append(("upload_folder", dict(repo_id=repo_id, repo_type=repo_type, revision=revision,
                                                 commit_message=commit_message, token=token, files=uploaded)))
        for rel in uploaded:
            dst = self.repo_path(repo_id) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / rel, dst)
        return SimpleNamespace(commit_url=f"https://huggingface.co/datasets/{repo_id}/commit/abc")


def test_push_to_hub_round_trip(exported, raw_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    api = RecordingHfApi(tmp_path / "hub")
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    (out / ".tmp-leftover").mkdir()
    (out / ".tmp-leftover" / "junk.parquet").write_bytes(b"x")
    with caplog.at_level(logging.DEBUG):
        result = export.push_epbd_to_hub(out, "me/epbd-synth", api=api, private=True)
    assert result.commit_url.endswith("/commit/abc")
    assert "hf_secret_token_value" not in caplog.text
    (name, create), (name2, upload) = api.calls
    assert name == "create_repo" and create == dict(repo_id="me/epbd-synth", token="hf_secret_token_value",
                                                   private=True, repo_type="dataset", exist_ok=True)
    assert name2 == "upload_folder" and upload["repo_type"] == "dataset" and upload["token"] == "hf_secret_token_value"
    assert "README.md" in upload["files"] and "epbd_export.json" in upload["files"]
    assert not [f for f in upload["files"] if f.startswith(".")]
    repo = api.repo_path("me/epbd-synth")
    for config in ("default", "idr_round_1", "idr_round_2"):
        here = _load(out, config, split="train", tmp=tmp_path)
        there = _load(repo, config, split="train", tmp=tmp_path)
        assert there["id"] == here["id"] and len(there) == len(here)
    # a new round: only its config, the card and the manifest go up
    raw = tmp_path / "raw"
    shutil.copytree(raw_root, raw)
    layout.write_round_scores(raw, 3, synth.ground_truth_scores(raw, 3))
    export.add_round_config(out, raw, 3)
    api.calls.clear()
    export.push_epbd_to_hub(out, "me/epbd-synth", api=api, token="explicit", configs=["idr_round_3"],
                            revision="round-3")
    (_, create), (_, branch), (_, upload) = api.calls
    assert create["token"] == "explicit" and branch == dict(repo_id="me/epbd-synth", branch="round-3",
                                                            repo_type="dataset", token="explicit")
    assert upload["revision"] == "round-3"
    assert sorted(upload["files"]) == sorted(
        ["README.md", "epbd_export.json"] + [f"data/idr_round_3/{p.name}" for p in (out / "data" / "idr_round_3").iterdir()])
    assert _load(repo, "idr_round_3", split="train", tmp=tmp_path)["id"] == layout.kept_ids(raw, 3)
    with pytest.raises(ValueError, match="unknown config"):
        export.push_epbd_to_hub(out, "me/epbd-synth", api=api, configs=["idr_round_9"])
    with pytest.raises(EPBDLayoutError, match="not a folder written by export_epbd"):
        export.push_epbd_to_hub(raw, "me/epbd-synth", api=api)


def test_export_and_push_commands(raw_root, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from diffusers_product2img.data.commands import register_commands

    parser = argparse.ArgumentParser()
    register_commands(parser.add_subparsers(dest="command"))

    def run(*argv):
        args = parser.parse_args(list(map(str, argv)))
        return args.func(args)

    out = tmp_path / "exp"
    assert run("dataset-export", raw_root, out, "--rounds", "1") == 0
    assert datasets.get_dataset_config_names(str(out)) == ["default", "idr_round_1"]
    assert run("dataset-export", raw_root, out, "--add-round", "2") == 0
    assert datasets.get_dataset_config_names(str(out)) == ["default", "idr_round_1", "idr_round_2"]
    assert run("dataset-export", raw_root, out) == 2
    assert "exists" in capsys.readouterr().err
    assert run("dataset-export", raw_root, out, "--add-round", "7") == 2
    assert "IDR round 7 has no scores yet" in capsys.readouterr().err
    fake = RecordingHfApi(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: fake)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert run("dataset-push", out, "me/epbd", "--private") == 0
    assert fake.calls[0][1]["private"] is True and fake.calls[0][1]["token"] is None
    assert "pushed" in capsys.readouterr().out
