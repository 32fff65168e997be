"""Training-step time: plain inpainting vs + CBA, from images vs from the feature cache.

One optimizer step (forward, backward, AdamW, frozen-row restore) of
``diffusers_product2img.training.training_step`` on a collated EPBD-synth batch, in four variants,
interleaved run by run; the median of ``--runs`` is reported with the ratios. Collation (decoding
and resizing images, done by dataloader workers during training) is timed separately.

Targets: CBA costs at most 10% over the plain step when cached; the cache removes the VAE and CLIP
forward passes from every step.

    python benchmarks/bench_training_step.py                         # tiny components (offline, CPU)
    python benchmarks/bench_training_step.py --components sd15-random --resolution 512 --batch_size 16
        # SD-1.5-sized UNet/VAE/text encoder and a CLIP ViT-L/14-sized image tower, random weights
        # (no download; meant for a GPU)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diffusers_product2img import Product2ImgPipeline  # noqa: E402
from diffusers_product2img.background_token import background_token_id  # noqa: E402
from diffusers_product2img.cba import TextToImageProjection  # noqa: E402
from diffusers_product2img.training import (  # noqa: E402
    CBAConfig,
    FrozenEmbeddingRows,
    Product2ImgCollator,
    encode_frozen_features,
    parameter_groups,
    training_step,
)


def tiny_components():
    from diffusers_product2img.testing import tiny_clip_model, tiny_inpainting_components

    clip, processor, _ = tiny_clip_model()
    return tiny_inpainting_components(), clip, processor


def sd15_random_components():
    """SD-1.5 inpainting + CLIP ViT-L/14 architectures with random weights (configs written out here)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

    from diffusers_product2img.testing import tiny_clip_tokenizer, tiny_scheduler

    tokenizer = tiny_clip_tokenizer()  # token ids only; the sizes that cost time are the models'
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                          eos_token_id=len(tokenizer) - 1, bos_token_id=len(tokenizer) - 2,
                          pad_token_id=len(tokenizer) - 1)
    unet = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4, cross_attention_dim=768,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    from transformers import CLIPConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14)
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=768))
    clip.text_model = None
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    components = {"vae": vae, "text_encoder": CLIPTextModel(text), "tokenizer": tokenizer, "unet": unet,
                  "scheduler": tiny_scheduler()}
    return components, clip, processor


def synth_rows(n: int, resolution: int):
    from PIL import Image

    from diffusers_product2img.data.layout import EPBDLayout
    from diffusers_product2img.data.synth import SynthConfig, generate_epbd_synth

    root = generate_epbd_synth(os.path.join(tempfile.mkdtemp(), "synth"), SynthConfig(
        resolution=min(resolution, 512), num_train=n, num_validation=0, num_test=0, num_test_unseen=0,
        num_unseen_categories=0))
    rows = []
    for i, s in enumerate(EPBDLayout(root).split_samples("train")):
        cutout = Image.open(root / s.cutout_file)
        cutout.load()
        rows.append({"product_name": s.product_name, "image": Image.open(root / s.image_file).convert("RGB"),
                     "cutout": cutout, "_position": i, "_row_index": i})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--components", choices=["tiny", "sd15-random"], default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    components, clip, processor = tiny_components() if args.components == "tiny" else sd15_random_components()
    pipe = Product2ImgPipeline.from_components(**components)
    device = torch.device(args.device)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    unet, text_encoder, vae = pipe.unet.to(device).train(), pipe.text_encoder.to(device).train(), pipe.vae.to(device)
    vae.requires_grad_(False)
    clip = clip.to(device).requires_grad_(False).eval()
    if dtype != torch.float32:
        vae.to(dtype=dtype)
        clip.to(dtype=dtype)
    projection = TextToImageProjection(text_encoder.config.hidden_size, clip.config.projection_dim).to(device)
    guard = FrozenEmbeddingRows(text_encoder.get_input_embeddings(), [background_token_id(pipe.tokenizer)])
    optimizer = torch.optim.AdamW(parameter_groups(unet, text_encoder, projection))

    rows = synth_rows(args.batch_size, args.resolution)
    collator = Product2ImgCollator(pipe.tokenizer, args.resolution, processor)
    t0 = time.perf_counter()
    image_batch = collator(rows)
    collate_ms = (time.perf_counter() - t0) * 1000
    image_batch = {k: v.to(device) for k, v in image_batch.items()}
    cached_batch = {k: image_batch[k] for k in ("input_ids", "background_positions", "eos_positions", "positions")}
    cached_batch.update(encode_frozen_features(image_batch, vae, clip, dtype))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def make_step(batch, cba):
        config = CBAConfig(enabled=cba, gather=False)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = training_step(batch, unet=unet, text_encoder=text_encoder, noise_scheduler=pipe.scheduler,
                                    vae_scaling_factor=vae.config.scaling_factor, seed=0,
                                    projection=projection if cba else None, vae=vae, clip_model=clip, cba=config,
                                    weight_dtype=dtype)
            out.loss.backward()
            optimizer.step()
            guard.restore()
            optimizer.zero_grad(set_to_none=True)

        return step

    variants = {
        ("uncached", "plain"): make_step(image_batch, False),
        ("uncached", "cba"): make_step(image_batch, True),
        ("cached", "plain"): make_step(cached_batch, False),
        ("cached", "cba"): make_step(cached_batch, True),
    }
    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    times = {k: [] for k in variants}
    for _ in range(args.runs):
        for key, fn in variants.items():  # interleaved: drifts in machine load hit every variant alike
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}

    n_unet = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"components={args.components} ({n_unet:.1f}M-parameter UNet) device={device} "
          f"threads={torch.get_num_threads()} resolution={args.resolution} batch={args.batch_size} "
          f"mixed_precision={args.mixed_precision} runs={args.runs} (median)")
    print(f"{'':10s} {'plain ms':>10s} {'CBA ms':>10s} {'CBA/plain':>10s}")
    for source in ("uncached", "cached"):
        plain, cba = med[(source, "plain")], med[(source, "cba")]
        print(f"{source:10s} {plain:10.1f} {cba:10.1f} {cba / plain:10.3f}")
    print(f"cache speed-up (uncached/cached): plain {med[('uncached', 'plain')] / med[('cached', 'plain')]:.2f}x, "
          f"CBA {med[('uncached', 'cba')] / med[('cached', 'cba')]:.2f}x")
    print(f"collation (images -> tensors, dataloader side): {collate_ms:.1f} ms per batch")
    ratio = med[("cached", "cba")] / med[("cached", "plain")]
    print(f"target CBA/plain (cached) <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'} ({ratio:.3f})")


if __name__ == "__main__":
    main()
