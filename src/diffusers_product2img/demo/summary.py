"""Aggregate the demo's per-seed results into the paper-style tables, the report and ``tables.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .report import Report, fmt_mean_std, format_table, image_grid, mean_std

__all__ = ["write_outputs", "table2_rows", "table3_rows", "selection_rows", "effects", "alignment_rows"]

SPLITS = ("test", "test_unseen")
SPLIT_TITLES = {"test": "test (seen categories)", "test_unseen": "test_unseen (unseen categories)"}
# (key, header, multiplier, decimals, better)
METRICS = (
    ("SceneAcc", "Scene acc. % ↑", 100.0, 1, "higher"),
    ("DefectRate", "Defects % ↓", 100.0, 1, "lower"),
    ("FD-BG", "FD-BG ↓", 1.0, 1, "lower"),
)


def _arm_eval(seed_result: dict, arm: str, index: int | None = None) -> dict:
    if arm == "idr":
        return seed_result["idr"][index]["eval"]
    if arm == "no_idr":
        return seed_result["no_idr"][index]["eval"]
    return seed_result["no_cba"]["eval"]


def _values(seeds: dict, arm: str, index: int | None, split: str, key: str) -> list:
    return [_arm_eval(r, arm, index)[split]["metrics"].get(key) for r in seeds.values()]


def _metric_cells(seeds, arm, index, split) -> list[str]:
    cells = [fmt_mean_std(_values(seeds, arm, index, split, key), mult, dec) for key, _, mult, dec, _ in METRICS]
    per_seed = _values(seeds, arm, index, split, "SceneAcc")
    cells.append(" / ".join("-" if v is None else f"{100 * v:.0f}" for v in per_seed))
    return cells


def _header(first: str) -> list[str]:
    return [first] + [h for _, h, _, _, _ in METRICS] + ["Scene acc. % per seed"]


def table2_rows(seeds: dict, split: str) -> list[list[str]]:
    """Table 2 (CBA ablation, round 1): with CBA (IDR round 1) vs without CBA, same data and steps."""
    return [["Product2Img (CBA)"] + _metric_cells(seeds, "idr", 1, split),
            ["w/o CBA"] + _metric_cells(seeds, "no_cba", None, split)]


def table3_rows(seeds: dict, split: str, round_steps) -> list[list[str]]:
    """Table 3 (IDR-LMM): rounds 1..R vs the same cumulative steps without IDR."""
    rows = []
    for i in range(1, len(round_steps) + 1):
        rows.append([f"Round {i} ({sum(round_steps[:i])})"] + _metric_cells(seeds, "idr", i, split))
    for i in range(1, len(round_steps) + 1):
        rows.append([f"w/o IDR-LMM ({sum(round_steps[:i])})"] + _metric_cells(seeds, "no_idr", i, split))
    return rows


SELECTION_COLUMNS = (
    ("candidates", "Candidates", None), ("kept", "Kept", None), ("removed", "Removed", None),
    ("precision", "Rejection precision %", 100.0), ("recall", "Low-quality removed this round % (recall)", 100.0),
    ("good_removed_fraction", "Good removed %", 100.0),
    ("cumulative_low_quality_removed", "Planted low-quality removed so far %", 100.0),
    ("low_quality_share_after", "Low-quality share of D_i %", 100.0),
)


ALIGNMENT_HEADER = ["Model", "split", "`<background>` scene agreement % ↑", "`<eos>` scene agreement % ↑", "chance %",
                    "L'cl(b, B) on test products (log N)"]


def alignment_rows(alignment: dict) -> list[list[str]]:
    """The CBA mechanism check (:mod:`.alignment`): per model and split, mean ± std over seeds."""
    from .alignment import ARMS

    rows = []
    models = alignment["models"]
    for label, _, _ in ARMS:
        for split in SPLITS:
            per_seed = [m[label][split] for m in models.values()]
            cells = [fmt_mean_std([r[pos]["agreement"] for r in per_seed], 100, 1) for pos in ("background", "eos")]
            cells.append(fmt_mean_std([per_seed[0]["background"]["chance"]], 100, 1))
            losses = [r["background_loss"] for r in per_seed if r["background_loss"]]
            cells.append(f"{fmt_mean_std([x['loss'] for x in losses], 1, 2)} ({losses[0]['uniform']:.2f})"
                         if losses else "- (no CBA head)")
            rows.append([label, split, *cells])
    return rows


def selection_rows(seeds: dict, rounds: int) -> list[list[str]]:
    rows = []
    for r in range(1, rounds + 1):
        row = [f"Round {r}"]
        for key, _, mult in SELECTION_COLUMNS:
            vals = [s["idr"][r]["selection"].get(key) for s in seeds.values()]
            row.append(fmt_mean_std(vals, mult or 1.0, 1 if mult else 0))
        rows.append(row)
    return rows


def per_kind_rows(seeds: dict, rounds: int) -> list[list[str]]:
    """Cumulative share of each planted defect kind removed after each round (mean over seeds)."""
    kinds = sorted({k for s in seeds.values() for k in s["idr"][1]["selection"]["by_kind"]})
    rows = []
    for kind in kinds:
        row = [kind]
        for r in range(1, rounds + 1):
            vals = []
            for s in seeds.values():
                planted = s["idr"][1]["selection"]["by_kind"].get(kind, {}).get("candidates", 0)
                sel = s["idr"][r]["selection"]["by_kind"].get(kind)
                remaining = (sel["candidates"] - sel["removed"]) if sel else 0
                vals.append((planted - remaining) / planted if planted else None)
            row.append(fmt_mean_std(vals, 100.0, 1))
        rows.append(row)
    return rows


def _diffs(a: list, b: list) -> list:
    return [None if x is None or y is None else x - y for x, y in zip(a, b)]


def effects(seeds: dict, round_steps) -> list[dict]:
    """Did the paper's direction show? Per comparison, split and metric: mean difference and seed votes."""
    last = len(round_steps)
    comparisons = [("CBA (Table 2): with vs without CBA, round 1", ("idr", 1), ("no_cba", None))]
    for i in range(1, last + 1):
        comparisons.append((f"IDR-LMM (Table 3): round {i} vs w/o IDR at {sum(round_steps[:i])} steps",
                            ("idr", i), ("no_idr", i)))
    comparisons.append((f"IDR-LMM over rounds: round {last} vs round 1", ("idr", last), ("idr", 1)))
    out = []
    for title, (arm_a, i_a), (arm_b, i_b) in comparisons:
        for split in SPLITS:
            for key, _, _, _, better in METRICS:
                d = _diffs(_values(seeds, arm_a, i_a, split, key), _values(seeds, arm_b, i_b, split, key))
                valid = [x for x in d if x is not None]
                agree = [x for x in valid if (x > 0 if better == "higher" else x < 0)]
                m, sd = mean_std(valid)
                out.append({"comparison": title, "split": split, "metric": key, "better": better,
                            "mean_difference": m, "std_difference": sd, "per_seed_difference": d,
                            "seeds_in_paper_direction": len(agree), "seeds": len(valid),
                            "verdict": _verdict(m, sd, len(valid), len(agree), better)})
    return out


def _verdict(mean, sd, n, agree, better) -> str:
    """``shows``: the mean difference points the paper's way, most seeds agree and the mean is at least two
    standard errors of the per-seed differences from zero; ``direction only``: the first two but not the third;
    ``not shown``: otherwise; ``one seed``: no spread to judge with."""
    if mean is None:
        return "no data"
    right_way = mean > 0 if better == "higher" else mean < 0
    if n < 2:
        return "one seed: direction only" if right_way else "one seed: not shown"
    if not right_way or agree * 2 <= n:
        return "not shown"
    return "shows" if abs(mean) >= 2 * sd / n ** 0.5 else "direction only (not significant)"


def _effect_text(e: dict) -> str:
    mult = 100.0 if e["metric"] in ("SceneAcc", "DefectRate") else 1.0
    unit = " pp" if mult == 100.0 else ""
    per_seed = ", ".join("-" if x is None else f"{x * mult:+.1f}" for x in e["per_seed_difference"])
    return (f"{e['comparison']}, {e['split']}, {e['metric']}: {e['mean_difference'] * mult:+.1f}{unit} "
            f"(per seed {per_seed}; paper's direction in {e['seeds_in_paper_direction']}/{e['seeds']} seeds) "
            f"-> {e['verdict']}")


def _load_state(path: str):
    from ..idr.rounds import IDRState, RoundRecord

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return IDRState(config=data["config"], rounds={int(k): RoundRecord(**v) for k, v in data["rounds"].items()})


def _open(path: Path):
    from PIL import Image

    if not path.exists():
        return None
    with Image.open(path) as im:
        return im.convert("RGB")


def _grids(out: Path, settings, seeds: dict, splits: dict) -> list[tuple[str, str]]:
    seed = settings.seeds[0]
    root = out / "runs" / f"seed-{seed}" / "eval"
    rounds = len(settings.round_steps)
    columns = ["real"] + ([] if not settings.table1 else ["base"]) + [f"round {i}" for i in range(1, rounds + 1)]
    columns += [f"w/o IDR ({sum(settings.round_steps)})", "w/o CBA (r1)"]
    made = []
    (out / "grids").mkdir(exist_ok=True)
    for split in SPLITS:
        rows = []
        for s in splits[split][: settings.grid_products]:
            cutout = s.product_image.convert("RGBA")
            cutout.putalpha(s.product_mask)
            images = {"real": s.reference}
            if settings.table1 and split == "test":
                images["base"] = _open(out / "table1" / "sd-inpainting" / f"{s.id}.png")
            for i in range(1, rounds + 1):
                images[f"round {i}"] = _open(root / f"idr-round-{i}" / split / "product2img" / f"{s.id}.png")
            images[columns[-2]] = _open(root / f"no-idr-{rounds}" / split / "product2img" / f"{s.id}.png")
            images["w/o CBA (r1)"] = _open(root / "no-cba" / split / "product2img" / f"{s.id}.png")
            rows.append({"cutout": cutout, "name": s.product_name, "images": images})
        if rows:
            path = out / "grids" / f"{split}.png"
            image_grid(rows, columns).save(path)
            made.append((split, os.path.relpath(path, out)))
    return made


def write_outputs(out: Path, settings, world, seeds: dict, table1: dict | None, splits: dict, progress,
                  alignment: dict | None = None) -> dict:
    """Write report.md, report.html, tables.json, rounds.png and the grids; print the ablation tables."""
    from ..idr.rounds import data_size_plot, round_summary_rows
    from .run import SELECTION
    from .standins import BG_FEATURES, STANDIN_COLUMNS

    rounds = len(settings.round_steps)
    steps = tuple(settings.round_steps)
    first = seeds[settings.seeds[0]]
    state = _load_state(first["idr_state"])
    n_train = first["idr"][1]["candidates"]
    data_size_plot(state, out / "rounds.png", total_train=n_train)
    grids = _grids(out, settings, seeds, splits)
    eff = effects(seeds, steps)

    tables = {
        "table2": {split: {"header": _header("CBA ablation (round 1)"), "rows": table2_rows(seeds, split)}
                   for split in SPLITS},
        "table3": {split: {"header": _header("IDR-LMM (cumulative steps)"), "rows": table3_rows(seeds, split, steps)}
                   for split in SPLITS},
        "selection": {"header": ["Round"] + [h for _, h, _ in SELECTION_COLUMNS],
                      "rows": selection_rows(seeds, rounds)},
        "selection_by_kind": {"header": ["Planted defect"] + [f"removed after round {r} %" for r in range(1, rounds + 1)],
                              "rows": per_kind_rows(seeds, rounds)},
    }
    if alignment is not None:
        tables["cba_alignment"] = {"header": ALIGNMENT_HEADER, "rows": alignment_rows(alignment),
                                   "image_side": alignment["image_side"]}
    payload = {
        "mode": settings.mode, "settings": settings.to_json(), "selection_protocol": SELECTION,
        "world": {"vae": world.vae_info, "timings": world.timings, "data_root": str(world.data_root)},
        "standin_features": BG_FEATURES, "tables": tables, "effects": eff,
        "seeds": {str(k): v for k, v in seeds.items()}, "table1": table1,
        "idr_rounds_seed0": round_summary_rows(state), "timings": {k: round(v, 1) for k, v in progress.marks.items()},
        "elapsed_seconds": round(progress.elapsed(), 1), "cba_alignment": alignment,
    }

    rep = Report("Product2Img offline demo on EPBD-synth")
    small = settings.mode != "full"
    rep.text(
        f"Mode **{settings.mode}**, seeds {list(settings.seeds)}, run time {progress.elapsed() / 60:.1f} min. "
        "Everything ran offline: EPBD-synth, a small pretrained demo world (autoencoder + inpainting UNet), "
        "IDR-LMM against the simulated LMM server through the real `openai` client, CBA training with "
        "`examples/train_product2img.py`, evaluation with weight-free stand-in metrics.")
    if small:
        rep.text("**This is a reduced run** (fewer samples, steps and seeds) to check that the pipeline works end to "
                 "end; its numbers are not meant to show the paper's ablations. Run the full mode for those.")
    rep.heading("Settings")
    rep.bullets([
        f"World: EPBD-synth seed {settings.world.seed}, {settings.world.resolution} px, {settings.world.num_train} train "
        f"({settings.world.low_quality_rate:.0%} planted low quality), {settings.world.num_validation} validation, "
        f"{len(splits['test'])} test, {len(splits['test_unseen'])} test_unseen",
        f"Training (every arm): batch {settings.train_batch_size}, UNet + `<background>` lr {settings.learning_rate:g}, "
        f"text encoder + projection lr {settings.text_encoder_learning_rate:g}, warmup {settings.lr_warmup_steps} + "
        f"cosine, CBA lambda {settings.cba_weight:g}, tau 0.05; IDR gamma {settings.gamma:g}, round steps "
        f"{list(steps)} (the paper's 3000/1000/1000 scaled down)",
        f"Sampling: Euler Ancestral, {settings.inference_steps} steps, guidance scale {settings.guidance_scale:g}; "
        "image i of a split uses seed 10000 x seed + i for every model (paired comparisons)",
        f"The UNet learning rate and the guidance scale were chosen on the validation split (at "
        f"{SELECTION.get('steps', '?')} steps, batch {SELECTION.get('batch_size', '?')}; see below); the test splits "
        "are reported only. The paper's 1e-5 / 1e-6 are for fine-tuning the real SD; a tiny model pretrained for "
        "a few minutes needs larger ones. The same settings are used by every arm and seed.",
        f"Stand-in metrics (no downloaded weights): scene accuracy = the fixed procedural classifier's scene of the "
        f"generated background equals the product category's scene family; defects = plain white / watermark / "
        f"clutter detected; FD-BG = Fréchet distance to the real test images on {BG_FEATURES}",
    ])
    if SELECTION.get("rows"):
        rep.heading("How the demo world's settings were chosen (validation split only)")
        rep.text(f"`{SELECTION['command']}`: {SELECTION['note']}")
        rep.table(["UNet lr", "guidance", "val. scene acc. %", "val. defects %", "val. FD-BG"],
                  [[f"{r['learning_rate']:g}", f"{r['guidance_scale']:g}", f"{100 * r['SceneAcc']:.1f}",
                    f"{100 * r['DefectRate']:.1f}", f"{r['FD-BG']:.1f}"] for r in SELECTION["rows"]],
                  caption=f"{SELECTION['n_validation']} validation products, seed {SELECTION['seed']}, "
                          f"{SELECTION['steps']} steps, batch {SELECTION['batch_size']}, CBA, all training data")
    rep.heading("The demo world")
    vae = world.vae_info
    rep.bullets([
        f"Autoencoder: {vae.get('channels', '?')} channels, {vae.get('downsampling', '?')}x downsampling, pretrained "
        f"{vae.get('steps', '?')} steps on the train images; the scene class survives reconstruction for "
        f"{_pct(vae.get('scene_kept'))} of validation images (mean abs. error "
        f"{vae.get('mean_abs_error_0_255', float('nan')):.1f}/255)",
        f"Inpainting UNet: pretrained {vae.get('unet_pretrain_steps', '?')} steps on {vae.get('pretrain_images', '?')} "
        "generic images (any product in any scene, scene captions), so it can draw scenes but does not know which "
        "scene suits which product (the role of SD-Inpainting in the paper)",
        f"Timings (s): {json.dumps(world.timings)}",
    ])

    rep.heading("IDR-LMM data refinement (Figure 8 and the planted ground truth)")
    rep.image("rounds.png", f"Figure 8: training-set size per round and LMM score distribution (seed {settings.seeds[0]})")
    rep.table(tables["selection"]["header"], tables["selection"]["rows"],
              caption=f"Selection against the ground truth, mean ± std over seeds {list(settings.seeds)}. "
                      "Precision: removed samples that were planted low quality; recall: planted low-quality "
                      "candidates that the round removed.")
    rep.table(tables["selection_by_kind"]["header"], tables["selection_by_kind"]["rows"],
              caption="Cumulative share of each planted defect kind removed (mean ± std over seeds)")
    rep.bullets([f"round {r['round']}: feedback used `{r['feedback_used'] or '-'}`" for r in round_summary_rows(state)])

    for key, title in (("table2", "Table 2: CBA ablation (round 1, same data, same steps)"),
                       ("table3", "Table 3: IDR-LMM rounds vs the same steps without IDR-LMM")):
        rep.heading(title)
        for split in SPLITS:
            rep.table(tables[key][split]["header"], tables[key][split]["rows"],
                      caption=f"{SPLIT_TITLES[split]}; mean ± std over seeds {list(settings.seeds)}")

    if alignment is not None:
        img = alignment["image_side"]
        rep.heading("CBA mechanism check: do the names' text features group by scene?")
        rep.text("CBA should pull a name's `<background>` feature towards its background's CLIP embedding, so that "
                 "names of *different* categories sharing a scene family end up neighbours. Scene agreement: for each "
                 "test name, its nearest training name of another category (cosine, text encoder output) has the "
                 "same scene family. Image side, the target CBA aligns to (CLIP background embeddings of "
                 f"{alignment['image_side_samples']} clean training images, same measure): "
                 f"**{_pct1(img['agreement'])}** (chance {_pct1(img['chance'])}). The last column is CBA's "
                 "background loss on test products with the model's own projection, beside log N, the loss of "
                 "features that cannot tell the products apart.")
        rep.table(ALIGNMENT_HEADER, tables["cba_alignment"]["rows"],
                  caption=f"mean ± std over seeds {list(settings.seeds)}")

    rep.heading("Did the paper's direction show?")
    rep.text("Per comparison: mean difference (first minus second), per-seed differences (paired: same test "
             "products, same noise), and in how many seeds the difference points the paper's way (higher scene "
             "accuracy, fewer defects, lower FD-BG). **shows**: the mean points that way, most seeds agree and the mean "
             "is at least two standard errors (of the per-seed differences) from zero; **direction only**: the first "
             "two but not the third; **not shown**: otherwise.")
    rep.bullets([_effect_text(e) for e in eff])

    if table1 is not None:
        rep.heading(f"Table 1 style (plumbing check, seed {settings.seeds[0]} models, test split)")
        rep.text("**Plumbing only**: FD-CLIP, PickScore, Aesthetics and CLIP-c-I/-B below are computed by the package's "
                 "metrics library with a *random* tiny CLIP (and a random aesthetic head) so that the code path runs "
                 "offline; they are not comparable to the paper's numbers and carry no meaning here. The stand-in "
                 "columns are the meaningful ones.")
        cols = ("FD-CLIP", "PickScore", "Aesthetics", "CLIP-c-I", "CLIP-c-B")
        header = ["Method"] + [f"{c} (tiny CLIP)" for c in cols] + [h for _, h, _, _, _ in STANDIN_COLUMNS]
        rows = []
        for name, metrics in table1["metrics"].items():
            st = table1["standins"][name]["metrics"]
            row = [name] + ["-" if metrics.get(c) is None else f"{metrics[c]:.2f}" for c in cols]
            row += ["-" if st.get(k) is None else f"{st[k] * m:.{d}f}" for k, _, _, m, d in STANDIN_COLUMNS]
            rows.append(row)
        rep.table(header, rows)
        tables["table1"] = {"header": header, "rows": rows}

    rep.heading(f"Image grids (seed {settings.seeds[0]})")
    for split, path in grids:
        rep.image(path, f"{SPLIT_TITLES[split]}: input cutout, product name, the real image, then each model's output")

    rep.heading("Per-seed numbers")
    header = ["Seed", "Model"] + [f"{split} {h}" for split in SPLITS for _, h, _, _, _ in METRICS]
    rows = []
    for seed, r in seeds.items():
        arms = [(f"round {i}", "idr", i) for i in range(1, rounds + 1)]
        arms += [(f"w/o IDR {i}", "no_idr", i) for i in range(1, rounds + 1)] + [("w/o CBA", "no_cba", None)]
        for label, arm, idx in arms:
            ev = _arm_eval(r, arm, idx)
            cells = []
            for split in SPLITS:
                for key, _, mult, dec, _ in METRICS:
                    v = ev[split]["metrics"].get(key)
                    cells.append("-" if v is None else f"{v * mult:.{dec}f}")
            rows.append([str(seed), label] + cells)
    rep.table(header, rows)
    tables["per_seed"] = {"header": header, "rows": rows}

    rep.heading("Timings")
    rep.bullets([f"{k}: {v:.1f} s" for k, v in sorted(progress.marks.items())] +
                [f"total: {progress.elapsed():.1f} s"])
    rep.heading("Files")
    rep.bullets(["`tables.json`: every number of this report (and per-image scene/defect counts per model)",
                 "`runs/seed-<s>/`: each seed's EPBD-synth copy with the round scores, the IDR state "
                 "(`idr/idr_state.json`), the LMM result store, the models and their generated images",
                 "`world/`: EPBD-synth, its Parquet export, the demo world's base model and tiny CLIP",
                 "`table1/`: the Table-1 harness output (`metrics.md`, `metrics.json`, `benchmark.json`)"])
    paths = rep.write(out)

    tmp = out / ".tables.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out / "tables.json")

    if not progress.quiet:
        for key, title in (("table2", "Table 2 (CBA, round 1)"), ("table3", "Table 3 (IDR-LMM)")):
            for split in SPLITS:
                print(f"\n{title}, {SPLIT_TITLES[split]}:")
                print(format_table(tables[key][split]["header"], tables[key][split]["rows"]))
        print("\nIDR-LMM selection vs the planted ground truth:")
        print(format_table(tables["selection"]["header"], tables["selection"]["rows"]))
        print(format_table(tables["selection_by_kind"]["header"], tables["selection_by_kind"]["rows"]))
        if alignment is not None:
            print(f"\nCBA mechanism check (image side: {_pct1(alignment['image_side']['agreement'])}, chance "
                  f"{_pct1(alignment['image_side']['chance'])}):")
            print(format_table(ALIGNMENT_HEADER, tables["cba_alignment"]["rows"]))
        print("\nEffects (scene accuracy):")
        for e in eff:
            if e["metric"] == "SceneAcc":
                print("  " + _effect_text(e))
        print(f"\nreport: {paths['markdown']}  {paths['html']}")
    return payload


def _pct(v) -> str:
    return "?" if v is None else f"{100 * v:.0f}%"


def _pct1(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"
