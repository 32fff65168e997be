"""The raw EPBD layout on disk: the one place that reads, validates and writes it.

A raw EPBD root (real EPBD, or EPBD-synth from :mod:`.synth`) looks like this::

    <root>/
      metadata.csv          one row per sample: id, product_name, category, split[, extra columns]
                            (metadata.jsonl with the same keys is accepted instead)
      epbd.json             optional: {"name": ..., "resolution": 512, ...}
      images/<id>.png       the product image with its designed background (RGB)
      cutouts/<id>.png      the product cutout, same size as the image, alpha = product (RGBA)
      masks/<id>.png        optional product mask (L, 255 = product); derived from the cutout's
                            alpha when absent
      scores/round_<k>.csv  optional IDR-LMM scores of round k: id, category, score
      scores/round_<k>.json its settings: {"round": k, "threshold": 4.0, ...}

* ``id`` is a file-name-safe string (letters, digits, ``_ - .``), unique over the whole dataset.
* ``split`` is one of :data:`SPLITS`; ``test_unseen`` categories must not appear in ``train``.
* Optional columns ``image_file``, ``cutout_file``, ``mask_file`` give paths relative to the root
  when the files do not follow the ``images/<id>.png`` convention (e.g. JPEG images).
* Every other column (EPBD-synth has ``quality`` and ``scene``) is carried along as a string.
* If ``epbd.json`` declares ``resolution``, every image must be that size (EPBD: 512x512);
  cutouts and masks must always have the size of their image.

Round k of IDR-LMM (paper section 4.4) keeps the train samples kept in round k-1 whose round-k
score is >= that round's threshold gamma (default 4); round 0 is the whole train split. Round k's
scores must cover every sample kept in round k-1 and may only name train samples.

Every problem raises :class:`EPBDLayoutError` naming the sample id and the file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from PIL import Image

from ..placement import has_alpha, product_mask_from_alpha, to_product_mask

__all__ = [
    "EPBDLayoutError",
    "EPBDMissingScoresError",
    "EPBDLayout",
    "Sample",
    "SPLITS",
    "REQUIRED_COLUMNS",
    "METADATA_FILE",
    "INFO_FILE",
    "IMAGES_DIR",
    "CUTOUTS_DIR",
    "MASKS_DIR",
    "SCORES_DIR",
    "DEFAULT_THRESHOLD",
    "score_column",
    "round_config_name",
    "default_image_path",
    "default_cutout_path",
    "default_mask_path",
    "read_metadata",
    "write_metadata",
    "write_info",
    "write_round_scores",
    "read_round_scores",
    "kept_ids",
    "available_rounds",
    "replace_dir",
]

METADATA_FILE = "metadata.csv"
METADATA_JSONL_FILE = "metadata.jsonl"
INFO_FILE = "epbd.json"
IMAGES_DIR = "images"
CUTOUTS_DIR = "cutouts"
MASKS_DIR = "masks"
SCORES_DIR = "scores"
SPLITS: tuple[str, ...] = ("train", "validation", "test", "test_unseen")
REQUIRED_COLUMNS: tuple[str, ...] = ("id", "product_name", "category", "split")
PATH_COLUMNS: tuple[str, ...] = ("image_file", "cutout_file", "mask_file")
DEFAULT_THRESHOLD = 4.0
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_ROUND_RE = re.compile(r"^round_(\d+)\.csv$")


class EPBDLayoutError(ValueError):
    """A problem with a raw EPBD folder; names the sample id and the file when there is one."""

    def __init__(self, message: str, sample_id: str | None = None, path: str | os.PathLike | None = None):
        self.sample_id = sample_id
        self.path = None if path is None else str(path)
        prefix = f"sample {sample_id!r}: " if sample_id is not None else ""
        suffix = f" [{self.path}]" if self.path is not None else ""
        super().__init__(f"{prefix}{message}{suffix}")


class EPBDMissingScoresError(EPBDLayoutError):
    """An IDR round was asked for whose scores have not been written yet."""


def score_column(round_index: int) -> str:
    """Name of the feature holding round ``round_index``'s LMM score: ``score_round_<k>``."""
    return f"score_round_{int(round_index)}"


def round_config_name(round_index: int, threshold: float | None = None) -> str:
    """``idr_round_<k>``, or ``idr_round_<k>_gamma<t>`` for a custom threshold."""
    name = f"idr_round_{int(round_index)}"
    return name if threshold is None else f"{name}_gamma{float(threshold):g}"


def default_image_path(sample_id: str) -> str:
    return f"{IMAGES_DIR}/{sample_id}.png"


def default_cutout_path(sample_id: str) -> str:
    return f"{CUTOUTS_DIR}/{sample_id}.png"


def default_mask_path(sample_id: str) -> str:
    return f"{MASKS_DIR}/{sample_id}.png"


@dataclass(frozen=True)
class Sample:
    id: str
    product_name: str
    category: str
    split: str
    image_file: str
    cutout_file: str
    mask_file: str | None  # None: derive from the cutout's alpha
    mask_required: bool = False  # True when the metadata named the mask file explicitly
    extra: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Small file helpers
# ----------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file through a temporary sibling and ``os.replace``: readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing ``dst`` if it exists."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.rename(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except (UnicodeDecodeError, csv.Error) as err:
        raise EPBDLayoutError(f"cannot parse CSV: {err}", path=path) from err


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------


def _metadata_path(root: Path) -> Path:
    csv_path, jsonl_path = root / METADATA_FILE, root / METADATA_JSONL_FILE
    if csv_path.exists() and jsonl_path.exists():
        raise EPBDLayoutError(f"both {METADATA_FILE} and {METADATA_JSONL_FILE} exist; keep one", path=root)
    if csv_path.exists():
        return csv_path
    if jsonl_path.exists():
        return jsonl_path
    if not root.is_dir():
        raise EPBDLayoutError("not a folder", path=root)
    raise EPBDLayoutError(f"no {METADATA_FILE} (or {METADATA_JSONL_FILE}): not a raw EPBD folder", path=root)


def _read_metadata_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if path.suffix == ".csv":
        return _read_csv(path)
    rows, columns = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise EPBDLayoutError(f"line {line_no} is not JSON: {err}", path=path) from err
            if not isinstance(obj, dict):
                raise EPBDLayoutError(f"line {line_no} is not a JSON object", path=path)
            for key in obj:
                if key not in columns:
                    columns.append(key)
            rows.append({k: "" if v is None else str(v) for k, v in obj.items()})
    return columns, rows


def read_metadata(root: str | os.PathLike) -> tuple[list[Sample], list[str]]:
    """Read and validate the metadata: ``(samples, extra_columns)``; files are not opened here."""
    root = Path(root)
    path = _metadata_path(root)
    columns, rows = _read_metadata_rows(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise EPBDLayoutError(f"missing column(s) {missing}; required: {list(REQUIRED_COLUMNS)}", path=path)
    extra = [c for c in columns if c not in REQUIRED_COLUMNS and c not in PATH_COLUMNS]
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for row_no, row in enumerate(rows, 2 if path.suffix == ".csv" else 1):
        sid = (row.get("id") or "").strip()
        if not sid:
            raise EPBDLayoutError(f"row {row_no} has an empty id", path=path)
        if not _ID_RE.match(sid):
            raise EPBDLayoutError("id must be file-name safe (letters, digits, '_', '-', '.')", sid, path)
        if sid in seen:
            raise EPBDLayoutError(f"duplicate id (rows {seen[sid]} and {row_no})", sid, path)
        seen[sid] = row_no
        split = (row.get("split") or "").strip()
        if split not in SPLITS:
            raise EPBDLayoutError(f"split {split!r} is not one of {list(SPLITS)}", sid, path)
        name = (row.get("product_name") or "").strip()
        category = (row.get("category") or "").strip()
        if not name:
            raise EPBDLayoutError("empty product_name", sid, path)
        if not category:
            raise EPBDLayoutError("empty category", sid, path)
        mask_file = (row.get("mask_file") or "").strip()
        samples.append(
            Sample(
                id=sid,
                product_name=name,
                category=category,
                split=split,
                image_file=(row.get("image_file") or "").strip() or default_image_path(sid),
                cutout_file=(row.get("cutout_file") or "").strip() or default_cutout_path(sid),
                mask_file=mask_file or default_mask_path(sid),
                mask_required=bool(mask_file),
                extra={c: row.get(c) or "" for c in extra},
            )
        )
    train_categories = {s.category for s in samples if s.split == "train"}
    for s in samples:
        if s.split == "test_unseen" and s.category in train_categories:
            raise EPBDLayoutError(
                f"category {s.category!r} is in test_unseen but also in train (test_unseen holds categories "
                "absent from training)", s.id, path)
    return samples, extra


def write_metadata(root: str | os.PathLike, records: Sequence[Mapping], extra_columns: Sequence[str] = ()) -> Path:
    """Write ``metadata.csv`` (required columns first, then ``extra_columns``) atomically."""
    header = list(REQUIRED_COLUMNS) + [c for c in extra_columns if c not in REQUIRED_COLUMNS]
    text = _csv_text(header, ([str(r.get(c, "")) for c in header] for r in records))
    path = Path(root) / METADATA_FILE
    atomic_write_text(path, text)
    return path


def write_info(root: str | os.PathLike, info: Mapping) -> Path:
    path = Path(root) / INFO_FILE
    atomic_write_text(path, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# The layout object
# ----------------------------------------------------------------------------------------------


class EPBDLayout:
    """A validated view of a raw EPBD root: metadata, info, rounds and scores (read lazily)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.samples, self.extra_columns = read_metadata(self.root)
        self.by_id = {s.id: s for s in self.samples}
        self._scores: dict[int, dict[str, float]] = {}

    # -- info ---------------------------------------------------------------------------------
    @cached_property
    def info(self) -> dict:
        path = self.root / INFO_FILE
        if not path.exists():
            return {}
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise EPBDLayoutError(f"not valid JSON: {err}", path=path) from err
        if not isinstance(info, dict):
            raise EPBDLayoutError("must hold a JSON object", path=path)
        return info

    @property
    def resolution(self) -> int | None:
        res = self.info.get("resolution")
        return None if res is None else int(res)

    @cached_property
    def categories(self) -> list[str]:
        return sorted({s.category for s in self.samples})

    def split_samples(self, split: str) -> list[Sample]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [s for s in self.samples if s.split == split]

    # -- rounds -------------------------------------------------------------------------------
    @cached_property
    def rounds(self) -> list[int]:
        """Rounds with a score file, checked to be 1, 2, ..., k with no gap."""
        directory = self.root / SCORES_DIR
        if not directory.is_dir():
            return []
        found = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _ROUND_RE.match(p.name)))
        for expected, k in enumerate(found, 1):
            if k != expected:
                raise EPBDLayoutError(f"round {expected} has no score file but round {k} has: rounds must be "
                                      "1, 2, ... without gaps", path=directory / f"round_{expected}.csv")
        return found

    def round_scores_path(self, round_index: int) -> Path:
        return self.root / SCORES_DIR / f"round_{int(round_index)}.csv"

    def round_info_path(self, round_index: int) -> Path:
        return self.root / SCORES_DIR / f"round_{int(round_index)}.json"

    def require_round(self, round_index: int) -> None:
        if round_index < 0:
            raise ValueError(f"round_index must be >= 0, got {round_index}")
        if round_index and round_index not in self.rounds:
            have = f"rounds with scores: {self.rounds}" if self.rounds else "no round has scores yet"
            raise EPBDMissingScoresError(
                f"IDR round {round_index} has no scores yet ({have}); score the samples kept in round "
                f"{round_index - 1} and write them with write_round_scores(root, {round_index}, scores)",
                path=self.round_scores_path(round_index))

    def round_info(self, round_index: int) -> dict:
        self.require_round(round_index)
        path = self.round_info_path(round_index)
        info: dict = {}
        if path.exists():
            try:
                info = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise EPBDLayoutError(f"not valid JSON: {err}", path=path) from err
        threshold = info.get("threshold", DEFAULT_THRESHOLD)
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise EPBDLayoutError(f"threshold must be a finite number, got {threshold!r}", path=path)
        info["threshold"] = float(threshold)
        return info

    def scores(self, round_index: int) -> dict[str, float]:
        """Validated ``{id: score}`` of one round (ids in metadata order)."""
        self.require_round(round_index)
        if round_index not in self._scores:
            self._scores[round_index] = self._read_scores(self.round_scores_path(round_index))
        return self._scores[round_index]

    def _read_scores(self, path: Path) -> dict[str, float]:
        columns, rows = _read_csv(path)
        for col in ("id", "score"):
            if col not in columns:
                raise EPBDLayoutError(f"missing column {col!r} (a score file has id, score[, category])", path=path)
        known_categories = set(self.categories)
        scores: dict[str, float] = {}
        for row in rows:
            sid = (row.get("id") or "").strip()
            sample = self.by_id.get(sid)
            if sample is None:
                raise EPBDLayoutError("scored but not in the dataset's metadata", sid, path)
            if sample.split != "train":
                raise EPBDLayoutError(f"scored but in split {sample.split!r}; IDR scores only train samples",
                                      sid, path)
            if sid in scores:
                raise EPBDLayoutError("scored twice", sid, path)
            category = (row.get("category") or "").strip()
            if category and category not in known_categories:
                raise EPBDLayoutError(f"unknown category {category!r} (not in the metadata)", sid, path)
            if category and category != sample.category:
                raise EPBDLayoutError(f"category {category!r} differs from the metadata's {sample.category!r}",
                                      sid, path)
            raw = (row.get("score") or "").strip()
            try:
                value = float(raw)
            except ValueError:
                raise EPBDLayoutError(f"score {raw!r} is not a number", sid, path) from None
            if not math.isfinite(value):
                raise EPBDLayoutError(f"score {raw!r} is not finite", sid, path)
            scores[sid] = value
        return {s.id: scores[s.id] for s in self.samples if s.id in scores}

    def thresholds(self, round_index: int, threshold: float | Sequence[float] | None = None) -> list[float]:
        """The threshold of each round 1..k: stored ones, one custom value, or one per round."""
        if threshold is None:
            return [self.round_info(k)["threshold"] for k in range(1, round_index + 1)]
        if isinstance(threshold, (int, float)):
            values = [float(threshold)] * round_index
        else:
            values = [float(t) for t in threshold]
            if len(values) < round_index:
                raise ValueError(f"{len(values)} thresholds given for {round_index} rounds")
            values = values[:round_index]
        if not all(math.isfinite(t) for t in values):
            raise ValueError(f"thresholds must be finite, got {values}")
        return values

    def kept_ids(self, round_index: int, threshold: float | Sequence[float] | None = None) -> list[str]:
        """Train ids kept after round ``round_index`` (0: all train), chained round after round."""
        self.require_round(round_index)
        kept = [s.id for s in self.samples if s.split == "train"]
        for k, gamma in zip(range(1, round_index + 1), self.thresholds(round_index, threshold)):
            scores = self.scores(k)
            missing = [sid for sid in kept if sid not in scores]
            if missing:
                raise EPBDLayoutError(
                    f"kept after round {k - 1} (threshold {gamma:g}) but has no round-{k} score "
                    f"({len(missing)} such samples); round {k} must score every sample kept in round {k - 1}",
                    missing[0], self.round_scores_path(k))
            kept = [sid for sid in kept if scores[sid] >= gamma]
        return kept

    # -- files --------------------------------------------------------------------------------
    def _open(self, sample: Sample, rel: str, what: str) -> tuple[bytes, Image.Image]:
        path = self.root / rel
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise EPBDLayoutError(f"{what} file is missing", sample.id, path) from None
        except OSError as err:
            raise EPBDLayoutError(f"cannot read {what} file: {err}", sample.id, path) from err
        try:
            img = Image.open(io.BytesIO(data))
            img.verify()
            img = Image.open(io.BytesIO(data))  # verify() leaves the object unusable
        except Exception as err:  # PIL raises many kinds
            raise EPBDLayoutError(f"{what} file is not a readable image: {err}", sample.id, path) from err
        return data, img

    def load_sample_files(self, sample: Sample, with_mask: bool = True) -> dict:
        """Validated bytes of a sample's image, cutout and mask (the mask derived when absent)."""
        image_bytes, image = self._open(sample, sample.image_file, "image")
        size = image.size
        if self.resolution is not None and size != (self.resolution, self.resolution):
            raise EPBDLayoutError(f"image is {size[0]}x{size[1]}, the dataset is {self.resolution}x{self.resolution} "
                                  f"({INFO_FILE})", sample.id, self.root / sample.image_file)
        cutout_bytes, cutout = self._open(sample, sample.cutout_file, "cutout")
        if not has_alpha(cutout):
            raise EPBDLayoutError(f"cutout has no alpha channel (mode {cutout.mode}); cutouts are RGBA, alpha = "
                                  "product", sample.id, self.root / sample.cutout_file)
        if cutout.size != size:
            raise EPBDLayoutError(f"cutout is {cutout.size[0]}x{cutout.size[1]} but its image is {size[0]}x{size[1]}",
                                  sample.id, self.root / sample.cutout_file)
        out = {"image": image_bytes, "cutout": cutout_bytes, "mask": None, "size": size}
        if not with_mask:
            return out
        mask_path = self.root / sample.mask_file if sample.mask_file else None
        if mask_path is not None and (sample.mask_required or mask_path.exists()):
            mask_bytes, mask = self._open(sample, sample.mask_file, "mask")
            if mask.size != size:
                raise EPBDLayoutError(f"mask is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}",
                                      sample.id, mask_path)
            if mask.mode != "L":
                mask_bytes = _png_bytes(to_product_mask(mask))
            out["mask"] = mask_bytes
        else:
            out["mask"] = _png_bytes(product_mask_from_alpha(cutout))
        return out

    def validate_files(self, samples: Iterable[Sample] | None = None) -> None:
        """Open every referenced file's header: raises on the first missing / wrong file."""
        for sample in self.samples if samples is None else samples:
            self.load_sample_files(sample, with_mask=False)
            if sample.mask_required or (self.root / sample.mask_file).exists():
                _, mask = self._open(sample, sample.mask_file, "mask")
                image_size = Image.open(self.root / sample.image_file).size
                if mask.size != image_size:
                    raise EPBDLayoutError(f"mask is {mask.size[0]}x{mask.size[1]} but its image is "
                                          f"{image_size[0]}x{image_size[1]}", sample.id, self.root / sample.mask_file)

    def fingerprint(self) -> str:
        """A hash of the metadata, info, score files and the referenced files' sizes and mtimes."""
        h = hashlib.sha256(b"epbd-layout-v1")
        for name in (METADATA_FILE, METADATA_JSONL_FILE, INFO_FILE):
            p = self.root / name
            if p.exists():
                h.update(name.encode() + b"\0" + p.read_bytes())
        scores_dir = self.root / SCORES_DIR
        if scores_dir.is_dir():
            for p in sorted(scores_dir.iterdir()):
                if p.suffix in (".csv", ".json"):
                    h.update(p.name.encode() + b"\0" + p.read_bytes())
        for s in self.samples:
            for rel in (s.image_file, s.cutout_file, s.mask_file):
                try:
                    st = os.stat(self.root / rel)
                except FileNotFoundError:
                    h.update(f"{rel}:absent".encode())
                    continue
                h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    # -- datasets features and examples ---------------------------------------------------------
    def score_rounds(self, round_index: int = 0) -> list[int]:
        """Rounds whose scores are columns of a config: all known for the full dataset, 1..k for round k."""
        self.require_round(round_index)
        return list(range(1, round_index + 1)) if round_index else list(self.rounds)

    def features(self, round_index: int = 0):
        """``datasets.Features`` of the full dataset (0) or of IDR round ``round_index``'s config."""
        import datasets

        feats = {
            "id": datasets.Value("string"),
            "product_name": datasets.Value("string"),
            "category": datasets.Value("string"),
            "image": datasets.Image(mode="RGB"),
            "cutout": datasets.Image(mode="RGBA"),
            "mask": datasets.Image(mode="L"),
        }
        for k in self.score_rounds(round_index):
            feats[score_column(k)] = datasets.Value("float64")
        for col in self.extra_columns:
            feats[col] = datasets.Value("string")
        return datasets.Features(feats)

    def splits(self, round_index: int = 0, threshold: float | Sequence[float] | None = None) -> list[str]:
        """Splits of a config: all non-empty ones for the full dataset, ``train`` for a round.

        Raises if a round config would be empty (no train sample survives the thresholds).
        """
        if round_index:
            if not self.kept_ids(round_index, threshold):
                raise EPBDLayoutError(
                    f"IDR round {round_index} keeps no train sample at thresholds "
                    f"{self.thresholds(round_index, threshold)}: the config would be empty",
                    path=self.round_scores_path(round_index))
            return ["train"]
        present = {s.split for s in self.samples}
        return [s for s in SPLITS if s in present]

    def iter_examples(self, split: str, round_index: int = 0,
                      threshold: float | Sequence[float] | None = None) -> Iterator[tuple[str, dict]]:
        """``(id, example)`` pairs of one split of a config, with images as embedded bytes."""
        if round_index and split != "train":
            raise ValueError(f"IDR round configs only have a train split, not {split!r}")
        rounds = self.score_rounds(round_index)
        scores = {k: self.scores(k) for k in rounds}
        samples = self.split_samples(split)
        if round_index:
            keep = set(self.kept_ids(round_index, threshold))
            samples = [s for s in samples if s.id in keep]
        for sample in samples:
            files = self.load_sample_files(sample)
            example = {
                "id": sample.id,
                "product_name": sample.product_name,
                "category": sample.category,
                "image": {"bytes": files["image"], "path": os.path.basename(sample.image_file)},
                "cutout": {"bytes": files["cutout"], "path": os.path.basename(sample.cutout_file)},
                "mask": {"bytes": files["mask"], "path": f"{sample.id}_mask.png"},
            }
            for k in rounds:
                example[score_column(k)] = scores[k].get(sample.id)
            for col in self.extra_columns:
                example[col] = sample.extra.get(col, "")
            yield sample.id, example


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Module-level API over a root path
# ----------------------------------------------------------------------------------------------


def available_rounds(root: str | os.PathLike) -> list[int]:
    return EPBDLayout(root).rounds


def read_round_scores(root: str | os.PathLike, round_index: int) -> dict[str, float]:
    return EPBDLayout(root).scores(round_index)


def kept_ids(root: str | os.PathLike, round_index: int,
             threshold: float | Sequence[float] | None = None) -> list[str]:
    """Train ids kept after IDR round ``round_index`` (chained; 0 = all train samples).

    ``threshold``: ``None`` uses each round's stored threshold (``scores/round_<k>.json``), a number
    applies to every round, a sequence gives one per round.
    """
    return EPBDLayout(root).kept_ids(round_index, threshold)


def write_round_scores(
    root: str | os.PathLike,
    round_index: int,
    scores: Mapping[str, float],
    threshold: float = DEFAULT_THRESHOLD,
    *,
    info: Mapping | None = None,
    overwrite: bool = False,
) -> Path:
    """Validate and write round ``round_index``'s LMM scores (``scores/round_<k>.csv`` + ``.json``).

    ``scores`` maps train ids to scores and must cover every sample kept in round k-1 (round 0: all
    train samples); it may score more train samples (they are recorded, not kept). ``threshold`` is
    gamma (samples with score >= gamma are kept); ``info`` is recorded in the JSON (scorer model,
    prompt version, ...). Rounds are written in order; rewriting round k needs ``overwrite=True`` and
    no later round. Returns the CSV path.
    """
    lay = EPBDLayout(root)
    round_index = int(round_index)
    if round_index < 1:
        raise ValueError(f"round_index must be >= 1, got {round_index}")
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    existing = lay.rounds
    if round_index in existing:
        if not overwrite:
            raise EPBDLayoutError(f"round {round_index} already has scores; pass overwrite=True to replace them",
                                  path=lay.round_scores_path(round_index))
        later = [k for k in existing if k > round_index]
        if later:
            raise EPBDLayoutError(f"rounds {later} were selected from round {round_index}; remove them before "
                                  f"rewriting round {round_index}", path=lay.round_scores_path(round_index))
    elif round_index != len(existing) + 1:
        raise EPBDLayoutError(f"cannot write round {round_index}: the next round is {len(existing) + 1}",
                              path=lay.round_scores_path(round_index))
    path = lay.round_scores_path(round_index)
    clean: dict[str, float] = {}
    for sid, value in scores.items():
        sample = lay.by_id.get(sid)
        if sample is None:
            raise EPBDLayoutError("scored but not in the dataset's metadata", sid, path)
        if sample.split != "train":
            raise EPBDLayoutError(f"scored but in split {sample.split!r}; IDR scores only train samples", sid, path)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise EPBDLayoutError(f"score {value!r} is not a number", sid, path) from None
        if not math.isfinite(value):
            raise EPBDLayoutError(f"score {value!r} is not finite", sid, path)
        clean[sid] = value
    previous = lay.kept_ids(round_index - 1)
    missing = [sid for sid in previous if sid not in clean]
    if missing:
        raise EPBDLayoutError(f"kept in round {round_index - 1} but not scored ({len(missing)} such samples); "
                              f"round {round_index} must score every sample kept in round {round_index - 1}",
                              missing[0], path)
    ordered = [s for s in lay.samples if s.id in clean]
    text = _csv_text(("id", "category", "score"), ((s.id, s.category, repr(clean[s.id])) for s in ordered))
    record = dict(info or {})
    record.update({
        "round": round_index,
        "threshold": float(threshold),
        "num_scored": len(clean),
        "num_candidates": len(previous),
        "num_kept": sum(1 for sid in previous if clean[sid] >= threshold),
    })
    atomic_write_text(lay.round_info_path(round_index), json.dumps(record, indent=2, sort_keys=True) + "\n")
    atomic_write_text(path, text)
    return path
