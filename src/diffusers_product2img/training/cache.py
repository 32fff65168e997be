"""Precomputed frozen features: VAE latents of I and of the product-only image, r_B and r_I.

The VAE and the CLIP image encoder are frozen and the training images never change, so their
outputs (:func:`~.loop.encode_frozen_features`) can be computed once and read back every epoch.

A cache lives in ``<cache_root>/<key>/`` where ``key`` hashes the dataset fingerprint, the weights
of the VAE and of the CLIP image encoder (a content hash, so a copied or re-saved model still
hits), the CLIP image processor settings, the resolution and this module's format version. Rows are
stored in shards of safetensors files (``shard-00000.safetensors`` ...), each written to a
temporary file and renamed into place; ``manifest.json`` is written last, so a cache is either
complete or absent. An interrupted build resumes: finished shards are kept.

Row ``i`` of the cache is row ``i`` of the dataset the key was computed for.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .loop import FROZEN_FEATURES, encode_frozen_features

__all__ = [
    "CACHE_FORMAT_VERSION",
    "FeatureCache",
    "build_feature_cache",
    "default_cache_root",
    "feature_cache_key",
    "weights_digest",
]

CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def default_cache_root() -> str:
    hf_home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(hf_home, "diffusers_product2img", "features")


def weights_digest(module: torch.nn.Module | None) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes, bytes)."""
    if module is None:
        return "none"
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def feature_cache_key(
    dataset_fingerprint: str,
    *,
    vae_digest: str,
    clip_digest: str = "none",
    clip_processor_config: dict | None = None,
    resolution: int,
    extra: dict | None = None,
) -> str:
    """The cache key: what the cached tensors depend on."""
    payload = {
        "version": CACHE_FORMAT_VERSION,
        "dataset": dataset_fingerprint,
        "vae": vae_digest,
        "clip": clip_digest,
        "clip_processor": clip_processor_config or {},
        "resolution": int(resolution),
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


class FeatureCache:
    """Read access to a complete cache folder: ``cache[indices] -> {field: (len, ...) tensor}``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.directory} is not a complete feature cache (no {MANIFEST})")
        self.manifest = json.loads(manifest_path.read_text())
        self.num_rows = int(self.manifest["num_rows"])
        self.shard_size = int(self.manifest["shard_size"])
        self.fields = tuple(self.manifest["fields"])
        self._handles: dict[int, object] = {}

    @classmethod
    def exists(cls, directory: str | os.PathLike) -> bool:
        return (Path(directory) / MANIFEST).is_file()

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self):  # file handles do not cross into dataloader workers
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _shard(self, index: int):
        if index not in self._handles:
            self._handles[index] = safe_open(str(self.directory / _shard_name(index)), framework="pt")
        return self._handles[index]

    def __getitem__(self, indices: Iterable[int]) -> dict[str, torch.Tensor]:
        rows: dict[str, list[torch.Tensor]] = {f: [] for f in self.fields}
        for i in indices:
            i = int(i)
            if not 0 <= i < self.num_rows:
                raise IndexError(f"row {i} is outside the cache ({self.num_rows} rows)")
            shard, offset = divmod(i, self.shard_size)
            handle = self._shard(shard)
            for f in self.fields:
                rows[f].append(handle.get_slice(f)[offset : offset + 1])
        return {f: torch.cat(v) for f, v in rows.items()}


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_feature_cache(
    directory: str | os.PathLike,
    num_rows: int,
    load_batch: Callable[[list[int]], dict],
    *,
    vae,
    clip_model=None,
    dtype: torch.dtype | None = None,
    shard_size: int = 256,
    batch_size: int = 16,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] | None = None,
    key_info: dict | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> FeatureCache:
    """Compute the frozen features of ``num_rows`` rows into ``directory``; return the cache.

    ``load_batch(indices)`` must return a collated batch of those dataset rows (pixels, masks and
    CLIP pixel values, see :class:`~.collate.Product2ImgCollator`). With several processes each
    builds every ``num_processes``-th shard; pass ``wait_for_everyone`` (e.g.
    ``accelerator.wait_for_everyone``) so the main process writes the manifest only once all
    shards exist. A complete cache is returned as is.
    """
    directory = Path(directory)
    if FeatureCache.exists(directory):
        return FeatureCache(directory)
    directory.mkdir(parents=True, exist_ok=True)
    num_shards = (num_rows + shard_size - 1) // shard_size
    mine = [s for s in range(num_shards) if s % num_processes == process_index]
    todo = [s for s in mine if not (directory / _shard_name(s)).is_file()]
    for shard in progress(todo) if progress else todo:
        start, stop = shard * shard_size, min(num_rows, (shard + 1) * shard_size)
        parts: dict[str, list[torch.Tensor]] = {}
        for first in range(start, stop, batch_size):
            batch = load_batch(list(range(first, min(stop, first + batch_size))))
            features = encode_frozen_features(batch, vae, clip_model, dtype)
            for k, v in features.items():
                parts.setdefault(k, []).append(v.cpu())
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        _atomic_save(tensors, directory / _shard_name(shard), {"rows": f"{start}:{stop}"})
    if wait_for_everyone is not None:
        wait_for_everyone()
    if process_index == 0:
        fields = [f for f in FROZEN_FEATURES if clip_model is not None or not f.startswith("clip_")]
        manifest = {
            "version": CACHE_FORMAT_VERSION, "num_rows": num_rows, "shard_size": shard_size,
            "fields": fields, "key_info": key_info or {},
        }
        missing = [s for s in range(num_shards) if not (directory / _shard_name(s)).is_file()]
        if missing:
            raise RuntimeError(f"feature cache {directory}: shards {missing} are missing")
        tmp = directory / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(tmp, directory / MANIFEST)
    if wait_for_everyone is not None:
        wait_for_everyone()
    return FeatureCache(directory)
