"""`product2img evaluate`: a model generates an EPBD split and the Table-1 metrics are written (tiny models, offline)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from diffusers_product2img.cli import build_parser, main  # noqa: E402
from diffusers_product2img.data import export_epbd, generate_epbd_synth  # noqa: E402
from diffusers_product2img.testing import save_tiny_clip_model  # noqa: E402

N_TEST = 4



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    raw = generate_epbd_synth(root / "epbd", resolution=32, num_train=8, num_validation=2, num_test=N_TEST,
                              num_test_unseen=2)
    return {"raw": raw, "clip": save_tiny_clip_model(root / "clip"), "root": root}


def _metric_flags(clip):
    return ["--clip-model", clip, "--pickscore-model", clip, "--pickscore-processor", clip,
            "--aesthetic-weights", "random", "--fid", "fd-clip", "--device", "cpu", "--batch-size", "4"]


def _run(model, dataset, out, clip, *extra):
    return main(["evaluate", "--model", str(model), "--dataset", str(dataset), "--output-dir", str(out),
                 "--size", "32", "--steps", "2", "--gen-batch-size", "4", "--quiet", *_metric_flags(clip), *extra])


def test_registered_in_the_cli():
    parser = build_parser()
    args = parser.parse_args(["evaluate", "--model", "m", "--dataset", "d", "--output-dir", "o"])
    assert args.func.__module__ == "diffusers_product2img.evaluation"
    assert (args.split, args.steps, args.size, args.method) == ("test", 30, 512, "auto")


def test_evaluate_writes_table1_and_standins(world, tiny_pipeline_dir, tiny_inpainting_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert _run(tiny_pipeline_dir, world["raw"], out, world["clip"]) == 0
    printed = capsys.readouterr().out
    assert "| Product2Img |" in printed and "Scene acc." in printed

    # the model generated every test product, through the benchmark harness
    pngs = sorted(p.name for p in (out / "product2img").glob("*.png"))
    assert len(pngs) == N_TEST and pngs[0].startswith("test-")
    manifest = json.loads((out / "benchmark.json").read_text())
    assert manifest["settings"]["split"] == "test" and manifest["settings"]["resolution"] == 32
    assert manifest["methods"]["product2img"]["describe"]["model"] == str(tiny_pipeline_dir)
    assert manifest["methods"]["product2img"]["prompts"]["test-00000"].endswith(" <background>")

    # Table 1: markdown + JSON with the paper's columns (FD-CLIP in place of FID offline) and fidelity
    table = (out / "metrics.md").read_text()
    header = table.splitlines()[0]
    for column in ("FD-CLIP ↓", "PickScore ↑", "Aesthetics ↑", "CLIP-c-I ↑", "CLIP-c-B ↑", "Exact px %"):
        assert column in header
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    metrics = rows["Product2Img"]["metrics"]
    assert metrics["ExactPixel"] == 1.0  # the product is pasted back bit for bit
    assert all(isinstance(metrics[k], float) for k in ("FD-CLIP", "PickScore", "Aesthetics", "CLIP-c-I", "CLIP-c-B"))

    # EPBD-synth: the weight-free stand-ins
    standins = json.loads((out / "standins.json").read_text())["rows"]["Product2Img"]
    assert 0.0 <= standins["metrics"]["SceneAcc"] <= 1.0 and standins["metrics"]["FD-BG"] >= 0.0
    assert sum(standins["scenes"].values()) == N_TEST

    # a second model into the same folder adds a row (SD-Inpainting format: stock pipeline + uniform prompt)
    assert _run(tiny_inpainting_dir, world["raw"], out, world["clip"]) == 0
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert list(rows) == ["SD-Inpainting", "Product2Img"]  # Table-1 order
    manifest = json.loads((out / "benchmark.json").read_text())
    assert manifest["methods"]["sd-inpainting"]["prompts"]["test-00000"].endswith(
        ", high-quality and appropriate background")
    assert "| SD-Inpainting |" in (out / "standins.md").read_text()


def test_evaluate_reads_an_export_and_other_splits(world, tiny_pipeline_dir, tmp_path):
    exported = export_epbd(world["raw"], tmp_path / "export")
    out = tmp_path / "eval"
    assert _run(tiny_pipeline_dir, exported, out, world["clip"], "--split", "test_unseen", "--limit", "1",
                "--metrics", "fidelity", "--name", "Product2Img (round 3)") == 0
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert list(rows) == ["Product2Img (round 3)"] and rows["Product2Img (round 3)"]["n_images"] == 1
    assert len(list((out / "product2img-round-3").glob("*.png"))) == 1


def test_evaluate_refuses_stale_images_and_reports_errors(world, tiny_pipeline_dir, tiny_inpainting_dir, tmp_path,
                                                          capsys):
    out = tmp_path / "eval"
    assert _run(tiny_pipeline_dir, world["raw"], out, world["clip"], "--limit", "1", "--skip-metrics") == 0
    # another model under the same row name would silently reuse the first model's images
    code = _run(tiny_inpainting_dir, world["raw"], out, world["clip"], "--limit", "1", "--skip-metrics",
                "--method", "product2img")
    assert code == 2 and "holds images of another model" in capsys.readouterr().err
    code = _run(tmp_path / "missing", world["raw"], out, world["clip"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("product2img evaluate: error:") and len(err.strip().splitlines()) == 1
