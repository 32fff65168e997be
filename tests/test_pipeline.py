"""Behaviour and diffusers-convention tests of Product2ImgPipeline on the tiny offline world."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionInpaintPipeline
from PIL import Image, ImageDraw, ImageFilter

from diffusers_product2img import (
    Product2ImgPipeline,
    load_learned_embeds,
    place_cutout,
    product_mask_from_alpha,
    tokenize_product_names,
)
from diffusers_product2img.testing import tiny_clip_tokenizer, tiny_inpainting_components

NAME = "Ceramic Coffee Mug 350ml Matte Black"
SIZE = 64


def make_cutout(size=(48, 64), color=(180, 40, 30)) -> Image.Image:
    """An RGBA product with a fully opaque body and a soft (anti-aliased) edge."""
    alpha = Image.new("L", size, 0)
    ImageDraw.Draw(alpha).ellipse((4, 4, size[0] - 5, size[1] - 5), fill=255)
    alpha = alpha.filter(ImageFilter.GaussianBlur(1))
    rgb = Image.new("RGB", size, color)
    ImageDraw.Draw(rgb).rectangle((10, 10, 20, 30), fill=(20, 200, 90))  # some texture on the product
    rgb.putalpha(alpha)
    return rgb


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    pipe = Product2ImgPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def product():
    return place_cutout(make_cutout(), size=(SIZE, SIZE), scale=0.6)


def run(pipe, names=NAME, images=None, masks=None, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("height", SIZE)
    kwargs.setdefault("width", SIZE)
    kwargs.setdefault("output_type", "np")
    if "generator" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return pipe(names, images, masks, **kwargs)


# ---------------------------------------------------------------- prompt building


def test_long_name_keeps_background_token_at_the_end():
    tokenizer = tiny_clip_tokenizer()
    from diffusers_product2img import add_background_token
    from diffusers_product2img.testing import tiny_text_encoder

    add_background_token(tokenizer, tiny_text_encoder(len(tokenizer)))
    bg_id = tokenizer.convert_tokens_to_ids("<background>")
    long_name = " ".join(["stainless steel insulated water bottle"] * 40)
    short = tokenize_product_names(tokenizer, [long_name, "red mug"])
    assert short.input_ids.shape == (2, 77)
    row = short.input_ids[0].tolist()
    assert row[-2:] == [bg_id, tokenizer.eos_token_id]  # filled to the limit, token kept last
    assert short.background_positions[0].item() == 75 and short.eos_positions[0].item() == 76
    assert row.count(bg_id) == 1
    # The short name: bos, red, mug, <background>, eos, then padding
    assert short.input_ids[1, :5].tolist() == [tokenizer.bos_token_id, *tokenizer("red mug", add_special_tokens=False).input_ids, bg_id, tokenizer.eos_token_id]
    assert short.background_positions[1].item() == 3


def test_from_inpainting_initialises_token_from_background_word(tiny_inpainting_dir):
    base = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpainting_dir)
    pipe = Product2ImgPipeline.from_inpainting(tiny_inpainting_dir)
    word_ids = base.tokenizer("background", add_special_tokens=False).input_ids
    expected = base.text_encoder.get_input_embeddings().weight[word_ids].mean(0)
    token_id = pipe.tokenizer.convert_tokens_to_ids("<background>")
    got = pipe.text_encoder.get_input_embeddings().weight[token_id]
    torch.testing.assert_close(got, expected)
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    # A word the tiny vocabulary splits into several pieces initialises from their mean
    pipe2 = Product2ImgPipeline.from_inpainting(tiny_inpainting_dir, background_token="<bg2>", initializer_word="backdropx")
    ids = base.tokenizer("backdropx", add_special_tokens=False).input_ids
    assert len(ids) > 1
    got2 = pipe2.text_encoder.get_input_embeddings().weight[pipe2.tokenizer.convert_tokens_to_ids("<bg2>")]
    torch.testing.assert_close(got2, base.text_encoder.get_input_embeddings().weight[ids].mean(0))
    assert pipe2.background_token == "<bg2>"


# ---------------------------------------------------------------- product fidelity


def test_product_pixels_are_exactly_kept(pipe, product):
    image, mask = product
    out = run(pipe, images=image, masks=mask, output_type="pil").images[0]
    out, src, m = np.asarray(out), np.asarray(image), np.asarray(mask)
    opaque = m == 255
    assert opaque.sum() > 200
    assert np.array_equal(out[opaque], src[opaque])
    # the background was generated, not copied from the white canvas
    assert (out[m == 0] != src[m == 0]).any(axis=-1).mean() > 0.9
    # without compositing, the product region comes from the decoder and differs
    raw = np.asarray(run(pipe, images=image, masks=mask, output_type="pil", keep_product_pixels=False).images[0])
    assert not np.array_equal(raw[opaque], src[opaque])
    # the soft edge band blends between the two (no hard halo): values lie between decoded and original
    edge = (m > 0) & (m < 255)
    assert edge.any()
    lo = np.minimum(raw[edge], src[edge]).astype(int) - 1
    hi = np.maximum(raw[edge], src[edge]).astype(int) + 1
    assert ((out[edge] >= lo) & (out[edge] <= hi)).all()


def test_rgba_cutout_mask_comes_from_alpha(pipe, product):
    image, mask = product
    rgba = image.copy()
    rgba.putalpha(mask)
    a = run(pipe, images=rgba).images
    b = run(pipe, images=image, masks=mask).images
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_any_size_and_aspect_ratio_is_fitted_without_stretching(pipe):
    cutout = make_cutout(size=(30, 60))
    canvas, mask = place_cutout(cutout, size=(120, 60), scale=0.9)  # wide input, product in the middle
    out = run(pipe, images=canvas, masks=mask, height=64, width=64).images[0]
    assert out.shape == (64, 64, 3)
    # the 120x60 canvas is scaled by 64/120 and centred: the product bbox keeps its aspect ratio
    placed = np.asarray(pipe.prepare_product(canvas, mask, 64, 64)[1])[..., 0]
    ys, xs = np.nonzero(placed > 0.5)
    src_ys, src_xs = np.nonzero(np.asarray(mask) > 127)
    ratio_in = (np.ptp(src_ys) + 1) / (np.ptp(src_xs) + 1)
    ratio_out = (np.ptp(ys) + 1) / (np.ptp(xs) + 1)
    assert abs(ratio_out - ratio_in) / ratio_in < 0.15
    assert placed[:10].max() == 0 and placed[-10:].max() == 0  # letterbox padding is background


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16"])
def test_non_rgb_modes_are_converted(pipe, product, mode):
    image, mask = product
    if mode == "I;16":
        arr = (np.asarray(image.convert("L"), dtype=np.uint16) * 257)
        converted = Image.fromarray(arr)
        assert converted.mode == "I;16"
    else:
        converted = image.convert(mode)
    out = run(pipe, images=converted, masks=mask, output_type="pil").images[0]
    expected = np.asarray(converted.convert("RGB") if mode != "I;16" else image.convert("L").convert("RGB"))
    opaque = np.asarray(mask) == 255
    assert np.array_equal(np.asarray(out)[opaque], expected[opaque])


# ---------------------------------------------------------------- diffusers conventions


def test_save_load_round_trip(pipe, product, tmp_path):
    image, mask = product
    before = run(pipe, images=image, masks=mask).images
    pipe.save_pretrained(tmp_path / "saved")
    for name in ("model_index.json", "learned_embeds.safetensors", "pipeline.py"):
        assert (tmp_path / "saved" / name).is_file()
    assert not list(tmp_path.glob(".saved.*"))  # no temporary folder left behind
    loaded = Product2ImgPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.background_token == "<background>"
    np.testing.assert_allclose(run(loaded, images=image, masks=mask).images, before, atol=1e-4)


def test_generic_loader_with_remote_code(tiny_pipeline_dir, pipe, product):
    loaded = DiffusionPipeline.from_pretrained(
        tiny_pipeline_dir, custom_pipeline=str(tiny_pipeline_dir), trust_remote_code=True
    )
    assert isinstance(loaded, Product2ImgPipeline)
    loaded.set_progress_bar_config(disable=True)
    image, mask = product
    np.testing.assert_allclose(run(loaded, images=image, masks=mask).images, run(pipe, images=image, masks=mask).images, atol=1e-5)


def test_learned_embeds_load_into_stock_inpainting_pipeline(tiny_pipeline_dir, tiny_inpainting_dir, pipe):
    stock = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpainting_dir)
    stock.load_textual_inversion(f"{tiny_pipeline_dir}/learned_embeds.safetensors")
    token_id = stock.tokenizer.convert_tokens_to_ids("<background>")
    ours = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<background>")]
    torch.testing.assert_close(stock.text_encoder.get_input_embeddings().weight[token_id], ours)
    # and our own loader puts it into a fresh tokenizer/encoder
    comps = tiny_inpainting_components()
    assert load_learned_embeds(f"{tiny_pipeline_dir}/learned_embeds.safetensors", comps["tokenizer"], comps["text_encoder"]) == "<background>"
    rebuilt = Product2ImgPipeline(**comps)
    assert rebuilt.tokenizer.convert_tokens_to_ids("<background>") == pipe.tokenizer.convert_tokens_to_ids("<background>")


def test_batch_equals_single_calls(pipe, product):
    image, mask = product
    other, other_mask = place_cutout(make_cutout(color=(20, 60, 200)), size=(SIZE, SIZE), scale=0.4, position="bottom")
    names = [NAME, "Bamboo Garden Plant Pot Large"]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    batched = run(pipe, names, [image, other], [mask, other_mask], generator=gens).images
    single = np.concatenate([
        run(pipe, names[0], image, mask, generator=torch.Generator().manual_seed(1)).images,
        run(pipe, names[1], other, other_mask, generator=torch.Generator().manual_seed(2)).images,
    ])
    np.testing.assert_allclose(batched, single, atol=1e-4)


@pytest.mark.parametrize("batch,per_prompt", [(1, 1), (1, 3), (2, 2)])
def test_num_images_per_prompt_shapes(pipe, product, batch, per_prompt):
    image, mask = product
    out = run(pipe, [NAME] * batch, [image] * batch, [mask] * batch, num_images_per_prompt=per_prompt)
    assert out.images.shape == (batch * per_prompt, SIZE, SIZE, 3)
    pil = run(pipe, [NAME] * batch, [image] * batch, [mask] * batch, num_images_per_prompt=per_prompt, output_type="pil")
    assert len(pil.images) == batch * per_prompt
    if per_prompt > 1:  # the repeats of one product are different images
        assert not np.allclose(out.images[0], out.images[1])


def test_output_types_and_tuple(pipe, product):
    image, mask = product
    pt = run(pipe, images=image, masks=mask, output_type="pt").images
    np_out = run(pipe, images=image, masks=mask, output_type="np").images
    latent = run(pipe, images=image, masks=mask, output_type="latent").images
    assert pt.shape == (1, 3, SIZE, SIZE) and 0 <= pt.min() and pt.max() <= 1
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), np_out, atol=1e-6)
    assert latent.shape == (1, 4, SIZE // 8, SIZE // 8)
    as_tuple = run(pipe, images=image, masks=mask, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    np.testing.assert_allclose(as_tuple[0], np_out, atol=1e-6)


def test_callback_can_zero_latents_on_last_step(pipe, product):
    image, mask = product
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((step, sorted(kwargs)))
        if step == p.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    out = run(pipe, images=image, masks=mask, output_type="latent", num_inference_steps=3,
              callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "mask"])
    assert [s for s, _ in seen] == [0, 1, 2]
    assert seen[0][1] == ["latents", "mask"]
    assert out.images.abs().sum() == 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(pipe, images=image, masks=mask, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["nope"])


def test_latents_and_prompt_embeds_inputs(pipe, product):
    image, mask = product
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    a = run(pipe, images=image, masks=mask, latents=latents, generator=torch.Generator().manual_seed(3)).images
    b = run(pipe, images=image, masks=mask, latents=latents, generator=torch.Generator().manual_seed(3)).images
    np.testing.assert_allclose(a, b, atol=1e-6)
    ids = tokenize_product_names(pipe.tokenizer, NAME).input_ids
    embeds = pipe.text_encoder(ids)[0]
    c = run(pipe, None, image, mask, prompt_embeds=embeds, latents=latents, generator=torch.Generator().manual_seed(3)).images
    np.testing.assert_allclose(a, c, atol=1e-5)
    # guidance changes the result; no guidance runs a single branch
    d = run(pipe, images=image, masks=mask, latents=latents, guidance_scale=1.0, generator=torch.Generator().manual_seed(3)).images
    assert not np.allclose(a, d, atol=1e-4)
    e = run(pipe, images=image, masks=mask, latents=latents, negative_prompt="white", generator=torch.Generator().manual_seed(3)).images
    assert not np.allclose(a, e, atol=1e-4)


def test_to_dtype(tiny_pipeline_dir, product):
    pipe = Product2ImgPipeline.from_pretrained(tiny_pipeline_dir).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    image, mask = product
    out = run(pipe, images=image, masks=mask, output_type="pil").images[0]
    opaque = np.asarray(mask) == 255
    assert np.array_equal(np.asarray(out)[opaque], np.asarray(image)[opaque])  # composite is done in float32


def test_default_scheduler_and_steps(pipe):
    import inspect

    sig = inspect.signature(Product2ImgPipeline.__call__)
    assert sig.parameters["num_inference_steps"].default == 30
    assert sig.parameters["height"].default == 512 and sig.parameters["width"].default == 512
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"


# ---------------------------------------------------------------- bad input


def test_bad_inputs_give_clear_errors(pipe, product, tiny_inpainting_dir):
    image, mask = product
    with pytest.raises(ValueError, match="no alpha channel"):
        run(pipe, images=image)
    with pytest.raises(ValueError, match="product mask is empty"):
        run(pipe, images=image, masks=Image.new("L", image.size, 0))
    with pytest.raises(ValueError, match="covers the whole image"):
        run(pipe, images=image, masks=Image.new("L", image.size, 255))
    with pytest.raises(ValueError, match="same size"):
        run(pipe, images=image, masks=mask.resize((32, 32)))
    with pytest.raises(ValueError, match="multiples of 8"):
        run(pipe, images=image, masks=mask, height=60)
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="empty"):
            run(pipe, bad, image, mask)
    with pytest.raises(ValueError, match="2 product names for 1 images"):
        run(pipe, [NAME, NAME], [image], [mask])
    with pytest.raises(ValueError, match="output_type"):
        run(pipe, images=image, masks=mask, output_type="jpeg")
    with pytest.raises(ValueError, match="no '<background>' token"):
        Product2ImgPipeline.from_pretrained(tiny_inpainting_dir)


def test_mask_helpers():
    cutout = make_cutout()
    mask = product_mask_from_alpha(cutout)
    assert mask.mode == "L" and np.asarray(mask).max() == 255
    with pytest.raises(ValueError, match="no alpha"):
        product_mask_from_alpha(cutout.convert("RGB"))
    with pytest.raises(ValueError, match="fully transparent"):
        place_cutout(Image.new("RGBA", (8, 8), (0, 0, 0, 0)))


def test_textual_inversion_mixin_loads_a_new_token_into_product_names(tiny_pipeline_dir, product, tmp_path):
    from safetensors.torch import save_file

    pipe = Product2ImgPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    vector = torch.randn(pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    save_file({"<marble-style>": vector}, tmp_path / "style.safetensors")
    pipe.load_textual_inversion(tmp_path / "style.safetensors")
    token_id = pipe.tokenizer.convert_tokens_to_ids("<marble-style>")
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[token_id], vector)
    ids = tokenize_product_names(pipe.tokenizer, "Matte Black Mug <marble-style>").input_ids[0].tolist()
    assert token_id in ids and ids.index(token_id) < ids.index(pipe.tokenizer.convert_tokens_to_ids("<background>"))
    image, mask = product
    with_style = run(pipe, "Matte Black Mug <marble-style>", image, mask).images
    without = run(pipe, "Matte Black Mug", image, mask).images
    assert not np.allclose(with_style, without, atol=1e-4)
