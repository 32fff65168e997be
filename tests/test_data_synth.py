"""EPBD-synth (issue #3): schema, planted defects, determinism, and the fixed procedural judges."""

from __future__ import annotations

import argparse
import csv
import filecmp
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusers_product2img.data import synth
from diffusers_product2img.data.layout import EPBDLayout

SMALL = dict(seed=3, num_train=80, num_validation=8, num_test=16, num_test_unseen=8)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    return synth.generate_epbd_synth(tmp_path_factory.mktemp("synth") / "epbd", **SMALL)


def _rows(root: Path) -> list[dict]:
    with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_schema_splits_and_files(synth_root):
    rows = _rows(synth_root)
    assert list(rows[0]) == ["id", "product_name", "category", "split", "quality", "scene"]
    counts = Counter(r["split"] for r in rows)
    assert counts == {"train": 80, "validation": 8, "test": 16, "test_unseen": 8}
    assert len({r["id"] for r in rows}) == len(rows)
    train_cats = {r["category"] for r in rows if r["split"] == "train"}
    unseen_cats = {r["category"] for r in rows if r["split"] == "test_unseen"}
    assert train_cats == set(synth.TRAIN_CATEGORIES) and unseen_cats == set(synth.UNSEEN_CATEGORIES)
    # every unseen category's scene is seen in training (generalisation is possible)
    assert {synth.category_scene(c) for c in unseen_cats} <= {synth.category_scene(c) for c in train_cats}
    info = json.loads((synth_root / "epbd.json").read_text())
    assert info["resolution"] == 64 and info["synthetic"] is True
    for r in rows[:20]:
        image = Image.open(synth_root / "images" / f"{r['id']}.png")
        cutout = Image.open(synth_root / "cutouts" / f"{r['id']}.png")
        assert image.mode == "RGB" and image.size == (64, 64)
        assert cutout.mode == "RGBA" and cutout.size == (64, 64)
        alpha = np.asarray(cutout)[..., 3]
        assert 0.02 < (alpha > 127).mean() < 0.4  # a product, not the whole canvas
        # the cutout is cut out of the image: identical pixels where the product is opaque
        opaque = alpha == 255
        np.testing.assert_array_equal(np.asarray(cutout)[..., :3][opaque], np.asarray(image)[opaque])
    assert not (synth_root / "masks").exists()  # derived from alpha by default
    EPBDLayout(synth_root).validate_files()


def test_planted_low_quality_rate_and_ground_truth(synth_root):
    rows = _rows(synth_root)
    train = [r for r in rows if r["split"] == "train"]
    bad = [r for r in train if r["quality"] != "good"]
    assert len(bad) == round(0.3 * len(train))
    assert Counter(r["quality"] for r in bad) == {k: 6 for k in synth.DEFECT_KINDS}
    assert all(r["quality"] == "good" for r in rows if r["split"] != "train")
    for r in rows:
        if r["quality"] == "good":
            assert r["scene"] == synth.category_scene(r["category"])
        elif r["quality"] == "wrong_scene":
            assert r["scene"] in synth.SCENES and r["scene"] != synth.category_scene(r["category"])
        elif r["quality"] == "plain_white":
            assert r["scene"] == "plain_white"


def test_product_names_read_like_listings(synth_root):
    for r in _rows(synth_root):
        spec = synth.CATEGORIES[r["category"]]
        name = r["product_name"]
        assert any(noun in name for noun in spec.nouns), name
        assert any(word in name for word, _ in spec.colors), name
        assert any(brand in name for brand in synth._BRANDS), name
        assert 3 <= len(name.split()) <= 16


def test_deterministic_from_seed(tmp_path):
    kw = dict(num_train=12, num_validation=2, num_test=2, num_test_unseen=2)
    a = synth.generate_epbd_synth(tmp_path / "a", seed=7, **kw)
    b = synth.generate_epbd_synth(tmp_path / "b", seed=7, **kw)
    c = synth.generate_epbd_synth(tmp_path / "c", seed=8, **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors and len(match) == len(files)
    assert (a / "metadata.csv").read_bytes() != (c / "metadata.csv").read_bytes()
    # no temporary folder is left next to the outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_parallel_workers_write_the_same_bytes(tmp_path):
    kw = dict(seed=4, resolution=32, num_train=70, num_validation=2, num_test=2, num_test_unseen=2)
    a = synth.generate_epbd_synth(tmp_path / "a", **kw)
    b = synth.generate_epbd_synth(tmp_path / "b", num_workers=2, **kw)
    files = [str(p.relative_to(a)) for p in a.rglob("*") if p.is_file()]
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert len(match) == len(files) == 2 * 76 + 2 and not mismatch and not errors


def test_config_options_and_errors(tmp_path):
    root = synth.generate_epbd_synth(tmp_path / "r", num_train=10, num_validation=0, num_test=0, num_test_unseen=0,
                                     resolution=128, low_quality_rate=0.0, num_train_categories=3,
                                     num_unseen_categories=0, write_masks=True)
    rows = _rows(root)
    assert {r["category"] for r in rows} == set(synth.TRAIN_CATEGORIES[:3])
    assert all(r["quality"] == "good" for r in rows)
    mask = Image.open(root / "masks" / f"{rows[0]['id']}.png")
    assert mask.mode == "L" and mask.size == (128, 128)
    with pytest.raises(FileExistsError):
        synth.generate_epbd_synth(root, num_train=2)
    synth.generate_epbd_synth(root, num_train=2, num_validation=0, num_test=0, num_test_unseen=0, overwrite=True)
    assert len(_rows(root)) == 2
    for bad in (dict(resolution=8), dict(low_quality_rate=1.5), dict(num_train_categories=13),
                dict(defect_kinds=("smudge",)), dict(num_train=-1)):
        with pytest.raises(ValueError):
            synth.generate_epbd_synth(tmp_path / "bad", **bad)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(KeyError, match="unknown EPBD-synth category"):
        synth.category_scene("toaster")


def _judge_batch(n_per_quality: int = 60, resolution: int = 64):
    out = []
    cats = list(synth.CATEGORIES)
    for q in synth.QUALITY_LABELS:
        for i in range(n_per_quality):
            cat = cats[i % len(cats)]
            out.append((cat, synth.render_sample(cat, q, seed=(11, synth.QUALITY_LABELS.index(q), i),
                                                 resolution=resolution)))
    return out


@pytest.fixture(scope="module")
def judged():
    return _judge_batch()


def test_classify_scene_is_accurate_on_clean_backgrounds(judged):
    clean = [(c, s) for c, s in judged if s["quality"] in ("good", "wrong_scene", "clutter")]
    with_mask = np.mean([synth.classify_scene(s["image"], s["cutout"][..., 3]) == s["scene"] for _, s in clean])
    without = np.mean([synth.classify_scene(Image.fromarray(s["image"])) == s["scene"] for _, s in clean])
    assert with_mask > 0.95 and without > 0.95, (with_mask, without)
    white = [s for _, s in judged if s["quality"] == "plain_white"]
    assert all(synth.classify_scene(s["image"], s["cutout"][..., 3]) == "plain_white" for s in white)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert synth.classify_scene(noise) in ("unknown", *synth.SCENES)


def test_detect_defects_finds_planted_defects(judged):
    by_quality: dict[str, list[dict]] = {}
    for cat, s in judged:
        d = synth.detect_defects(s["image"], Image.fromarray(s["cutout"][..., 3]), category=cat)
        assert set(d) == {"plain_white", "watermark", "clutter", "wrong_scene"}
        assert all(0.0 <= v <= 1.0 for v in d.values())
        by_quality.setdefault(s["quality"], []).append(d)
    for kind in ("plain_white", "watermark", "clutter", "wrong_scene"):
        hit = np.mean([d[kind] > 0.5 for d in by_quality[kind]])
        false_alarm = np.mean([d[kind] > 0.5 for d in by_quality["good"]])
        assert hit >= 0.9 and false_alarm <= 0.05, (kind, hit, false_alarm)
    assert set(synth.detect_defects(judged[0][1]["image"])) == {"plain_white", "watermark", "clutter"}


def test_ground_truth_scores(synth_root, tmp_path):
    scores = synth.ground_truth_scores(synth_root, 1)
    rows = {r["id"]: r for r in _rows(synth_root)}
    assert set(scores) == {i for i, r in rows.items() if r["split"] == "train"}
    assert all((s >= 4) == (rows[i]["quality"] == "good") for i, s in scores.items())


def test_dataset_synth_command(tmp_path, capsys):
    from diffusers_product2img.data.commands import register_commands

    parser = argparse.ArgumentParser()
    register_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dataset-synth", str(tmp_path / "s"), "--num-train", "6", "--num-validation", "1",
                              "--num-test", "1", "--num-test-unseen", "1", "--seed", "2", "--resolution", "32"])
    assert args.func(args) == 0
    assert "9 samples" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "epbd.json").read_text())["config"]["seed"] == 2
    args = parser.parse_args(["dataset-synth", str(tmp_path / "s")])
    assert args.func(args) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
