"""The offline demo: its stand-in metrics, its report writer, and the whole run end to end.

Two end-to-end runs: ``--smoke`` in-process (the full pipeline: EPBD-synth, export, demo-world
pretraining, 3 IDR-LMM rounds against the simulated LMM through the real openai client, CBA training
with the example script, w/o-IDR and w/o-CBA arms, evaluation, Table-1 harness, report; with the
smallest sizes, checked in detail, and resumed), and ``--quick`` as a user runs it, from the command
line in a fresh process with fresh caches (about 2.5 minutes on 2 cores).
"""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from diffusers_product2img.baselines import load_benchmark_samples  # noqa: E402
from diffusers_product2img.data.layout import EPBDLayout  # noqa: E402
from diffusers_product2img.data.synth import generate_epbd_synth, render_sample  # noqa: E402
from diffusers_product2img.demo import standins  # noqa: E402
from diffusers_product2img.demo.report import Report, fmt_mean_std, format_table, image_grid, mean_std  # noqa: E402


@pytest.fixture(scope="module")
def synth_test(tmp_path_factory):
    root = generate_epbd_synth(tmp_path_factory.mktemp("synth") / "epbd", resolution=32, num_train=0,
                               num_validation=0, num_test=16, num_test_unseen=0, num_unseen_categories=0)
    return load_benchmark_samples(root, "test", resolution=32)


# ------------------------------------------------------------------------------------------------
# Stand-in metrics
# ------------------------------------------------------------------------------------------------


def test_standins_on_the_real_images_are_perfect(synth_test):
    refs = [s.reference for s in synth_test]
    result = standins.standin_metrics(refs, refs, [s.product_image for s in synth_test],
                                      [s.product_mask for s in synth_test], [s.category for s in synth_test])
    m = result["metrics"]
    assert m["SceneAcc"] == 1.0 and m["DefectRate"] == 0.0 and m["ExactPixel"] == 1.0
    assert abs(m["FD-BG"]) < 1e-6
    assert sum(result["scenes"].values()) == len(synth_test)


def test_scene_accuracy_follows_the_category(synth_test):
    # the same images judged against shuffled categories: only categories sharing a scene still hit
    cats = [s.category for s in synth_test]
    shuffled = cats[1:] + cats[:1]
    hits = standins.scene_hits([s.reference for s in synth_test], [s.product_mask for s in synth_test], shuffled)
    from diffusers_product2img.data.synth import category_scene

    expected = [category_scene(a) == category_scene(b) for a, b in zip(cats, shuffled)]
    assert [h["hit"] for h in hits] == expected and not all(expected)


def test_defect_flags_see_the_planted_defects():
    images, masks = [], []
    for quality in ("good", "plain_white", "watermark", "clutter"):
        s = render_sample("coffee_mug", quality, seed=(5, 1), resolution=64)
        images.append(Image.fromarray(s["image"]))
        masks.append(Image.fromarray(s["cutout"][..., 3]))
    flags = standins.defect_flags(images, masks)
    assert flags[0] == [] and "plain_white" in flags[1] and "watermark" in flags[2] and "clutter" in flags[3]


def test_background_features_and_fd_bg(synth_test):
    s = synth_test[0]
    f = standins.background_features(s.reference, s.product_mask)
    assert f.shape == (23,) and np.isfinite(f).all()
    # the product's pixels do not enter the features
    repainted = s.reference.copy()
    repainted.paste((255, 0, 255), mask=s.product_mask.point(lambda v: 255 if v > 8 else 0))
    assert np.allclose(standins.background_features(repainted, s.product_mask), f)
    refs, masks = [x.reference for x in synth_test], [x.product_mask for x in synth_test]
    grey = [Image.new("RGB", r.size, (128, 128, 128)) for r in refs]
    assert standins.frechet_bg(refs, refs, masks) < 1e-6
    assert standins.frechet_bg(grey, refs, masks) > 100.0


def test_selection_quality_against_ground_truth():
    quality = {"a": "good", "b": "good", "c": "good", "d": "watermark", "e": "plain_white", "f": "wrong_scene"}
    sel = standins.selection_quality(list(quality), ["a", "b", "e"], quality, initial=list(quality))
    assert sel["removed"] == 3 and sel["low_quality_removed"] == 2
    assert sel["precision"] == pytest.approx(2 / 3) and sel["recall"] == pytest.approx(2 / 3)
    assert sel["good_removed_fraction"] == pytest.approx(1 / 3)
    assert sel["low_quality_share_after"] == pytest.approx(1 / 3)
    assert sel["by_kind"] == {"plain_white": {"candidates": 1, "removed": 0}, "watermark": {"candidates": 1, "removed": 1},
                              "wrong_scene": {"candidates": 1, "removed": 1}}
    # a later round: candidates are what round 1 kept, cumulative counts are against D_0
    sel2 = standins.selection_quality(["a", "b", "e"], ["a", "b"], quality, initial=list(quality))
    assert sel2["recall"] == 1.0 and sel2["cumulative_low_quality_removed"] == 1.0
    assert sel2["precision"] == 1.0 and sel2["low_quality_share_after"] == 0.0


# ------------------------------------------------------------------------------------------------
# Report writer
# ------------------------------------------------------------------------------------------------


def test_report_markdown_html_and_grid(tmp_path):
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2)))
    assert mean_std([None]) == (None, None)
    assert fmt_mean_std([0.5, 0.7], 100, 1) == "60.0 ± 14.1" and fmt_mean_std([0.5], 100, 0) == "50"
    assert format_table(["a", "b"], [["x|y", 1]]).splitlines() == ["| a | b |", "|---|---:|", "| x\\|y | 1 |"]
    rep = Report("Demo")
    rep.heading("Table 2")
    rep.text("with **bold** and `code`")
    rep.table(["Row", "Scene acc. %"], [["CBA", "61.0 ± 2.0"]], caption="test")
    rep.image("rounds.png", "Figure 8")
    paths = rep.write(tmp_path)
    md, html = open(paths["markdown"]).read(), open(paths["html"]).read()
    assert "| CBA | 61.0 ± 2.0 |" in md and "![Figure 8](rounds.png)" in md
    assert "<td>61.0 ± 2.0</td>" in html and '<img src="rounds.png"' in html and "<b>bold</b>" in html
    cut = Image.new("RGBA", (32, 32))
    grid = image_grid([{"cutout": cut, "name": "A long product name " * 3, "images": {"round 1": Image.new("RGB", (32, 32))}}],
                      ["real", "round 1"], cell=64, name_width=100)
    assert grid.size == (64 + 100 + 2 * 64, 22 + 64)


# ------------------------------------------------------------------------------------------------
# The whole demo
# ------------------------------------------------------------------------------------------------


def test_demo_end_to_end_smoke(tmp_path, capsys):
    from diffusers_product2img.demo.run import MODES, parse_args, run_demo

    assert parse_args(["--quick"]).quick and parse_args([]).output_dir == "demo_output"
    settings = MODES["smoke"]
    out = tmp_path / "demo_output"
    payload = run_demo(out, settings, cache_dir=tmp_path / "cache")
    assert payload["mode"] == "smoke" and payload["tables"]["table2"]
    printed = capsys.readouterr().out
    assert "Table 2 (CBA, round 1)" in printed and "Table 3 (IDR-LMM)" in printed
    assert "IDR round 3" in printed  # progress lines

    for name in ("report.md", "report.html", "tables.json", "rounds.png", "grids/test.png", "grids/test_unseen.png",
                 "table1/metrics.md"):
        assert (out / name).is_file(), name
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in ("Table 2: CBA ablation", "Table 3: IDR-LMM", "Figure 8", "Plumbing only", "Did the paper's direction show?",
                 "CBA mechanism check"):
        assert text in md and text in html
    assert "![Figure 8" in md and '<img src="rounds.png"' in html and '<img src="grids/test.png"' in html

    tables = json.loads((out / "tables.json").read_text())
    assert tables["mode"] == "smoke" and tables["settings"]["round_steps"] == list(settings.round_steps)
    t2 = tables["tables"]["table2"]["test"]["rows"]
    t3 = tables["tables"]["table3"]["test_unseen"]["rows"]
    assert [r[0] for r in t2] == ["Product2Img (CBA)", "w/o CBA"] and len(t3) == 6
    for row in t2 + t3:
        float(row[1].split(" ")[0]), float(row[3].split(" ")[0])  # scene accuracy and FD-BG are numbers

    # the CBA mechanism check: every arm and split, a loss only for the models with a CBA head
    align = tables["tables"]["cba_alignment"]
    assert len(align["rows"]) == 8 and 0.0 <= align["image_side"]["agreement"] <= 1.0
    no_cba_rows = [r for r in align["rows"] if r[0].startswith("w/o CBA")]
    assert len(no_cba_rows) == 2 and all(r[-1] == "- (no CBA head)" for r in no_cba_rows)
    assert all("(" in r[-1] and r[-1][0].isdigit() for r in align["rows"] if not r[0].startswith("w/o CBA"))

    seed = tables["seeds"]["0"]
    lay = EPBDLayout(out / "runs" / "seed-0" / "epbd_synth")
    sizes = [len(lay.kept_ids(k)) for k in range(4)]
    assert sizes[0] == settings.world.num_train and sizes[0] >= sizes[1] >= sizes[2] >= sizes[3] > 0
    removed = []
    for r in ("1", "2", "3"):
        rec = seed["idr"][r]
        assert rec["kept"] == sizes[int(r)] and rec["candidates"] == sizes[int(r) - 1]
        sel = rec["selection"]
        assert 0.0 <= sel["cumulative_low_quality_removed"] <= 1.0
        removed.append(sel["cumulative_low_quality_removed"])
        for split in ("test", "test_unseen"):
            assert set(rec["eval"][split]["metrics"]) == {"SceneAcc", "DefectRate", "FD-BG", "ExactPixel"}
            assert rec["eval"][split]["metrics"]["ExactPixel"] == 1.0
    assert removed == sorted(removed) and removed[0] > 0.3  # the simulated LMM catches planted defects
    assert seed["idr"]["1"]["selection"]["precision"] > 0.5
    assert seed["idr"]["1"]["feedback_used"] is None and seed["idr"]["2"]["feedback_used"]

    # each arm trained on what it should: IDR round k on D_k, w/o IDR on everything, w/o CBA on D_1
    def ids(path):
        return set((out / "runs" / "seed-0" / path / "train_ids.txt").read_text().split())

    assert ids("idr/round-2/model") == set(lay.kept_ids(2))
    assert ids("no_idr/stage-3/model") == set(lay.kept_ids(0))
    assert ids("no_cba/model") == set(lay.kept_ids(1))
    assert not (out / "runs" / "seed-0" / "no_cba" / "model" / "cba_projection").exists()
    assert (out / "runs" / "seed-0" / "idr" / "round-1" / "model" / "cba_projection").exists()

    # Table 1 (plumbing) went through the benchmark harness and the metrics library
    t1 = tables["table1"]["metrics"]
    assert len(t1) == 4 and all("FD-CLIP" in m and "CLIP-c-B" in m for m in t1.values())

    # a second run resumes: nothing is trained again
    stamp = (out / "runs" / "seed-0" / "no_cba" / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat()
    run_demo(out, settings, cache_dir=tmp_path / "cache", quiet=True)
    again = (out / "runs" / "seed-0" / "no_cba" / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat()
    assert again.st_mtime_ns == stamp.st_mtime_ns


def test_effect_verdicts():
    from diffusers_product2img.demo.summary import _verdict, effects

    assert _verdict(10.4, 3.6, 3, 3, "higher") == "shows"
    assert _verdict(0.7, 1.57, 3, 2, "higher") == "direction only (not significant)"
    assert _verdict(-2.0, 1.0, 3, 0, "higher") == "not shown"
    assert _verdict(-50.0, 10.0, 3, 3, "lower") == "shows"
    assert _verdict(0.1, 0.0, 1, 1, "higher") == "one seed: direction only"

    def ev(scene):
        return {split: {"metrics": {"SceneAcc": scene, "DefectRate": 0.0, "FD-BG": 100.0}}
                for split in ("test", "test_unseen")}

    seeds = {s: {"idr": {i: {"eval": ev(0.4 + 0.05 * i + 0.01 * s)} for i in (1, 2, 3)},
                 "no_idr": {i: {"eval": ev(0.3 + 0.01 * s)} for i in (1, 2, 3)}, "no_cba": {"eval": ev(0.4)}}
             for s in (0, 1, 2)}
    found = {(e["comparison"].split(":")[0], e["split"], e["metric"]): e for e in effects(seeds, (3, 1, 1))}
    idr = found[("IDR-LMM (Table 3)", "test", "SceneAcc")]
    assert idr["verdict"] == "shows" and idr["seeds_in_paper_direction"] == 3
    assert found[("IDR-LMM (Table 3)", "test", "FD-BG")]["verdict"] == "not shown"  # equal: no direction


def test_demo_quick_mode_from_the_command_line(tmp_path):
    out, cache = tmp_path / "demo_output", tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFUSERS_PRODUCT2IMG_CACHE": str(tmp_path / "unused")}
    proc = subprocess.run([sys.executable, "-m", "diffusers_product2img.demo", "--quick", "--output_dir", str(out),
                           "--cache_dir", str(cache)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # progress: timestamped stage lines, and the tables printed at the end
    for line in ("(quick mode)", "pretraining the autoencoder", "IDR round 3: training", "w/o IDR stage 3",
                 "w/o CBA (round-1 data)", "Table 2 (CBA, round 1)", "Table 3 (IDR-LMM)", "CBA mechanism check",
                 "done in"):
        assert line in proc.stdout, line
    for name in ("report.md", "report.html", "tables.json", "rounds.png", "grids/test.png", "grids/test_unseen.png"):
        assert (out / name).is_file(), name
    assert any(cache.rglob("*.safetensors")) and not (tmp_path / "unused").exists()  # --cache_dir was used

    tables = json.loads((out / "tables.json").read_text())
    assert tables["mode"] == "quick" and tables["settings"]["round_steps"] == [60, 20, 20]
    assert tables["elapsed_seconds"] > 0 and set(tables["timings"]) >= {"world", "train", "evaluate"}
    rounds = tables["seeds"]["0"]["idr"]
    # the simulated LMM (misses ~40% of each planted kind) through the real client removes planted
    # defects and no good sample; the feedback of round 1 is used in round 2
    assert rounds["1"]["selection"]["cumulative_low_quality_removed"] > 0.3
    assert rounds["1"]["selection"]["precision"] > 0.8
    assert rounds["1"]["feedback_used"] is None and rounds["2"]["feedback_used"] == rounds["1"]["feedback"]
    assert rounds["3"]["kept"] <= rounds["2"]["kept"] <= rounds["1"]["kept"] < 240
    for r in ("1", "2", "3"):
        assert rounds[r]["eval"]["test"]["metrics"]["ExactPixel"] == 1.0


# ------------------------------------------------------------------------------------------------
# CBA mechanism check
# ------------------------------------------------------------------------------------------------


def test_cross_category_scene_agreement_by_hand():
    from diffusers_product2img.demo.alignment import cross_category_scene_agreement

    # kitchen: coffee_mug, cookware; beach: sunscreen, sunglasses; gym: dumbbell (no other gym category)
    cats = ["coffee_mug", "cookware", "sunscreen", "sunglasses", "dumbbell"]
    by_scene = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
    r = cross_category_scene_agreement(by_scene, cats)
    assert r["queries"] == 4 and r["agreement"] == 1.0  # the dumbbell is skipped: nothing to agree with
    assert r["chance"] == pytest.approx(1 / 4)  # each query: 1 same-scene among 4 other-category items
    swapped = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [0.7, 0.7]])  # mug near sunscreen
    assert cross_category_scene_agreement(swapped, cats)["agreement"] == 0.0
    # queries against references; the query's own category among the references is never its neighbour
    q = cross_category_scene_agreement(by_scene, cats, np.array([[1.0, 0.0]]), ["coffee_mug"])
    assert q == {"agreement": 1.0, "chance": 0.25, "queries": 1}
    assert cross_category_scene_agreement(by_scene, cats, np.array([[0.7, 0.7]]), ["dumbbell"])["agreement"] is None
    with pytest.raises(ValueError, match="categories"):
        cross_category_scene_agreement(by_scene, cats[:3])


def test_text_features_and_background_loss_of_a_model_folder(tmp_path):
    from diffusers_product2img.cba import CBA_PROJECTION_DIR, TextToImageProjection
    from diffusers_product2img.demo.alignment import background_contrastive_loss, text_features
    from diffusers_product2img.testing import save_tiny_product2img_pipeline

    model = save_tiny_product2img_pipeline(tmp_path / "model")
    names = ["Ceramic Coffee Mug 350 ml", "Sunscreen Lotion SPF 50", "Dumbbell Set 5 kg"]
    f = text_features(model, names, batch_size=2)
    assert f["background"].shape == f["eos"].shape == (3, f["background"].shape[1])
    assert not np.allclose(f["background"][0], f["background"][1])  # the names reach the token's feature
    assert np.allclose(text_features(model, names[:1])["background"], f["background"][:1], atol=1e-5)

    images = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    assert background_contrastive_loss(model, f["background"], images) is None  # no CBA head: a w/o-CBA model
    projection = TextToImageProjection(f["background"].shape[1], 8)
    projection.save_pretrained(tmp_path / "model" / CBA_PROJECTION_DIR)
    r = background_contrastive_loss(model, f["background"], images, chunk=2)
    # chunks of 2 and 1: the single leftover has no negative and is left out
    assert r["uniform"] == pytest.approx(np.log(2)) and np.isfinite(r["loss"]) and r["loss"] > 0
    # features that match their backgrounds exactly score far below log N
    with torch.no_grad():
        projected = projection(torch.as_tensor(f["background"])).numpy()
    matched = background_contrastive_loss(model, f["background"], projected, chunk=3)
    assert matched["loss"] < 0.1 * matched["uniform"] and matched["uniform"] == pytest.approx(np.log(3))
    with pytest.raises(ValueError, match="background embeddings"):
        background_contrastive_loss(model, f["background"], projected[:2])
