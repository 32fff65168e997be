"""The Hub-native form of EPBD: Parquet shards with embedded images and a README.md whose YAML lists
every config, so that ``datasets`` 5 loads it with no remote code::

    load_dataset("path/or/repo")                  # default: train, validation, test, test_unseen
    load_dataset("path/or/repo", "idr_round_2")   # train samples kept in IDR round 2

Folder written by :func:`export_epbd`::

    <out>/
      README.md                      dataset card; YAML ``configs:`` entries point at data/<config>/
      epbd_export.json               manifest: source, configs, thresholds, row counts
      data/default/<split>-00000-of-00001.parquet
      data/idr_round_1/train-00000-of-00001.parquet
      ...

Each config has its own folder, so :func:`add_round_config` adds a new round's config by writing
one new folder and rewriting only ``README.md`` and the manifest; :func:`push_epbd_to_hub` can then
upload just that config. Everything is written to a temporary folder first and moved into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from .layout import (
    SCORES_DIR,
    SPLITS,
    EPBDLayout,
    EPBDLayoutError,
    atomic_write_text,
    replace_dir,
    round_config_name,
    score_column,
)
from .preprocessing import EXPORT_MANIFEST

__all__ = ["export_epbd", "add_round_config", "push_epbd_to_hub", "read_manifest", "render_dataset_card",
           "EXPORT_MANIFEST"]

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "diffusers-product2img/epbd-export"
MANIFEST_VERSION = 1
DEFAULT_MAX_SHARD_SIZE = 500 * 2**20
_ROWS_PER_GROUP = 64  # image rows are large: keep Parquet row groups small for streaming readers


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (e.g. '500MB', '1GB', 1048576)")
    unit = (m.group(2) or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * factor)


def _metadata_sha(lay: EPBDLayout) -> str:
    h = hashlib.sha256()
    for s in lay.samples:
        h.update(json.dumps([s.id, s.product_name, s.category, s.split, sorted(s.extra.items())]).encode())
    return h.hexdigest()


def _ids_sha(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _write_split(lay: EPBDLayout, split: str, round_index: int, threshold, features, folder: Path,
                 max_shard_size: int) -> dict:
    """Stream one split of one config into ``<folder>/<split>-XXXXX-of-YYYYY.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = features.arrow_schema
    shards: list[Path] = []
    writer = None
    shard_bytes = 0
    batch: list[dict] = []
    counts: Counter = Counter()
    num_rows = 0

    def flush():
        nonlocal batch
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            batch = []

    for _, example in lay.iter_examples(split, round_index, threshold):
        size = sum(len(example[k]["bytes"]) for k in ("image", "cutout", "mask"))
        if writer is None or (shard_bytes and shard_bytes + size > max_shard_size):
            if writer is not None:
                flush()
                writer.close()
            shards.append(folder / f"{split}-{len(shards):05d}.parquet.partial")
            writer = pq.ParquetWriter(shards[-1], schema)
            shard_bytes = 0
        batch.append(features.encode_example(example))
        shard_bytes += size
        num_rows += 1
        if "quality" in example:
            counts[example["quality"]] += 1
        if len(batch) >= _ROWS_PER_GROUP:
            flush()
    if writer is None:
        what = f"IDR round {round_index}'s config" if round_index else "the dataset"
        raise EPBDLayoutError(f"split {split!r} of {what} has no samples (threshold {threshold}); nothing to export",
                              path=lay.root)
    flush()
    writer.close()
    files = []
    for i, partial in enumerate(shards):
        final = folder / f"{split}-{i:05d}-of-{len(shards):05d}.parquet"
        os.rename(partial, final)
        files.append(final.name)
    out = {"num_rows": num_rows, "files": files}
    if counts:
        out["quality"] = dict(sorted(counts.items()))
    return out


def _write_config(lay: EPBDLayout, config_name: str, round_index: int, threshold, folder: Path,
                  max_shard_size: int) -> dict:
    features = lay.features(round_index)
    folder.mkdir(parents=True)
    entry: dict[str, Any] = {"round": round_index, "splits": {},
                             "score_columns": [score_column(k) for k in lay.score_rounds(round_index)]}
    if round_index:
        thresholds = lay.thresholds(round_index, threshold)
        kept = lay.kept_ids(round_index, threshold)
        entry.update({"thresholds": thresholds, "custom_threshold": threshold is not None,
                      "kept_ids_sha256": _ids_sha(kept),
                      "candidates": [len(lay.kept_ids(k, thresholds)) for k in range(round_index)]})
    for split in lay.splits(round_index, threshold):
        entry["splits"][split] = _write_split(lay, split, round_index, threshold, features, folder, max_shard_size)
    return entry


def read_manifest(exported_dir: str | os.PathLike) -> dict:
    """The manifest of an exported EPBD folder (raises if the folder is not one)."""
    path = Path(exported_dir) / EXPORT_MANIFEST
    if not path.exists():
        raise EPBDLayoutError(f"no {EXPORT_MANIFEST}: not a folder written by export_epbd", path=exported_dir)
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise EPBDLayoutError(f"unexpected manifest format {manifest.get('format')!r}", path=path)
    return manifest


def _config_order(name: str, entry: dict) -> tuple:
    return (entry["round"], entry.get("custom_threshold", False), name)


def _yaml_configs(manifest: dict) -> list[dict]:
    configs = []
    for name, entry in sorted(manifest["configs"].items(), key=lambda kv: _config_order(*kv)):
        item: dict[str, Any] = {"config_name": name}
        if name == "default":
            item["default"] = True
        item["data_files"] = [{"split": split, "path": f"data/{name}/{split}-*"} for split in _ordered(entry["splits"])]
        configs.append(item)
    return configs


def _ordered(splits) -> list[str]:
    return sorted(splits, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "n>1M"


def render_dataset_card(manifest: dict, repo_id: str | None = None) -> str:
    """README.md text (YAML front matter + card) for an export, from its manifest alone."""
    from huggingface_hub import DatasetCard, DatasetCardData

    source = manifest["source"]
    synthetic = bool(source.get("synthetic"))
    name = source.get("name") or ("EPBD-synth" if synthetic else "EPBD")
    default = manifest["configs"]["default"]
    total = sum(s["num_rows"] for s in default["splits"].values())
    data = DatasetCardData(
        pretty_name=name,
        language=["en"],
        license=manifest.get("license"),
        size_categories=[_size_category(total)],
        task_categories=["image-to-image", "text-to-image"],
        tags=["e-commerce", "product-background-generation", "inpainting", "product2img", "idr-lmm"]
        + (["synthetic"] if synthetic else []),
        configs=_yaml_configs(manifest),
    )
    ref = repo_id or "path/to/epbd"
    rounds = sorted((e["round"], n, e) for n, e in manifest["configs"].items() if e["round"])
    extra_cols = [c for c in manifest.get("extra_columns", [])]
    lines = [
        f"# {name}",
        "",
        ("A procedurally generated stand-in for EPBD with the same schema (EPBD-synth, generated by "
         "`diffusers_product2img.data.synth`). Each category has a product shape family and a *right* "
         "background scene; some training samples are planted low quality, and the `quality` column "
         "holds the ground truth so that scorers and the data-refinement loop can be measured. "
         "Models never read `quality` or `scene`.")
        if synthetic else
        ("The E-commerce Product Background Dataset (EPBD) of *Product2Img: Prompt-Free E-commerce Product "
         "Background Generation with Diffusion Model and Self-Improved LMM* (section 3): designer-made "
         "512x512 product images with contextually relevant backgrounds, the product cutouts and English "
         "product names."),
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("{ref}")                      # train / validation / test / test_unseen',
    ]
    plain_rounds = [(k, cname) for k, cname, e in rounds if not e.get("custom_threshold")]
    if plain_rounds:
        k, cname = plain_rounds[-1]
        lines.append(f'kept = load_dataset("{ref}", "{cname}", split="train")  # train samples kept in IDR round {k}')
    lines += [
        "```",
        "",
        "No loading script and no remote code: the configs below are Parquet files listed in this card's YAML.",
        "",
        "## Fields",
        "",
        "| field | type | description |",
        "|---|---|---|",
        "| `id` | string | unique sample id (also the file stem in the raw layout) |",
        "| `product_name` | string | the English product name, the model's only text input |",
        "| `category` | string | product category |",
        "| `image` | Image (RGB) | the product image with its designed background (the target) |",
        "| `cutout` | Image (RGBA) | the product cut out of `image`; alpha = product |",
        "| `mask` | Image (L) | product mask, 255 = product (from the cutout's alpha when the raw data had none) |",
    ]
    for col in default.get("score_columns", []):
        k = col.rsplit("_", 1)[-1]
        lines.append(f"| `{col}` | float64 | the LMM's score in IDR round {k} (null if not scored in that round) |")
    if "quality" in extra_cols:
        lines.append("| `quality` | string | ground truth: `good`, `wrong_scene`, `plain_white`, `watermark` or `clutter` "
                     "(synthetic data only; never a model input) |")
    if "scene" in extra_cols:
        lines.append("| `scene` | string | the background scene family actually drawn (synthetic data only) |")
    for col in extra_cols:
        if col not in ("quality", "scene"):
            lines.append(f"| `{col}` | string | carried over from the raw metadata |")
    lines += ["", "## Splits (config `default`)", "", "| split | rows |", "|---|---|"]
    for split in _ordered(default["splits"]):
        info = default["splits"][split]
        lines.append(f"| `{split}` | {info['num_rows']} |")
    lines += [
        "",
        "`test_unseen` holds categories absent from `train` (the paper's generalisation test).",
        "",
        "## IDR-LMM subsets",
        "",
        "Iterative Data Refinement with a Self-improved LMM (paper section 4.4): in round *k* an LMM scores "
        "the training samples kept in round *k-1*, and those with score >= gamma (default 4) are kept. "
        "Config `idr_round_<k>` holds the train samples kept after round *k* (chained: each round filters "
        "the previous one), with the scores of rounds 1..k. A `_gamma<t>` suffix marks a custom threshold.",
        "",
    ]
    if rounds:
        has_quality = any("quality" in e["splits"]["train"] for _, _, e in rounds)
        header = "| config | round | thresholds | candidates | kept |" + (" kept `good` share |" if has_quality else "")
        lines += [header, "|---|---|---|---|---|" + ("---|" if has_quality else "")]
        for k, cname, e in rounds:
            kept = e["splits"]["train"]["num_rows"]
            row = (f"| `{cname}` | {k} | {', '.join(f'{t:g}' for t in e['thresholds'])} | "
                   f"{e['candidates'][-1]} | {kept} |")
            if has_quality:
                q = e["splits"]["train"].get("quality", {})
                row += f" {q.get('good', 0) / kept:.1%} |" if kept else " - |"
            lines.append(row)
        lines.append("")
    else:
        lines += ["No refinement round has been scored yet.", ""]
    lines += [
        "Rounds with a stricter threshold can be taken from a round config, e.g. with "
        "`diffusers_product2img.data.load_epbd(path, \"idr_round_1\", threshold=4.5)`; looser ones need the "
        "raw data and the builder (`dataset_scripts/epbd/epbd.py`).",
        "",
        "## Source",
        "",
        f"Exported from a raw EPBD folder by `diffusers_product2img.data.export` (manifest: `{EXPORT_MANIFEST}`)."
        + (f" Resolution {source['resolution']}x{source['resolution']}." if source.get("resolution") else ""),
        "",
        "```bibtex",
        "@inproceedings{product2img2024,",
        "  title     = {Product2IMG: Prompt-Free E-commerce Product Background Generation with Diffusion Model "
        "and Self-Improved LMM},",
        "  booktitle = {ACM Multimedia},",
        "  year      = {2024}",
        "}",
        "```",
        "",
    ]
    return str(DatasetCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines)))


def _write_card_and_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_text(folder / EXPORT_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    atomic_write_text(folder / "README.md", render_dataset_card(manifest, manifest.get("repo_id")))


def export_epbd(
    raw_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rounds: list[int] | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    license: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Export a raw EPBD folder to its Hub-native form (Parquet + README.md configs).

    Args:
        raw_root: the raw layout (real EPBD or EPBD-synth).
        out_dir: the folder to write; built in a temporary sibling and moved into place at the end,
            so a failure leaves nothing half-exported.
        rounds: IDR rounds to export as ``idr_round_<k>`` configs (default: every scored round).
        overwrite: replace an existing ``out_dir``.
        max_shard_size: bytes (or "500MB") of images per Parquet shard.
        license: the card's license id (default: none for real EPBD, ``apache-2.0`` for EPBD-synth).
        repo_id: the Hub repo this export is meant for (used in the card's examples only).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    lay = EPBDLayout(raw_root)
    rounds = list(lay.rounds) if rounds is None else [int(k) for k in rounds]
    for k in rounds:
        lay.require_round(k)
    lay.validate_files()  # fail before writing anything
    max_bytes = _parse_size(max_shard_size)
    synthetic = bool(lay.info.get("synthetic"))
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "license": license or ("apache-2.0" if synthetic else None),
        "repo_id": repo_id,
        "source": {"name": lay.info.get("name"), "synthetic": synthetic, "resolution": lay.resolution,
                   "metadata_sha256": _metadata_sha(lay), "num_samples": len(lay.samples)},
        "extra_columns": list(lay.extra_columns),
        "configs": {},
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        manifest["configs"]["default"] = _write_config(lay, "default", 0, None, tmp / "data" / "default", max_bytes)
        for k in rounds:
            name = round_config_name(k)
            manifest["configs"][name] = _write_config(lay, name, k, None, tmp / "data" / name, max_bytes)
        _write_card_and_manifest(tmp, manifest)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def add_round_config(
    exported_dir: str | os.PathLike,
    raw_root: str | os.PathLike,
    round_index: int,
    *,
    threshold: float | None = None,
    config_name: str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> str:
    """Add IDR round ``round_index``'s config to an export without rewriting the other configs.

    Writes ``data/<config>/`` (built in a temporary folder inside the export, then renamed) and
    rewrites only ``README.md`` and the manifest. ``threshold`` (one gamma for every round) makes a
    custom config, named ``idr_round_<k>_gamma<t>`` unless ``config_name`` is given. Raises if the raw
    folder is not the export's source, or if earlier rounds' scores changed since they were exported.
    Returns the config name.
    """
    exported_dir = Path(exported_dir)
    manifest = read_manifest(exported_dir)
    lay = EPBDLayout(raw_root)
    round_index = int(round_index)
    if round_index < 1:
        raise ValueError(f"round_index must be >= 1, got {round_index}")
    if _metadata_sha(lay) != manifest["source"]["metadata_sha256"]:
        raise EPBDLayoutError("this raw folder's metadata differs from the one the export was made from; "
                              "re-export instead", path=lay.root)
    lay.require_round(round_index)
    name = config_name or round_config_name(round_index, threshold)
    if name == "default" or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(f"invalid config name {name!r}")
    if name in manifest["configs"] and not overwrite:
        raise EPBDLayoutError(f"config {name!r} already exists; pass overwrite=True to rebuild it", path=exported_dir)
    for other, entry in manifest["configs"].items():
        k = entry["round"]
        if k and not entry.get("custom_threshold") and k < round_index:
            if _ids_sha(lay.kept_ids(k, entry["thresholds"])) != entry["kept_ids_sha256"]:
                raise EPBDLayoutError(
                    f"the scores of rounds <= {k} changed since config {other!r} was exported; a new round "
                    f"would not chain onto it. Re-export the dataset", path=lay.root / SCORES_DIR)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=exported_dir))
    try:
        entry = _write_config(lay, name, round_index, threshold, tmp / name, _parse_size(max_shard_size))
        (exported_dir / "data").mkdir(exist_ok=True)
        replace_dir(tmp / name, exported_dir / "data" / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest["configs"][name] = entry
    _write_card_and_manifest(exported_dir, manifest)
    return name


def push_epbd_to_hub(
    exported_dir: str | os.PathLike,
    repo_id: str,
    api: Any = None,
    token: str | None = None,
    private: bool | None = None,
    *,
    configs: list[str] | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
):
    """Upload an exported EPBD folder to a Hub dataset repo.

    Args:
        exported_dir: a folder written by :func:`export_epbd`.
        repo_id: ``"user/epbd"``; created (as a dataset repo) if missing.
        api: an ``HfApi``-like object (default ``huggingface_hub.HfApi()``); tests pass a fake.
        token: Hub token; defaults to the ``HF_TOKEN`` environment variable (never logged).
        private: visibility of a newly created repo (``None``: the Hub's default).
        configs: upload only these configs' Parquet folders (plus README.md and the manifest), e.g.
            ``["idr_round_3"]`` after :func:`add_round_config`; default: everything.
        revision: a branch to push to (created if missing).
    Returns:
        what ``api.upload_folder`` returns (a ``CommitInfo`` for the real API).
    """
    exported_dir = Path(exported_dir)
    manifest = read_manifest(exported_dir)
    if not (exported_dir / "README.md").exists():
        raise EPBDLayoutError("README.md is missing: not a complete export", path=exported_dir)
    token = token if token is not None else os.environ.get("HF_TOKEN")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    allow_patterns = None
    if configs:
        unknown = [c for c in configs if c not in manifest["configs"]]
        if unknown:
            raise ValueError(f"unknown config(s) {unknown}; this export has {sorted(manifest['configs'])}")
        allow_patterns = [f"data/{c}/*" for c in configs] + ["README.md", EXPORT_MANIFEST]
    what = ", ".join(configs) if configs else ", ".join(sorted(manifest["configs"]))
    logger.info("pushing EPBD export %s (%s) to dataset repo %s", exported_dir, what, repo_id)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True, token=token)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True, token=token)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(exported_dir),
        repo_type="dataset",
        revision=revision,
        commit_message=commit_message or f"Upload EPBD configs: {what}",
        allow_patterns=allow_patterns,
        ignore_patterns=[".*", "**/.*", "*.partial"],
        token=token,
        create_pr=create_pr,
    )
