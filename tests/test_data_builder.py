"""The raw EPBD layout, IDR round scores, the GeneratorBasedBuilder, and the shared preprocessing."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusers_product2img.data import layout, synth
from diffusers_product2img.data.layout import EPBDLayout, EPBDLayoutError, EPBDMissingScoresError
from diffusers_product2img.data.preprocessing import prepare_batch, prepare_example

BUILDER_FILE = Path(__file__).resolve().parents[1] / "dataset_scripts" / "epbd" / "epbd.py"


def load_builder_module():
    # datasets imports the builder's module by name, so it must be registered in sys.modules.
    if "epbd" not in sys.modules:
        spec = importlib.util.spec_from_file_location("epbd", BUILDER_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["epbd"] = module
        spec.loader.exec_module(module)
    return sys.modules["epbd"]


@pytest.fixture(scope="module")
def scored_root(tmp_path_factory) -> Path:
    """EPBD-synth with two IDR rounds scored from the ground truth (one judgement in ten wrong)."""
    root = synth.generate_epbd_synth(tmp_path_factory.mktemp("raw") / "epbd", seed=1, num_train=40,
                                     num_validation=4, num_test=6, num_test_unseen=4)
    layout.write_round_scores(root, 1, synth.ground_truth_scores(root, 1, error_rate=0.1), threshold=4.0,
                              info={"scorer": "oracle"})
    layout.write_round_scores(root, 2, synth.ground_truth_scores(root, 2, error_rate=0.1, seed=5))
    return root


@pytest.fixture
def raw_copy(scored_root, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(scored_root, dst)
    return dst


def _rewrite_metadata(root: Path, edit) -> None:
    with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fieldnames, rows = reader.fieldnames, list(reader)
    rows = edit(rows) or rows
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


# -- rounds -----------------------------------------------------------------------------------------


def test_kept_ids_chain_rounds(scored_root):
    lay = EPBDLayout(scored_root)
    train = [s.id for s in lay.samples if s.split == "train"]
    s1, s2 = lay.scores(1), lay.scores(2)
    assert layout.kept_ids(scored_root, 0) == train
    k1 = layout.kept_ids(scored_root, 1)
    assert k1 == [i for i in train if s1[i] >= 4.0]
    k2 = layout.kept_ids(scored_root, 2)
    assert k2 == [i for i in k1 if s2[i] >= 4.0]
    assert set(s2) == set(k1)  # round 2 scored exactly the survivors of round 1
    # planted low-quality samples are mostly gone after two rounds
    bad = {s.id for s in lay.samples if s.extra["quality"] != "good"}
    assert len(bad & set(k2)) < len(bad & set(train)) / 3
    assert layout.kept_ids(scored_root, 2, threshold=5.0) == [i for i in train if s1[i] >= 5 and s2.get(i, 0) >= 5]
    info = json.loads((scored_root / "scores" / "round_1.json").read_text())
    assert info["threshold"] == 4.0 and info["scorer"] == "oracle" and info["num_kept"] == len(k1)


def test_round_errors(raw_copy):
    root = raw_copy
    with pytest.raises(EPBDMissingScoresError, match="round 3 has no scores yet"):
        layout.kept_ids(root, 3)
    k2 = layout.kept_ids(root, 2)
    with pytest.raises(EPBDLayoutError, match="next round is 3"):
        layout.write_round_scores(root, 4, {})
    with pytest.raises(EPBDLayoutError, match="already has scores"):
        layout.write_round_scores(root, 2, {i: 5 for i in k2})
    with pytest.raises(EPBDLayoutError, match="rounds \\[2\\] were selected from round 1"):
        layout.write_round_scores(root, 1, {i: 5 for i in layout.kept_ids(root, 0)}, overwrite=True)
    with pytest.raises(EPBDLayoutError, match="'nope'.*not in the dataset"):
        layout.write_round_scores(root, 3, {**{i: 5 for i in k2}, "nope": 5})
    with pytest.raises(EPBDLayoutError, match="'validation-00000'.*split 'validation'"):
        layout.write_round_scores(root, 3, {**{i: 5 for i in k2}, "validation-00000": 5})
    with pytest.raises(EPBDLayoutError, match=f"'{k2[0]}'.*kept in round 2 but not scored"):
        layout.write_round_scores(root, 3, {i: 5 for i in k2[1:]})
    with pytest.raises(EPBDLayoutError, match="not finite"):
        layout.write_round_scores(root, 3, {i: float("nan") for i in k2})
    assert not (root / "scores" / "round_3.csv").exists()
    # a looser custom threshold needs scores that round 2 never gave
    with pytest.raises(EPBDLayoutError, match="no round-2 score"):
        layout.kept_ids(root, 2, threshold=1.0)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda rows: rows + [["train-00001", "x", "5"]], "'train-00001'.*scored twice"),
        (lambda rows: [rows[0][:1] + ["toaster"] + rows[0][2:]] + rows[1:], "unknown category 'toaster'"),
        (lambda rows: [rows[0][:1] + ["dumbbell" if rows[0][1] != "dumbbell" else "soap"] + rows[0][2:]] + rows[1:],
         "differs from the metadata"),
        (lambda rows: rows + [["ghost", "", "5"]], "'ghost'.*not in the dataset"),
        (lambda rows: [rows[0][:2] + ["high"]] + rows[1:], "'high' is not a number"),
    ],
)
def test_bad_score_files(raw_copy, edit, message):
    path = raw_copy / "scores" / "round_1.csv"
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["id", "category", "score"]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + edit(rows))
    with pytest.raises(EPBDLayoutError, match=message) as err:
        layout.kept_ids(raw_copy, 1)
    assert "round_1.csv" in str(err.value)


def test_round_gap_is_an_error(raw_copy):
    (raw_copy / "scores" / "round_1.csv").rename(raw_copy / "scores" / "round_9.csv")
    with pytest.raises(EPBDLayoutError, match="round 1 has no score file"):
        layout.available_rounds(raw_copy)


# -- bad raw data -----------------------------------------------------------------------------------


def _break_missing_image(root):
    (root / "images" / "train-00003.png").unlink()
    return "'train-00003'.*image file is missing"


def _break_duplicate_id(root):
    _rewrite_metadata(root, lambda rows: rows + [dict(rows[5])])
    return "'train-00005'.*duplicate id"


def _break_cutout_alpha(root):
    Image.open(root / "cutouts" / "test-00001.png").convert("RGB").save(root / "cutouts" / "test-00001.png")
    return "'test-00001'.*cutout has no alpha"


def _break_image_size(root):
    Image.new("RGB", (48, 48)).save(root / "images" / "validation-00002.png")
    return "'validation-00002'.*image is 48x48, the dataset is 64x64"


def _break_cutout_size(root):
    Image.new("RGBA", (32, 32)).save(root / "cutouts" / "train-00007.png")
    return "'train-00007'.*cutout is 32x32 but its image is 64x64"


def _break_mask_size(root):
    (root / "masks").mkdir()
    Image.new("L", (10, 10)).save(root / "masks" / "train-00002.png")
    return "'train-00002'.*mask is 10x10"


def _break_corrupt_image(root):
    (root / "images" / "train-00004.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return "'train-00004'.*not a readable image"


def _break_split(root):
    _rewrite_metadata(root, lambda rows: [dict(r, split="dev") if r["id"] == "train-00001" else r for r in rows])
    return "'train-00001'.*split 'dev'"


def _break_unseen(root):
    _rewrite_metadata(root, lambda rows: [dict(r, category="soap") if r["split"] == "test_unseen" else r for r in rows])
    return "'soap' is in test_unseen but also in train"


def _break_id(root):
    _rewrite_metadata(root, lambda rows: [dict(r, id="../evil") if r["id"] == "train-00001" else r for r in rows])
    return "'../evil'.*file-name safe"


def _break_columns(root):
    text = (root / "metadata.csv").read_text().replace("product_name", "title", 1)
    (root / "metadata.csv").write_text(text)
    return "missing column.*product_name"


@pytest.mark.parametrize("breaker", [
    _break_missing_image, _break_duplicate_id, _break_cutout_alpha, _break_image_size, _break_cutout_size,
    _break_mask_size, _break_corrupt_image, _break_split, _break_unseen, _break_id, _break_columns,
])
def test_bad_raw_data_names_the_sample(raw_copy, breaker):
    message = breaker(raw_copy)
    with pytest.raises(EPBDLayoutError, match=message):
        EPBDLayout(raw_copy).validate_files()


def test_jsonl_metadata_and_custom_paths(raw_copy):
    with open(raw_copy / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    (raw_copy / "metadata.csv").unlink()
    (raw_copy / "elsewhere").mkdir()
    shutil.move(raw_copy / "images" / "train-00000.png", raw_copy / "elsewhere" / "photo.png")
    rows[0]["image_file"] = "elsewhere/photo.png"
    with open(raw_copy / "metadata.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    lay = EPBDLayout(raw_copy)
    assert lay.by_id["train-00000"].image_file == "elsewhere/photo.png"
    lay.validate_files()
    (raw_copy / "metadata.csv").write_text("id\n")
    with pytest.raises(EPBDLayoutError, match="both metadata.csv and metadata.jsonl"):
        EPBDLayout(raw_copy)


# -- the builder ------------------------------------------------------------------------------------


def _decoded(img) -> np.ndarray:
    return np.asarray(img)


def test_builder_every_config(scored_root, tmp_path):
    epbd = load_builder_module()
    lay = EPBDLayout(scored_root)
    expected = {"default": None, "idr_round_1": layout.kept_ids(scored_root, 1),
                "idr_round_2": layout.kept_ids(scored_root, 2)}
    for config, kept in expected.items():
        builder = epbd.EPBD(config_name=config, data_dir=str(scored_root), cache_dir=str(tmp_path / "cache"))
        builder.download_and_prepare()
        ds = builder.as_dataset()
        feats = ds["train"].features
        assert (feats["image"].mode, feats["cutout"].mode, feats["mask"].mode) == ("RGB", "RGBA", "L")
        if kept is None:
            assert set(ds) == {"train", "validation", "test", "test_unseen"}
            for split in ds:
                assert ds[split]["id"] == [s.id for s in lay.split_samples(split)]
            assert {"score_round_1", "score_round_2", "quality", "scene"} <= set(feats)
            row = ds["train"][0]
            assert row["score_round_1"] == lay.scores(1)[row["id"]]
            assert ds["validation"][0]["score_round_1"] is None
        else:
            assert list(ds) == ["train"] and ds["train"]["id"] == kept
            k = int(config[-1])
            assert f"score_round_{k}" in feats and f"score_round_{k + 1}" not in feats
            assert all(s >= 4.0 for s in ds["train"][f"score_round_{k}"])
        row = ds["train"][0]
        sample = lay.by_id[row["id"]]
        np.testing.assert_array_equal(_decoded(row["image"]), np.asarray(Image.open(scored_root / sample.image_file)))
        cutout = Image.open(scored_root / sample.cutout_file)
        np.testing.assert_array_equal(_decoded(row["cutout"]), np.asarray(cutout))
        np.testing.assert_array_equal(_decoded(row["mask"]), np.asarray(cutout)[..., 3])
        assert row["product_name"] == sample.product_name and row["category"] == sample.category


def test_builder_custom_threshold_missing_round_and_hash(raw_copy, tmp_path):
    epbd = load_builder_module()
    cache = str(tmp_path / "cache")
    builder = epbd.EPBD(config_name="idr_round_1", threshold=5.0, data_dir=str(raw_copy), cache_dir=cache)
    builder.download_and_prepare()
    assert builder.as_dataset(split="train")["id"] == layout.kept_ids(raw_copy, 1, threshold=5.0)
    plain = epbd.EPBD(config_name="idr_round_1", data_dir=str(raw_copy), cache_dir=cache)
    assert builder.config_id != plain.config_id  # a custom threshold has its own cache
    with pytest.raises(EPBDMissingScoresError, match="IDR round 3 has no scores yet"):
        epbd.EPBD(config_name="idr_round_3", data_dir=str(raw_copy), cache_dir=cache)
    with pytest.raises(ValueError, match="threshold applies to an idr_round"):
        epbd.EPBD(config_name="default", threshold=3.0, data_dir=str(raw_copy), cache_dir=cache)
    with pytest.raises(EPBDLayoutError, match="keeps no train sample"):
        epbd.EPBD(config_name="idr_round_1", threshold=99.0, data_dir=str(raw_copy), cache_dir=cache
                  ).download_and_prepare()
    with pytest.raises(ValueError, match="needs data_dir"):
        epbd.EPBD(config_name="default", cache_dir=cache)
    # new scores change the hash: a fresh cache with the new column, not a stale one
    before = epbd.EPBD(config_name="default", data_dir=str(raw_copy), cache_dir=cache)
    layout.write_round_scores(raw_copy, 3, {i: 5.0 for i in layout.kept_ids(raw_copy, 2)})
    after = epbd.EPBD(config_name="default", data_dir=str(raw_copy), cache_dir=cache)
    assert before.hash != after.hash and before.cache_dir != after.cache_dir
    assert "score_round_3" in after.info.features


def test_builder_uses_masks_when_present(raw_copy, tmp_path):
    epbd = load_builder_module()
    (raw_copy / "masks").mkdir()
    custom = Image.new("L", (64, 64), 0)
    custom.paste(255, (10, 10, 30, 30))
    custom.convert("RGB").save(raw_copy / "masks" / "test-00000.png")  # not L: converted
    builder = epbd.EPBD(config_name="default", data_dir=str(raw_copy), cache_dir=str(tmp_path / "c"))
    builder.download_and_prepare()
    row = builder.as_dataset(split="test")[0]
    assert row["id"] == "test-00000"
    np.testing.assert_array_equal(np.asarray(row["mask"]), np.asarray(custom))


# -- preprocessing ----------------------------------------------------------------------------------


def test_prepare_example_consistent_geometry():
    # a 96x64 image: the product is a red square, and the cutout's alpha marks exactly that square
    image = Image.new("RGB", (96, 64), (0, 128, 255))
    image.paste((255, 0, 0), (40, 20, 60, 40))
    alpha = Image.new("L", (96, 64), 0)
    alpha.paste(255, (40, 20, 60, 40))
    cutout = image.convert("RGBA")
    cutout.putalpha(alpha)
    for source in (cutout, alpha, np.asarray(alpha) / 255.0):
        out = prepare_example(image, source, resolution=32)
        assert {k: (v.mode, v.size) for k, v in out.items()} == {
            "image": ("RGB", (32, 32)), "mask": ("L", (32, 32)),
            "product_image": ("RGB", (32, 32)), "background_image": ("RGB", (32, 32))}
        img, mask = np.asarray(out["image"]).astype(int), np.asarray(out["mask"])
        inside, outside = mask > 250, mask < 5
        assert inside.sum() > 20 and outside.sum() > 500
        assert (img[inside][:, 0] > 200).all() and (img[inside][:, 2] < 60).all()  # red where the mask is
        assert (img[outside][:, 0] < 60).all()
        prod, bg = np.asarray(out["product_image"]), np.asarray(out["background_image"])
        assert (prod[outside] >= 250).all() and (prod[inside][:, 0] > 200).all()
        assert (abs(bg[inside].astype(int) - 127) <= 2).all() and (bg[outside][:, 2] > 200).all()
    with pytest.raises(ValueError, match="cutout/mask is 10x10 but the image is 96x64"):
        prepare_example(image, Image.new("L", (10, 10)), 32)
    batch = prepare_batch({"image": [image, image], "mask": [alpha, alpha], "product_name": ["a", "b"]}, 16)
    assert batch["product_name"] == ["a", "b"] and batch["background_image"][1].size == (16, 16)
