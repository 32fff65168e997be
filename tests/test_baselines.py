"""Baselines harness: every adapter on tiny offline components, and `product2img benchmark` end to end."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from diffusers_product2img.background_token import tokenize_product_names
from diffusers_product2img.baselines import (
    METHODS,
    BackgroundMethod,
    BenchmarkSample,
    ControlNetInpaintingCannyMethod,
    EPBDFTMethod,
    IPAdapterMethod,
    Product2ImgMethod,
    SDInpaintingMethod,
    build_method,
    canny_control_image,
    canny_edges,
    inpainting_mask,
    load_benchmark_samples,
    run_benchmark,
    uniform_prompt,
)
from diffusers_product2img.cli import main
from diffusers_product2img.testing import TINY_HIDDEN_SIZE, save_tiny_clip_model, tiny_unet

SIZE = 64
NAMES = ["red ceramic mug", "black leather backpack"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # These models are tiny: a second intra-op thread only adds OpenMP spin-waits, which cost seconds
    # per call on a shared, busy machine. Restored afterwards for the other test modules.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------
# Tiny models on disk: a canny ControlNet and an IP-Adapter in the h94/IP-Adapter layout
# ------------------------------------------------------------------------------------------------


def save_tiny_controlnet(path):
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    unet = tiny_unet()
    controlnet = ControlNetModel(
        in_channels=4,  # a ControlNet sees the noisy latents only, also beside a 9-channel inpainting UNet
        block_out_channels=unet.config.block_out_channels,
        down_block_types=unet.config.down_block_types,
        layers_per_block=1,
        cross_attention_dim=TINY_HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=16,
        conditioning_embedding_out_channels=(8, 8, 8, 8),  # 3 stride-2 convs: image 64 -> latents 8
    )
    controlnet.save_pretrained(path)
    return str(path)


def save_tiny_ip_adapter(root):
    """``root/models/ip-adapter_sd15.safetensors`` + ``root/models/image_encoder``, keys as in h94's file."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=32,
    ))
    encoder.save_pretrained(os.path.join(root, "models", "image_encoder"))
    cross = TINY_HIDDEN_SIZE
    state = {
        "image_proj.proj.weight": torch.randn(4 * cross, 32) * 0.1,  # 4 image tokens
        "image_proj.proj.bias": torch.zeros(4 * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    unet = tiny_unet()
    blocks = unet.config.block_out_channels
    key_id = 1  # the original numbering: 1, 3, 5, ... over the cross-attention layers
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(blocks))[int(name[len("up_blocks.")])]
        else:
            hidden = blocks[int(name[len("down_blocks.")])]
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross) * 0.1
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross) * 0.1
        key_id += 2
    save_file(state, os.path.join(root, "models", "ip-adapter_sd15.safetensors"))
    return str(root)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_inpainting_dir, tiny_pipeline_dir):
    root = tmp_path_factory.mktemp("baseline_models")
    return {
        "sd": tiny_inpainting_dir,
        "p2i": tiny_pipeline_dir,
        "controlnet": save_tiny_controlnet(root / "controlnet-canny"),
        "ip": save_tiny_ip_adapter(root / "ip-adapter"),
    }


def method_options(dirs):
    return {"controlnet_model": dirs["controlnet"], "ip_adapter": dirs["ip"]}


def model_for(name, dirs):
    return {"epbd-ft": dirs["p2i"], "product2img": dirs["p2i"]}.get(name, dirs["sd"])


@pytest.fixture(scope="module")
def methods(model_dirs):
    built = {name: build_method(name, model_for(name, model_dirs), **method_options(model_dirs)) for name in METHODS}
    built["epbd-ft-sd"] = build_method("epbd-ft", model_dirs["sd"])
    return built


def product_scene(seed=0, color=(200, 40, 30)):
    """A product on white with a soft-edged mask, at the benchmark size."""
    rng = np.random.default_rng(seed)
    mask = Image.new("L", (SIZE, SIZE), 0)
    left, top = 18 + int(rng.integers(0, 6)), 16 + int(rng.integers(0, 6))
    mask.paste(255, (left, top, left + 26, top + 30))
    mask = mask.filter(ImageFilter.GaussianBlur(1))
    product = Image.new("RGB", (SIZE, SIZE), color)
    canvas = Image.composite(product, Image.new("RGB", (SIZE, SIZE), (255, 255, 255)), mask)
    return canvas, mask


@pytest.fixture(scope="module")
def scenes():
    first, second = product_scene(0), product_scene(1, color=(20, 20, 30))
    return [first[0], second[0]], [first[1], second[1]]


def capture_text_ids(pipe):
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0] if args else kwargs["input_ids"]).detach().cpu())

    return calls, pipe.text_encoder.register_forward_pre_hook(hook, with_kwargs=True)


def expected_ids(method, names):
    pipe = method.inner.pipe if isinstance(method, EPBDFTMethod) else method.pipe
    inner = method.inner if isinstance(method, EPBDFTMethod) else method
    if isinstance(inner, Product2ImgMethod):
        return tokenize_product_names(pipe.tokenizer, inner._names(names), pipe.config.background_token).input_ids
    return pipe.tokenizer(inner.prompts(names), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


def test_uniform_prompt_and_inpainting_mask():
    assert uniform_prompt("  Red   Ceramic Mug ") == "Red Ceramic Mug, high-quality and appropriate background"
    with pytest.raises(ValueError):
        uniform_prompt("   ")
    product = Image.fromarray(np.array([[0, 127, 128, 255]], dtype=np.uint8))
    # Same rule as Product2ImgPipeline: keep where mask / 255 >= 0.5.
    assert np.asarray(inpainting_mask(product)).tolist() == [[255, 255, 0, 0]]


def test_canny_edges_outline_thresholds_and_hysteresis():
    square = np.zeros((32, 32), dtype=np.uint8)
    square[8:24, 8:24] = 255
    edges = np.asarray(canny_edges(Image.fromarray(square))) > 0
    assert edges[6:26, 6:26].any() and not edges[:5].any() and not edges[27:].any()
    assert not edges[11:21, 11:21].any()  # nothing inside the flat square
    assert edges.sum() < 4 * 16 * 2 + 8  # thin (at most ~2 px) outline, not a thick band
    # A weak step alone (Sobel L1 = 4 * 30 = 120, between 100 and 200) is dropped ...
    weak = np.zeros((32, 32), dtype=np.uint8)
    weak[16:, :] = 30
    assert not np.asarray(canny_edges(Image.fromarray(weak))).any()
    # ... but kept where it continues a strong edge (hysteresis).
    mixed = weak.copy()
    mixed[16:, :16] = 255
    mixed_edges = np.asarray(canny_edges(Image.fromarray(mixed))) > 0
    assert mixed_edges[14:18, 2:14].any() and mixed_edges[14:18, 20:30].any()
    control = canny_control_image(Image.fromarray(square).convert("RGB"))
    assert control.mode == "RGB" and control.size == (32, 32)
    with pytest.raises(ValueError):
        canny_edges(Image.fromarray(square), 200, 100)


def test_registry_and_errors(model_dirs, scenes):
    assert list(METHODS) == ["sd-inpainting", "controlnet-canny", "ip-adapter", "epbd-ft", "product2img"]
    with pytest.raises(ValueError, match="unknown method"):
        build_method("powerpaint")
    for name in ("epbd-ft", "product2img"):
        with pytest.raises(ValueError, match=f"--model-{name}"):
            build_method(name)
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        build_method("epbd-ft", model_dirs["controlnet"])  # not a pipeline folder
    with pytest.raises(ValueError, match="no IP-Adapter loaded"):
        IPAdapterMethod(build_method("sd-inpainting", model_dirs["sd"]).pipe)


# ------------------------------------------------------------------------------------------------
# Each method on tiny components
# ------------------------------------------------------------------------------------------------

ALL = ["sd-inpainting", "controlnet-canny", "ip-adapter", "epbd-ft", "epbd-ft-sd", "product2img"]


@pytest.mark.parametrize("name", ALL)
def test_method_generates_with_its_text_and_keeps_the_product(methods, scenes, name):
    method = methods[name]
    assert isinstance(method, BackgroundMethod)
    canvases, masks = scenes
    pipe = method.inner.pipe if isinstance(method, EPBDFTMethod) else method.pipe
    calls, handle = capture_text_ids(pipe)
    try:
        out = method.generate(NAMES, canvases, masks, height=SIZE, width=SIZE, num_inference_steps=2, seed=[3, 4])
    finally:
        handle.remove()
    assert [im.size for im in out] == [(SIZE, SIZE)] * 2 and all(im.mode == "RGB" for im in out)
    # The text encoder read exactly the method's text: the uniform template for the baselines,
    # "{name} <background>" for a Product2Img-format model.
    expected = expected_ids(method, NAMES)
    seen_rows = {tuple(row.tolist()) for ids in calls for row in ids}  # IP-Adapter: one call per product
    assert all(tuple(row.tolist()) in seen_rows for row in expected)
    template = uniform_prompt(NAMES[0])
    if name in ("product2img", "epbd-ft"):
        assert method.prompts(NAMES)[0] == f"{NAMES[0]} <background>"
    else:
        assert method.prompts(NAMES)[0] == template
    # Product pixels (mask == 255) are the input's, exactly.
    for generated, canvas, mask in zip(out, canvases, masks):
        keep = np.asarray(mask) == 255
        assert np.array_equal(np.asarray(generated)[keep], np.asarray(canvas)[keep])
    # The background was generated, not copied.
    bg = np.asarray(masks[0]) == 0
    assert not np.array_equal(np.asarray(out[0])[bg], np.asarray(canvases[0])[bg])


@pytest.mark.parametrize("name", ["sd-inpainting", "ip-adapter"])
def test_seeds_reproduce_and_differ(methods, scenes, name):
    method = methods[name]
    canvases, masks = scenes
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2)
    a = method.generate(NAMES[:1], canvases[:1], masks[:1], seed=7, **kw)[0]
    b = method.generate(NAMES[:1], canvases[:1], masks[:1], seed=[7], **kw)[0]
    c = method.generate(NAMES[:1], canvases[:1], masks[:1], seed=8, **kw)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # An image depends on its own seed, not on its place in the batch (up to float noise).
    pair = method.generate(NAMES[::-1], canvases[::-1], masks[::-1], seed=[8, 7], **kw)
    assert np.abs(np.asarray(pair[1], dtype=int) - np.asarray(a, dtype=int)).max() <= 2


def test_paste_off_leaves_the_pipeline_output(methods, scenes):
    method = methods["sd-inpainting"]
    canvases, masks = scenes
    method.paste_product = False
    try:
        raw = method.generate(NAMES[:1], canvases[:1], masks[:1], height=SIZE, width=SIZE, num_inference_steps=2)
    finally:
        method.paste_product = True
    keep = np.asarray(masks[0]) == 255
    assert not np.array_equal(np.asarray(raw[0])[keep], np.asarray(canvases[0])[keep])  # VAE round trip


def test_controlnet_sees_the_canny_map_of_the_product_canvas(methods, scenes):
    method = methods["controlnet-canny"]
    assert isinstance(method, ControlNetInpaintingCannyMethod)
    canvases, masks = scenes
    seen = []
    handle = method.pipe.controlnet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["controlnet_cond"].detach().cpu()), with_kwargs=True)
    try:
        method.generate(NAMES[:1], canvases[:1], masks[:1], height=SIZE, width=SIZE, num_inference_steps=2,
                        guidance_scale=1.0)
    finally:
        handle.remove()
    expected = torch.from_numpy(np.asarray(canny_control_image(canvases[0]), dtype=np.float32) / 255.0)
    assert seen and torch.allclose(seen[0][0].permute(1, 2, 0), expected)
    assert expected.sum() > 0  # the outline is there
    assert method.describe()["controlnet"] == method.controlnet_id


def test_ip_adapter_goes_through_load_ip_adapter_and_reads_the_product(methods, scenes):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    method = methods["ip-adapter"]
    pipe = method.pipe
    assert pipe.unet.encoder_hid_proj is not None
    assert any(isinstance(p, IPAdapterAttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert pipe.image_encoder.config.image_size == 32  # loaded from models/image_encoder
    canvases, masks = scenes
    seen = []
    handle = pipe.image_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["pixel_values"]).detach().cpu()),
        with_kwargs=True)
    try:
        method.generate(NAMES, canvases, masks, height=SIZE, width=SIZE, num_inference_steps=2)
    finally:
        handle.remove()
    for canvas, pixels in zip(canvases, seen):  # one call per product, the product canvas as image prompt
        expected = pipe.feature_extractor(canvas, return_tensors="pt").pixel_values
        assert torch.allclose(pixels, expected)
    assert len(seen) == 2
    # The image prompt matters: scale 0 gives another background than the default 0.5.
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2, seed=1)
    with_ip = method.generate(NAMES[:1], canvases[:1], masks[:1], **kw)[0]
    pipe.set_ip_adapter_scale(0.0)
    try:
        without = method.generate(NAMES[:1], canvases[:1], masks[:1], **kw)[0]
    finally:
        pipe.set_ip_adapter_scale(method.ip_adapter_scale)
    assert not np.array_equal(np.asarray(with_ip), np.asarray(without))


def test_epbd_ft_follows_the_checkpoint_format(methods, model_dirs):
    p2i, sd = methods["epbd-ft"], methods["epbd-ft-sd"]
    assert isinstance(p2i.inner, Product2ImgMethod) and p2i.describe()["checkpoint_format"] == "Product2ImgPipeline"
    assert isinstance(sd.inner, SDInpaintingMethod)
    assert sd.describe()["checkpoint_format"] == "StableDiffusionInpaintPipeline"
    assert sd.prompts(NAMES) == [uniform_prompt(n) for n in NAMES]
    forced = build_method("epbd-ft", model_dirs["p2i"], prompt="template")
    assert forced.prompts(NAMES[:1]) == [f"{uniform_prompt(NAMES[0])} <background>"]


def test_inputs_are_checked(methods, scenes):
    canvases, masks = scenes
    method = methods["sd-inpainting"]
    with pytest.raises(ValueError, match="prepare the canvases"):
        method.generate(NAMES[:1], [canvases[0].resize((32, 32))], [masks[0].resize((32, 32))], height=SIZE,
                        width=SIZE)
    with pytest.raises(ValueError, match="one of each"):
        method.generate(NAMES, canvases[:1], masks[:1], height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="one seed per image"):
        method.generate(NAMES, canvases, masks, height=SIZE, width=SIZE, seed=[1])
    with pytest.raises(ValueError, match="empty"):
        method.generate(NAMES[:1], canvases[:1], [Image.new("L", (SIZE, SIZE), 0)], height=SIZE, width=SIZE)


# ------------------------------------------------------------------------------------------------
# The harness and the CLI
# ------------------------------------------------------------------------------------------------


def write_tiny_epbd_export(root, n=3):
    """An exported-EPBD-like Parquet folder: id, product_name, category, image, cutout (RGBA), mask."""
    import datasets

    rows = {"id": [], "product_name": [], "category": [], "image": [], "cutout": [], "mask": []}
    for i in range(n):
        canvas, mask = product_scene(i, color=(40 * i + 60, 90, 200 - 40 * i))
        background = Image.new("RGB", (80, 80), (90, 160 - 20 * i, 90))
        big_mask = Image.new("L", (80, 80), 0)
        big_mask.paste(mask, (8, 8))
        big_product = Image.new("RGB", (80, 80))
        big_product.paste(canvas, (8, 8))
        image = Image.composite(big_product, background, big_mask)  # 80x80: the benchmark resizes to 64
        cutout = image.convert("RGBA")
        cutout.putalpha(big_mask)
        rows["id"].append(f"p{i}")
        rows["product_name"].append(NAMES[i % 2])
        rows["category"].append("mug")
        rows["image"].append(image)
        rows["cutout"].append(cutout)
        rows["mask"].append(big_mask)
    features = datasets.Features({
        "id": datasets.Value("string"), "product_name": datasets.Value("string"),
        "category": datasets.Value("string"), "image": datasets.Image(), "cutout": datasets.Image(),
        "mask": datasets.Image(),
    })
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        os.path.join(root, "data", "test-00000-of-00001.parquet"))
    return str(root)


def test_run_benchmark_api_same_seeds_and_resume(methods, tmp_path):
    canvases, masks = zip(*(product_scene(i) for i in range(2)))
    samples = [BenchmarkSample(f"s{i}", NAMES[i], canvases[i], masks[i], reference=canvases[i]) for i in range(2)]
    chosen = [methods["sd-inpainting"], methods["product2img"]]
    out = tmp_path / "bench"
    result = run_benchmark(chosen, samples, out, resolution=SIZE, num_inference_steps=2, seed=5, skip_metrics=True)
    assert result["metrics"] is None and result["table"] is None
    assert result["settings"]["paste_product"] is True
    assert [s["seed"] for s in result["samples"]] == [5, 6]
    for name in ("sd-inpainting", "product2img"):
        assert sorted(os.listdir(out / name)) == ["s0.png", "s1.png"]  # no temp files left
    # Image 1 of a method is what the method gives for that product with seed 5 + 1.
    direct = methods["sd-inpainting"].generate(NAMES[1:], canvases[1:], masks[1:], height=SIZE, width=SIZE,
                                               num_inference_steps=2, seed=6)[0]
    saved = np.asarray(Image.open(out / "sd-inpainting" / "s1.png"))
    assert np.abs(saved.astype(int) - np.asarray(direct, dtype=int)).max() <= 2
    manifest = json.loads((out / "benchmark.json").read_text())
    assert manifest["methods"]["sd-inpainting"]["prompts"]["s0"] == uniform_prompt(NAMES[0])
    assert manifest["methods"]["product2img"]["prompts"]["s0"] == f"{NAMES[0]} <background>"
    # A second run reuses the images; other settings in the same folder are refused.
    again = run_benchmark(chosen, samples, out, resolution=SIZE, num_inference_steps=2, seed=5, skip_metrics=True)
    assert again["methods"]["sd-inpainting"]["reused"] == 2
    with pytest.raises(ValueError, match="other settings"):
        run_benchmark(chosen, samples, out, resolution=SIZE, num_inference_steps=3, seed=5, skip_metrics=True)
    # Methods scored in separate runs share one table, in Table-1 order.
    from diffusers_product2img.metrics import EvalConfig

    clip = save_tiny_clip_model(tmp_path / "clip")
    config = EvalConfig(clip_model=clip, pickscore_model=clip, pickscore_processor=clip, aesthetic_weights=None,
                        fid="none", metrics=("pickscore", "fidelity"))
    kw = dict(resolution=SIZE, num_inference_steps=2, seed=5, eval_config=config)
    run_benchmark(chosen[1:], samples, out, **kw)
    result = run_benchmark(chosen[:1], samples, out, **kw)
    assert list(result["metrics"]) == ["SD-Inpainting"]
    table = json.loads((out / "metrics.json").read_text())["rows"]
    assert list(table) == ["SD-Inpainting", "Product2Img"]
    assert table["Product2Img"]["metrics"]["ExactPixel"] == 1.0


def test_load_benchmark_samples_from_parquet_export(tmp_path):
    root = write_tiny_epbd_export(tmp_path / "epbd")
    samples = load_benchmark_samples(root, "test", limit=2, resolution=SIZE)
    assert [s.id for s in samples] == ["p0", "p1"]
    for s in samples:
        assert s.product_image.size == s.product_mask.size == s.reference.size == (SIZE, SIZE)
        keep = np.asarray(s.product_mask) == 255
        assert keep.any()
        # The method input is the product on white; the real background stays in the reference only.
        assert np.array_equal(np.asarray(s.product_image)[keep], np.asarray(s.reference)[keep])
        assert (np.asarray(s.product_image)[np.asarray(s.product_mask) == 0] == 255).all()


def test_load_benchmark_samples_from_raw_epbd(tmp_path):
    from diffusers_product2img.data import generate_epbd_synth

    root = generate_epbd_synth(tmp_path / "raw", resolution=32, num_train=2, num_validation=0, num_test=2,
                                     num_test_unseen=0, num_unseen_categories=0)
    samples = load_benchmark_samples(root, "test", resolution=SIZE)
    assert len(samples) == 2 and all(s.product_image.size == (SIZE, SIZE) for s in samples)
    assert all(np.asarray(s.product_mask).max() > 0 for s in samples)


def test_cli_benchmark_all_methods_one_table(model_dirs, tmp_path, capsys):
    from diffusers_product2img.data import export_epbd, generate_epbd_synth

    # EPBD-synth through the package's own exporter: the Parquet + README configs a user would have.
    raw = generate_epbd_synth(tmp_path / "raw", resolution=32, num_train=2, num_validation=0, num_test=3,
                              num_test_unseen=0, num_unseen_categories=0)
    dataset = str(export_epbd(raw, tmp_path / "epbd"))
    clip = save_tiny_clip_model(tmp_path / "clip")
    out = tmp_path / "bench"
    argv = [
        "benchmark", "--dataset", dataset, "--split", "test", "--limit", "2", "--out", str(out),
        "--methods", "sd-inpainting,controlnet-canny,ip-adapter,epbd-ft,product2img",
        "--model-sd-inpainting", model_dirs["sd"], "--model-controlnet-canny", model_dirs["sd"],
        "--model-ip-adapter", model_dirs["sd"], "--controlnet-model", model_dirs["controlnet"],
        "--ip-adapter", model_dirs["ip"], "--model-epbd-ft", model_dirs["p2i"],
        "--model-product2img", model_dirs["p2i"],
        "--steps", "2", "--size", "64", "--seed", "3", "--device", "cpu", "--quiet",
        "--clip-model", clip, "--pickscore-model", clip, "--pickscore-processor", clip,
        "--aesthetic-weights", "random", "--fid", "fd-clip",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    ids = [s["id"] for s in json.loads((out / "benchmark.json").read_text())["samples"]]
    assert len(ids) == 2  # --limit
    for name in METHODS:
        assert sorted(os.listdir(out / name)) == sorted(f"{i}.png" for i in ids)
    table = (out / "metrics.md").read_text()
    for display in ("SD-Inpainting", "ControlNet-Inpainting (canny)", "IP-Adapter", "EPBD-FT", "Product2Img"):
        assert f"| {display} |" in table
    assert "FD-CLIP" in table and "PickScore" in table and "CLIP-c-B" in table
    assert "| SD-Inpainting |" in printed
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert all(r["metrics"]["ExactPixel"] == 1.0 for r in rows.values())  # product pasted back for all
    manifest = json.loads((out / "benchmark.json").read_text())
    assert manifest["settings"]["uniform_prompt_template"] == "{product_name}, high-quality and appropriate background"
    assert manifest["settings"]["split"] == "test" and manifest["settings"]["paste_product"] is True
    assert manifest["methods"]["ip-adapter"]["describe"]["ip_adapter_scale"] == 0.5
    # Other settings in the same folder: a one-line error (resuming is tested on run_benchmark).
    assert main(argv + ["--steps", "3"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_cli_checks_before_loading(tmp_path, capsys):
    code = main(["benchmark", "--dataset", str(tmp_path), "--out", str(tmp_path / "o"), "--methods", "product2img"])
    assert code == 2 and "--model-product2img" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["benchmark", "--dataset", str(tmp_path), "--out", str(tmp_path / "o"), "--methods", "powerpaint"])
    with pytest.raises(SystemExit):
        main(["benchmark", "--dataset", str(tmp_path), "--out", str(tmp_path / "o"), "--size", "64x32"])
