"""Product2ImgPipeline vs StableDiffusionInpaintPipeline on the same components, side by side.

Both pipelines share one set of tiny components (or a real checkpoint with --model), the same
scheduler, seed, size and step count; each is timed end to end (PIL in, PIL out), alternating,
and the median of the runs is compared. Target: ratio <= 1.05.

    python benchmarks/bench_pipeline_overhead.py [--size 128] [--steps 10] [--runs 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import StableDiffusionInpaintPipeline  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from diffusers_product2img import Product2ImgPipeline, place_cutout  # noqa: E402
from diffusers_product2img.testing import tiny_inpainting_components  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="an SD-Inpainting checkpoint instead of the tiny world")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 keeps a shared machine's noise out of the comparison)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    if args.model:
        ours = Product2ImgPipeline.from_inpainting(args.model)
    else:
        ours = Product2ImgPipeline.from_components(**tiny_inpainting_components())
    ours.to(args.device)
    stock = StableDiffusionInpaintPipeline(
        vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer, unet=ours.unet,
        scheduler=ours.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    for p in (ours, stock):
        p.set_progress_bar_config(disable=True)

    cutout = Image.new("RGBA", (60, 90), (180, 40, 30, 255))
    image, product_mask = place_cutout(cutout, (args.size, args.size), scale=0.6)
    inpaint_mask = ImageOps.invert(product_mask)  # diffusers: white = repaint
    name = "Ceramic Coffee Mug 350ml Matte Black"
    common = dict(height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=7.5)

    def run_ours():
        ours(name, image, product_mask, generator=torch.Generator().manual_seed(0), **common)

    def run_stock():
        stock(f"{name} <background>", image, inpaint_mask, generator=torch.Generator().manual_seed(0), **common)

    for fn in (run_ours, run_stock):  # warm-up
        fn()
    times: dict[str, list[float]] = {"product2img": [], "sd_inpaint": []}
    for _ in range(args.runs):
        for key, fn in (("product2img", run_ours), ("sd_inpaint", run_stock)):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    # Per-pair ratios: each pair ran back to back, so load that comes and goes hits both sides alike.
    pair = statistics.median(a / b for a, b in zip(times["product2img"], times["sd_inpaint"]))
    print(f"device={args.device} size={args.size} steps={args.steps} runs={args.runs} threads={torch.get_num_threads()}")
    for k in med:
        print(f"{k:12s} median {med[k] * 1000:8.1f} ms   best {best[k] * 1000:8.1f} ms")
    print(f"ratio product2img / sd_inpaint: median of pairs {pair:.3f}, of medians {med['product2img'] / med['sd_inpaint']:.3f}, "
          f"of bests {best['product2img'] / best['sd_inpaint']:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
