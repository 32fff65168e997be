"""evaluate_images, the Table-1 writer and the evaluate-images command, on tiny local models."""

import argparse
import json
import os
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from test_metrics import _background, _known_aesthetic_state, grow_product, make_scene

from diffusers_product2img.metrics import (
    EvalConfig,
    MetricModels,
    PickScorer,
    evaluate_images,
    format_metrics_table,
    frechet_distance_from_features,
    write_metrics_table,
)
from diffusers_product2img.metrics import evaluate as evaluate_module
from diffusers_product2img.metrics.commands import register_commands
from diffusers_product2img.testing import save_tiny_clip_model

N = 4


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip_model(tmp_path_factory.mktemp("tiny_clip_eval"))


@pytest.fixture(scope="module")
def const_head(tmp_path_factory):
    """An aesthetic head that scores 5.25 for every image (zero weights, last bias 5.25)."""
    state = {k: torch.zeros_like(v) for k, v in _known_aesthetic_state(32).items()}
    state["layers.7.bias"] = torch.tensor([5.25])
    path = tmp_path_factory.mktemp("aesthetic") / "const.pth"
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def scenes():
    """N real scenes and N generated ones (product pasted back exactly on new backgrounds; #1 grown)."""
    refs, cutouts, masks, generated = [], [], [], []
    for i in range(N):
        ref, cutout, mask = make_scene(bg_seed=i, bg_base=(60 + 20 * i, 110, 160 - 10 * i))
        new_bg = Image.fromarray(_background(100 + i, base=(90, 160, 90)))
        gen = Image.composite(ref, new_bg, mask)
        if i == 1:
            gen = grow_product(gen, 8)
        refs.append(ref)
        cutouts.append(cutout)
        masks.append(mask)
        generated.append(gen)
    names = ["red ceramic mug", "red leather backpack", "red bottle", "red lipstick"]
    return generated, refs, cutouts, masks, names


def _config(tiny_clip_dir, head, **kw):
    return EvalConfig(
        clip_model=tiny_clip_dir, pickscore_model=tiny_clip_dir, pickscore_processor=tiny_clip_dir,
        aesthetic_weights=head, batch_size=3, **kw,
    )


def test_evaluate_images_all_metrics(tiny_clip_dir, const_head, scenes):
    generated, refs, cutouts, masks, names = scenes
    config = _config(tiny_clip_dir, const_head, fid="fd-clip")
    models = MetricModels(config)
    result = evaluate_images(generated, refs, cutouts, masks, names, config, models=models)
    m = result["metrics"]
    assert set(m) == {"FD-CLIP", "PickScore", "Aesthetics", "CLIP-c-I", "CLIP-c-B", "ExactPixel", "ProductMAE",
                      "Expansion"}
    assert "FID" not in m  # a CLIP-feature distance is never reported as FID
    assert result["n_images"] == N and all(result["counts"][k] == N for k in m if k != "FD-CLIP")
    assert m["FD-CLIP"] > 0
    assert result["details"]["FD-CLIP"]["model"] == tiny_clip_dir
    assert "warning" in result["details"]["FD-CLIP"]  # 4 samples for 32-d features
    assert m["Aesthetics"] == pytest.approx(5.25)
    assert -100 <= m["CLIP-c-I"] <= 100 and -100 <= m["CLIP-c-B"] <= 100
    assert m["ExactPixel"] == 1.0 and m["ProductMAE"] == 0.0
    expansions = [row["Expansion"] for row in result["per_image"]]
    assert expansions[1] > 0.1 and max(abs(e) for i, e in enumerate(expansions) if i != 1) < 0.05
    # PickScore scores the product name, with the same numbers as the scorer on its own.
    assert result["details"]["PickScore"]["text"] == "product name"
    expected = PickScorer(models.pickscore().encoder).score(generated, names).mean()
    assert m["PickScore"] == pytest.approx(float(expected), rel=1e-5)
    assert [row["name"] for row in result["per_image"]] == names
    json.dumps(result)  # plain JSON
    assert "warning, product2img FD-CLIP: only 4 samples" in format_metrics_table({"product2img": result})


def test_evaluate_identical_sets_and_size_mismatch(tiny_clip_dir, const_head, scenes):
    _, refs, cutouts, masks, names = scenes
    config = _config(tiny_clip_dir, const_head, fid="fd-clip", metrics=("frechet", "fidelity", "clip_c_b"))
    result = evaluate_images(refs, refs, cutouts, masks, names, config)
    assert result["metrics"]["FD-CLIP"] == pytest.approx(0.0, abs=1e-6)
    assert result["metrics"]["ExactPixel"] == 1.0
    assert result["metrics"]["Expansion"] == pytest.approx(0.0, abs=1e-9)
    assert set(result["metrics"]) == {"FD-CLIP", "ExactPixel", "ProductMAE", "Expansion", "CLIP-c-B"}
    # Generated at another size: no exact-pixel comparison is possible, the others still run.
    bigger = [im.resize((96, 96)) for im in refs]
    result = evaluate_images(bigger, refs, cutouts, None, names, config)  # masks from the cutouts' alpha
    assert result["metrics"]["ExactPixel"] is None and result["counts"]["ExactPixel"] == 0
    assert result["details"]["ExactPixel"]["skipped_size_mismatch_or_no_source"] == N
    assert result["counts"]["Expansion"] == N and result["counts"]["CLIP-c-B"] == N


def test_auto_falls_back_to_fd_clip_without_inception(monkeypatch, tiny_clip_dir, const_head, scenes):
    generated, refs, cutouts, masks, names = scenes
    monkeypatch.setattr(evaluate_module, "inception_available", lambda: False)
    config = _config(tiny_clip_dir, const_head, fid="auto", metrics=("frechet",))
    result = evaluate_images(generated, refs, cutouts, masks, names, config)
    assert set(result["metrics"]) == {"FD-CLIP"}


def test_inception_backend_feeds_uint8_and_names_itself(monkeypatch, tiny_clip_dir, const_head, scenes):
    """The torch-fidelity adapter, with a stand-in for torch-fidelity's network (not installable here)."""
    calls = []

    class FakeInception(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__()
            assert features_list == ["2048"]
            self.weights = feature_extractor_weights_path

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
            calls.append(tuple(x.shape))
            x = x.float()
            return (torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1),)

    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = FakeInception
    package = types.ModuleType("torch_fidelity")
    package.__version__ = "fake"
    package.feature_extractor_inceptionv3 = module
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)

    generated, refs, cutouts, masks, names = scenes
    generated = generated[:2] + [im.resize((80, 48)) for im in generated[2:]]  # two sizes
    config = _config(tiny_clip_dir, const_head, fid="auto", metrics=("frechet",), inception_weights="w.pth")
    result = evaluate_images(generated, refs, cutouts, masks, names, config)
    assert set(result["metrics"]) == {"FID"}
    detail = result["details"]["FID"]
    assert "torch-fidelity fake" in detail["implementation"] and detail["weights"] == "w.pth"
    assert sorted(calls) == sorted([(2, 3, 64, 64), (2, 3, 48, 80), (3, 3, 64, 64), (1, 3, 64, 64)])

    def feats(images):
        arrs = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() for im in images]
        return torch.stack([torch.cat([a.mean(dim=(1, 2)), a.std(dim=(1, 2))]) for a in arrs]).double()

    assert result["metrics"]["FID"] == pytest.approx(frechet_distance_from_features(feats(generated), feats(refs)))


def test_write_metrics_table_markdown_and_json(tmp_path):
    rows = {
        "SD-Inpainting": {"FID": 5.76, "PickScore": 20.09, "Aesthetics": 4.92, "CLIP-c-I": 80.15},
        "Product2Img": {
            "n_images": 10,
            "metrics": {"FID": 2.64, "PickScore": 20.24, "Aesthetics": 5.27, "CLIP-c-I": 84.09, "CLIP-c-B": 57.55,
                        "ExactPixel": 0.9912, "Expansion": 0.0123},
            "details": {"FID": {"metric": "FID", "implementation": "torch-fidelity X", "n_generated": 10}},
        },
    }
    paths = write_metrics_table(rows, tmp_path / "out")
    md = open(paths["markdown"], encoding="utf-8").read()
    lines = md.splitlines()
    assert lines[0] == (
        "| Method | FID ↓ | PickScore ↑ | Aesthetics ↑ | CLIP-c-I ↑ | CLIP-c-B ↑ | Exact px % ↑ | Expansion pp ↓ |"
    )
    assert lines[2] == "| SD-Inpainting | 5.76 | 20.09 | 4.92 | 80.15 | - | - | - |"
    assert lines[3] == "| Product2Img | 2.64 | 20.24 | 5.27 | 84.09 | 57.55 | 99.12 | 1.23 |"
    assert "**FID**: implementation: torch-fidelity X" in md
    data = json.load(open(paths["json"], encoding="utf-8"))
    assert data["rows"]["Product2Img"]["metrics"]["CLIP-c-B"] == 57.55
    assert {c["key"]: c["better"] for c in data["columns"]}["FID"] == "lower"
    assert sorted(os.listdir(tmp_path / "out")) == ["metrics.json", "metrics.md"]  # no temp files left
    # Rows whose FID settings differ are flagged, not silently compared.
    rows["SD-Inpainting"] = {"metrics": {"FID": 5.0}, "details": {"FID": {"implementation": "other"}}}
    assert "settings differ between rows, do not compare them" in format_metrics_table(rows)
    # NaN is written as null, never as invalid JSON.
    write_metrics_table({"x": {"metrics": {"FID": float("nan")}}}, tmp_path / "out")
    assert json.load(open(paths["json"], encoding="utf-8"))["rows"]["x"]["metrics"]["FID"] is None


def test_evaluate_images_command_from_jsonl(tmp_path, tiny_clip_dir, const_head, scenes):
    generated, refs, cutouts, masks, names = scenes
    data = tmp_path / "data"
    gen_dir = tmp_path / "gens" / "product2img"
    data.mkdir()
    gen_dir.mkdir(parents=True)
    with open(data / "rows.jsonl", "w", encoding="utf-8") as f:
        for i in range(N):
            refs[i].save(data / f"ref{i}.png")
            cutouts[i].save(data / f"cut{i}.png")
            masks[i].save(data / f"mask{i}.png")
            generated[i].save(gen_dir / f"p{i}.png")
            row = {"id": f"p{i}", "reference": f"ref{i}.png", "cutout": f"cut{i}.png", "mask": f"mask{i}.png",
                   "product_name": names[i]}
            f.write(json.dumps(row) + "\n")
    parser = argparse.ArgumentParser(prog="product2img")
    register_commands(parser.add_subparsers(dest="command"))
    common = ["--jsonl", str(data / "rows.jsonl"), "--output-dir", str(tmp_path / "table"),
              "--clip-model", tiny_clip_dir, "--pickscore-model", tiny_clip_dir, "--pickscore-processor",
              tiny_clip_dir, "--aesthetic-weights", const_head, "--fid", "fd-clip", "--batch-size", "2"]
    args = parser.parse_args(["evaluate-images", "--generated", str(gen_dir), *common])
    assert args.func(args) == 0
    out = json.load(open(tmp_path / "table" / "metrics.json", encoding="utf-8"))
    assert list(out["rows"]) == ["product2img"]
    assert out["rows"]["product2img"]["metrics"]["ExactPixel"] == 1.0
    # A second method appended into the same table; rows without 'generated' find <id>.png.
    args = parser.parse_args(["evaluate-images", "--generated", str(gen_dir), "--method", "copy", "--append",
                              "--metrics", "fidelity,aesthetics", *common])
    assert args.func(args) == 0
    md = open(tmp_path / "table" / "metrics.md", encoding="utf-8").read()
    assert "| product2img |" in md and "| copy | - | - | 5.25 |" in md


def test_evaluate_images_command_on_a_raw_epbd_folder(tmp_path, tiny_clip_dir, const_head, scenes):
    pytest.importorskip("diffusers_product2img.data.layout")
    generated, refs, cutouts, masks, names = scenes
    root, gen_dir = tmp_path / "epbd", tmp_path / "gens"
    for sub in ("images", "cutouts", "masks"):
        (root / sub).mkdir(parents=True)
    gen_dir.mkdir()
    lines = ["id,product_name,category,split"]
    for i in range(N):
        sid = f"s{i}"
        lines.append(f"{sid},{names[i]},mug,{'test' if i < 3 else 'train'}")
        refs[i].save(root / "images" / f"{sid}.png")
        cutouts[i].save(root / "cutouts" / f"{sid}.png")
        if i == 0:
            masks[i].save(root / "masks" / f"{sid}.png")  # the others come from the cutouts' alpha
        generated[i].save(gen_dir / f"{sid}.png")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    parser = argparse.ArgumentParser(prog="product2img")
    register_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "evaluate-images", "--generated", str(gen_dir), "--dataset", str(root), "--split", "test",
        "--output-dir", str(tmp_path / "table"), "--clip-model", tiny_clip_dir, "--pickscore-model",
        tiny_clip_dir, "--pickscore-processor", tiny_clip_dir, "--aesthetic-weights", const_head,
        "--metrics", "fidelity,pickscore", "--method", "Product2Img",
    ])
    assert args.func(args) == 0
    row = json.load(open(tmp_path / "table" / "metrics.json", encoding="utf-8"))["rows"]["Product2Img"]
    assert row["n_images"] == 3 and [r["name"] for r in row["per_image"]] == names[:3]
    assert row["metrics"]["ExactPixel"] == 1.0 and row["per_image"][1]["Expansion"] > 0.1
