"""EPBD-synth generation speed: samples per second, rendering only and written to disk.

    HF_HUB_OFFLINE=1 python benchmarks/bench_synth_speed.py [--num-train 2000] [--resolutions 64 128 512]

Prints one line per resolution. Also checks that parallel workers write byte-identical files.
Writing is often bound by the file system (two files per sample): compare ``--tmpdir /dev/shm``.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 512])
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--tmpdir", default=None,
                        help="where to write (file creation speed matters: try /dev/shm for the CPU-bound rate)")
    args = parser.parse_args()

    from diffusers_product2img.data import synth

    synth.render_sample("coffee_mug", seed=0)  # warm the per-resolution caches
    print(f"{'res':>5} {'render/s':>10} {'write/s (1 proc)':>17} {f'write/s ({args.workers} proc)':>17}")
    for res in args.resolutions:
        n = max(50, args.num_train * 64 * 64 // (res * res))
        cats = list(synth.CATEGORIES)
        synth.render_sample("coffee_mug", seed=0, resolution=res)
        start = time.perf_counter()
        for i in range(n):
            synth.render_sample(cats[i % len(cats)], synth.QUALITY_LABELS[i % 5], seed=i, resolution=res)
        render_rate = n / (time.perf_counter() - start)
        kw = dict(seed=0, resolution=res, num_train=n, num_validation=0, num_test=0, num_test_unseen=0)
        with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
            start = time.perf_counter()
            a = synth.generate_epbd_synth(Path(tmp) / "a", **kw)
            write_rate = n / (time.perf_counter() - start)
            start = time.perf_counter()
            b = synth.generate_epbd_synth(Path(tmp) / "b", num_workers=args.workers, **kw)
            par_rate = n / (time.perf_counter() - start)
            names = [str(p.relative_to(a)) for p in a.rglob("*") if p.is_file()]
            _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
            same = "" if not mismatch and not errors else f"  MISMATCH in {len(mismatch) + len(errors)} files"
        print(f"{res:>5} {render_rate:>10.0f} {write_rate:>17.0f} {par_rate:>17.0f}{same}")


if __name__ == "__main__":
    main()
