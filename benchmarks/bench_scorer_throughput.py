"""Throughput of the IDR-LMM scorer against a server with a fixed latency.

Starts the simulated LMM in its own process with a fixed latency L per request (hash judge: no
image decoding, so the server is not the bottleneck), scores R requests through the real
``openai`` client with concurrency N, and prints the achieved throughput against the ideal N/L.
The target of issue #5 is a ratio >= 0.90.

Two rates are printed: the overall one (R / wall time of the whole call, including start-up and the
last, partial wave) and the sustained one (completions per second between the 10th and the 90th
percentile of completion times). Keep R a multiple of N for a fair overall figure.

    python benchmarks/bench_scorer_throughput.py --latency 0.2 --concurrency 32 --requests 320
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src"
# Import the idr package without the top-level package __init__ (which loads torch/diffusers):
# the scorer does not need them, and the benchmark should measure the scorer only.
_BOOT = (
    "import sys, types; m = types.ModuleType('diffusers_product2img'); "
    f"m.__path__ = [{str(SRC / 'diffusers_product2img')!r}]; sys.modules['diffusers_product2img'] = m; "
)
exec(_BOOT)

from diffusers_product2img.idr.scorer import OpenAICompatibleScorer, Sample, ScorerConfig  # noqa: E402


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    code = _BOOT + (
        "from diffusers_product2img.idr.simulated_lmm import main; "
        f"main(['--port', '0', '--latency', '{latency}', '--judge', 'hash'])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"the simulated LMM did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[-1].strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()

    proc, base_url = start_server(args.latency)
    try:
        rng = np.random.default_rng(0)
        samples = [
            Sample(id=f"bench-{i:05d}", product_name=f"ceramic coffee mug {i}",
                   image=Image.fromarray(rng.integers(0, 255, (args.image_size, args.image_size, 3), dtype=np.uint8)))
            for i in range(args.requests)
        ]
        config = ScorerConfig(model="sim-lmm", base_url=base_url, concurrency=args.concurrency,
                              show_progress=False, timeout=30)
        with tempfile.TemporaryDirectory() as tmp:
            os.environ.pop(config.api_key_env, None)
            scorer = OpenAICompatibleScorer(config, Path(tmp) / "results.jsonl", examples=[])
            t0 = time.time()
            report = scorer.score_samples(samples, round=1)
            wall = time.time() - t0
            done = np.sort([r.created for r in report.results.values()]) - t0
            scorer.close()
        ideal = args.concurrency / args.latency
        overall = args.requests / wall
        lo, hi = int(0.1 * len(done)), int(0.9 * len(done))
        sustained = (hi - lo) / (done[hi] - done[lo]) if done[hi] > done[lo] else float("nan")
        print(f"server latency L={args.latency}s, concurrency N={args.concurrency}, requests={args.requests}, "
              f"ok={report.n_ok}, failed={report.n_failed}")
        print(f"ideal N/L = {ideal:.1f} req/s")
        print(f"overall   = {overall:.1f} req/s  ratio {overall / ideal:.3f}  (wall {wall:.2f}s)")
        print(f"sustained = {sustained:.1f} req/s  ratio {sustained / ideal:.3f}  (10th-90th percentile of completions)")
        if report.n_failed:
            sys.exit("some requests failed")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
