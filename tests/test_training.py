"""Training (paper 4.3, 5.1.1) on EPBD-synth with tiny components: losses go down, the right
parameters move at the right speed, resume is exact, the cache changes nothing, LoRA round-trips,
and two processes see the global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_helpers import base_args, epbd_train_dataset, load_train_script, make_epbd_synth
from PIL import Image
from safetensors.torch import load_file

from diffusers_product2img import Product2ImgPipeline
from diffusers_product2img.background_token import background_token_id
from diffusers_product2img.cba import CBA_PROJECTION_DIR, TextToImageProjection, load_clip_image_encoder
from diffusers_product2img.training import (
    CBAConfig,
    EpochOrder,
    FrozenEmbeddingRows,
    MicroBatchSampler,
    PositionDataset,
    Product2ImgCollator,
    encode_frozen_features,
    parameter_groups,
    training_step,
)
from diffusers_product2img.training.cache import FeatureCache, build_feature_cache, feature_cache_key
from diffusers_product2img.training.model_card import push_output_to_hub, render_model_card


@pytest.fixture(scope="module")
def script():
    return load_train_script()


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return make_epbd_synth(tmp_path_factory.mktemp("epbd") / "epbd-synth")


@pytest.fixture(scope="module")
def train_ds(synth_root):
    return epbd_train_dataset(synth_root)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from diffusers_product2img.testing import save_tiny_clip_model

    return save_tiny_clip_model(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The runs are tiny: one thread avoids OpenMP spin-waiting when the CPU cores are shared (10x here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # Several in-process runs: accelerate keeps process-wide singletons.
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_training(script, args_list, dataset, **kwargs):
    args = script.parse_args(args_list)
    return Path(script.train(args, train_dataset=dataset, **kwargs))


def state(out: Path) -> dict:
    """All trained weights of an output folder."""
    tensors = {f"unet.{k}": v for k, v in load_file(out / "unet" / "diffusion_pytorch_model.safetensors").items()}
    tensors.update({f"text_encoder.{k}": v for k, v in load_file(out / "text_encoder" / "model.safetensors").items()})
    if (out / CBA_PROJECTION_DIR).exists():
        proj = load_file(out / CBA_PROJECTION_DIR / "diffusion_pytorch_model.safetensors")
        tensors.update({f"proj.{k}": v for k, v in proj.items()})
    return tensors


def assert_same_weights(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"


# ----------------------------------------------------------------------------------- unit parts


def test_defaults_are_the_papers(script):
    args = script.parse_args([])
    assert (args.learning_rate, args.text_encoder_learning_rate, args.projection_learning_rate) == (1e-5, 1e-6, None)
    assert (args.cba_weight, args.cba_temperature, args.lr_scheduler) == (0.01, 0.05, "cosine")
    assert (args.resolution, args.report_to, args.no_cba, args.no_gather_features) == (512, "tensorboard", False, False)
    assert args.clip_model_name_or_path == "openai/clip-vit-large-patch14"


def test_parameter_groups_and_frozen_rows_survive_adamw_weight_decay():
    from diffusers_product2img.testing import tiny_inpainting_components

    pipe = Product2ImgPipeline.from_components(**tiny_inpainting_components())
    te, unet = pipe.text_encoder, pipe.unet
    proj = TextToImageProjection(32, 32)
    bg = background_token_id(pipe.tokenizer)
    guard = FrozenEmbeddingRows(te.get_input_embeddings(), [bg])
    groups = parameter_groups(unet, te, proj, learning_rate=1e-3, text_encoder_learning_rate=1e-4,
                              projection_learning_rate=5e-4, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert {k: (g["lr"], g["weight_decay"]) for k, g in by_name.items()} == {
        "unet": (1e-3, 0.1), "token_embedding": (1e-3, 0.0), "text_encoder": (1e-4, 0.1), "cba_projection": (5e-4, 0.1),
    }
    embedding = te.get_input_embeddings().weight
    assert by_name["token_embedding"]["params"] == [embedding]
    assert all(p is not embedding for p in by_name["text_encoder"]["params"])
    n_te = sum(p.numel() for p in te.parameters())
    assert sum(p.numel() for g in ("token_embedding", "text_encoder") for p in by_name[g]["params"]) == n_te

    # Even with weight decay on the embedding group, the guard keeps the frozen rows bit-identical.
    for g in groups:
        g["weight_decay"] = 0.5
    before = embedding.detach().clone()
    opt = torch.optim.AdamW(groups)
    ids = torch.tensor([[49, 50, bg, 51]])
    for _ in range(3):
        te(ids)[0].pow(2).mean().backward()
        assert embedding.grad[bg].abs().sum() > 0
        assert embedding.grad[torch.arange(len(embedding)) != bg].abs().sum() == 0
        opt.step()
        guard.restore()
        opt.zero_grad()
    rows = torch.arange(len(embedding)) != bg
    assert torch.equal(embedding[rows], before[rows]) and guard.frozen_rows_unchanged()
    assert not torch.equal(embedding[bg], before[bg])
    # without the restore, weight decay alone moves the rows whose gradient is zero
    te(ids)[0].pow(2).mean().backward()
    opt.step()
    assert not torch.equal(embedding[rows], before[rows])


def test_sample_order_is_independent_of_process_count_and_of_resuming():
    order = EpochOrder(num_rows=10, global_batch_size=4, seed=3)
    assert order.steps_per_epoch == 2
    one = list(MicroBatchSampler(0, 5, 4))
    two = [list(MicroBatchSampler(0, 5, 2, 2, r)) for r in range(2)]
    assert [a + b for a, b in zip(*two)] == one
    assert list(MicroBatchSampler(3, 5, 4)) == one[3:]
    data = PositionDataset([{"i": i} for i in range(10)], order)
    epoch0 = [data[p]["i"] for p in range(8)]
    assert len(set(epoch0)) == 8  # one epoch: no repeats; the 2 left over are dropped
    assert [data[p]["_row_index"] for p in range(8, 16)] == order.permutation(1)[:8].tolist()
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochOrder(3, 4)


def test_collator_builds_what_the_pipeline_builds(train_ds):
    from diffusers_product2img.placement import inpainting_condition
    from diffusers_product2img.testing import tiny_clip_model, tiny_inpainting_components

    pipe = Product2ImgPipeline.from_components(**tiny_inpainting_components())
    _, processor, _ = tiny_clip_model()
    rows = [train_ds[i] for i in range(3)]
    batch = Product2ImgCollator(pipe.tokenizer, 64, processor)(rows)
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and batch["inpaint_mask"].shape == (3, 1, 64, 64)
    assert batch["clip_background_pixel_values"].shape == (3, 3, 32, 32)
    # the masked image and the mask follow Product2ImgPipeline: product kept, background 0, mask 1 = generate
    rgb = np.asarray(rows[0]["image"], dtype=np.float32) / 255.0
    product = np.asarray(rows[0]["mask"], dtype=np.float32)[None] / 255.0
    inpaint = (product < 0.5).astype(np.float32)
    assert torch.allclose(batch["inpaint_mask"][0], torch.from_numpy(inpaint))
    expected = (torch.from_numpy(rgb).permute(2, 0, 1) * 2 - 1) * (1 - torch.from_numpy(inpaint))
    assert torch.allclose(batch["masked_pixel_values"][0], expected, atol=1e-6)
    mask, masked = inpainting_condition(batch["pixel_values"], 1 - batch["inpaint_mask"])
    assert torch.equal(mask, batch["inpaint_mask"]) and torch.equal(masked, batch["masked_pixel_values"])
    from diffusers_product2img import tokenize_product_names

    ids = tokenize_product_names(pipe.tokenizer, [r["product_name"] for r in rows])
    assert torch.equal(batch["input_ids"], ids.input_ids)
    assert torch.equal(batch["background_positions"], ids.background_positions)
    again = Product2ImgCollator(pipe.tokenizer, 64, processor)(rows)
    assert all(torch.equal(batch[k], again[k]) for k in batch)  # random-free


def test_feature_cache_round_trips_and_cached_step_equals_uncached(train_ds, clip_dir, tmp_path):
    from diffusers_product2img.testing import tiny_inpainting_components

    pipe = Product2ImgPipeline.from_components(**tiny_inpainting_components())
    clip, processor, text_proj = load_clip_image_encoder(clip_dir)
    collate = Product2ImgCollator(pipe.tokenizer, 64, processor)
    key = feature_cache_key(train_ds._fingerprint, vae_digest="v", clip_digest="c", resolution=64)
    assert key != feature_cache_key(train_ds._fingerprint, vae_digest="v", clip_digest="c", resolution=128)
    assert key != feature_cache_key(train_ds._fingerprint, vae_digest="v2", clip_digest="c", resolution=64)
    cache = build_feature_cache(tmp_path / key, 6, lambda idx: collate([train_ds[i] for i in idx]),
                                vae=pipe.vae, clip_model=clip, shard_size=4, batch_size=3)
    assert sorted(os.listdir(tmp_path / key)) == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    assert FeatureCache.exists(tmp_path / key) and len(cache) == 6
    rows = [train_ds[i] for i in (5, 1, 4)]
    for i, r in zip((5, 1, 4), rows):
        r["_row_index"], r["_position"] = i, 100 + i
    image_batch = collate(rows)
    direct = encode_frozen_features(image_batch, pipe.vae, clip)
    cached_batch = Product2ImgCollator(pipe.tokenizer, 64, feature_cache=cache)(rows)
    for k, v in direct.items():
        assert torch.allclose(cached_batch[k], v, atol=1e-6), k
    proj = TextToImageProjection.from_text_projection(text_proj, 32, 32)
    common = dict(unet=pipe.unet, text_encoder=pipe.text_encoder, noise_scheduler=pipe.scheduler,
                  vae_scaling_factor=pipe.vae.config.scaling_factor, seed=0, projection=proj, vae=pipe.vae,
                  clip_model=clip, cba=CBAConfig())
    a = training_step(image_batch, **common)
    b = training_step(cached_batch, **common)
    assert a.logs() == pytest.approx(b.logs(), rel=1e-5)
    assert a.cba_batch_size == 3 and a.loss.item() == pytest.approx(a.total, rel=1e-6)


def test_model_card_never_holds_secrets(tmp_path):
    card = str(render_model_card(
        base_model="stable-diffusion-v1-5/stable-diffusion-inpainting", dataset="me/epbd (config idr_round_2)",
        hyperparameters={"learning_rate": 1e-5, "hub_token": "hf_abcdefghijklmnop", "api_key": "x",
                         "note": "hf_secretsecretsecret", "background_token": "<background>"},
        validation_grid="validation_grid.png", validation_names=["Mug"],
    ))
    assert "hf_" not in card and "api_key" not in card and "hub_token" not in card
    assert "<background>" in card and "learning_rate" in card and "validation_grid.png" in card
    assert "base_model: stable-diffusion-v1-5/stable-diffusion-inpainting" in card


def test_push_uploads_the_folder_without_checkpoints(tmp_path):
    class FakeApi:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return lambda *a, **k: self.calls.append((name, a, k))

    api = FakeApi()
    push_output_to_hub(tmp_path, "me/p2i", revision="round-2", api=api)
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    upload = api.calls[-1][2]
    assert upload["revision"] == "round-2" and "checkpoint-*" in upload["ignore_patterns"]


# ------------------------------------------------------------------------------- training runs


def fixed_batch_loss(out_or_pipe, projection, clip, dataset):
    """Eq. 5 on a fixed batch (same noise and timesteps every call)."""
    pipe = out_or_pipe
    collate = Product2ImgCollator(pipe.tokenizer, 64, clip[1])
    rows = [dict(dataset[i], _position=i, _row_index=i) for i in range(8)]
    with torch.no_grad():
        out = training_step(collate(rows), unet=pipe.unet, text_encoder=pipe.text_encoder,
                            noise_scheduler=pipe.scheduler, vae_scaling_factor=pipe.vae.config.scaling_factor,
                            seed=123, projection=projection, vae=pipe.vae, clip_model=clip[0], cba=CBAConfig())
    return out.logs()


def test_training_reduces_the_loss_moves_only_the_right_parameters(script, tiny_inpainting_dir, clip_dir, train_ds,
                                                                  tmp_path):
    logs = {}
    out = run_training(script, base_args(
        tiny_inpainting_dir, clip_dir, tmp_path / "out", "--max_train_steps", 6, "--learning_rate", 1e-3,
        "--text_encoder_learning_rate", 1e-4, "--projection_learning_rate", 3e-3, "--lr_scheduler", "constant",
        "--num_validation_products", 2, "--validation_inference_steps", 1,
    ), train_ds, step_callback=lambda step, step_logs: logs.setdefault(step, step_logs))
    # learning rates per group are what the flags say
    assert logs[1]["lr/unet"] == logs[1]["lr/token_embedding"] == 1e-3
    assert (logs[1]["lr/text_encoder"], logs[1]["lr/cba_projection"]) == (1e-4, 3e-3)
    assert logs[1]["cba_batch_size"] == 4

    clip = load_clip_image_encoder(clip_dir)
    init = Product2ImgPipeline.from_inpainting(tiny_inpainting_dir)
    init_proj = TextToImageProjection.from_text_projection(clip[2], 32, 32)
    trained = Product2ImgPipeline.from_pretrained(out)
    trained_proj = TextToImageProjection.from_pretrained(out / CBA_PROJECTION_DIR)
    before = fixed_batch_loss(init, init_proj, clip, train_ds)
    after = fixed_batch_loss(trained, trained_proj, clip, train_ds)
    assert after["loss_inpaint"] < before["loss_inpaint"]
    assert after["loss_cba_background"] + after["loss_cba_sentence"] < before["loss_cba_background"] + before["loss_cba_sentence"]
    assert after["loss"] < before["loss"]

    # every embedding row but <background> is bit-identical; <background> and the rest moved
    bg = background_token_id(trained.tokenizer)
    e0, e1 = init.text_encoder.get_input_embeddings().weight, trained.text_encoder.get_input_embeddings().weight
    rows = torch.arange(len(e0)) != bg
    assert torch.equal(e0[rows], e1[rows]) and not torch.equal(e0[bg], e1[bg])
    sd0, sd1 = init.text_encoder.state_dict(), trained.text_encoder.state_dict()
    moved = [k for k in sd0 if "token_embedding" not in k and not torch.equal(sd0[k], sd1[k])]
    assert any("final_layer_norm" in k for k in moved) and any("self_attn" in k for k in moved)
    assert torch.equal(load_file(out / "learned_embeds.safetensors")["<background>"], e1[bg])
    # a complete pipeline folder, safetensors only, with its card and grid
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    card = (out / "README.md").read_text()
    assert "validation_grid.png" in card and str(tiny_inpainting_dir) in card and "0.01" in card
    assert Image.open(out / "validation_grid.png").size == (2 * 64, 2 * 64)
    from diffusers import DiffusionPipeline

    generic = DiffusionPipeline.from_pretrained(out, custom_pipeline=str(out), trust_remote_code=True)
    assert type(generic).__name__ == "Product2ImgPipeline"


def test_raw_epbd_folder_ids_file_and_idr_rounds(script, tiny_inpainting_dir, clip_dir, synth_root, train_ds, tmp_path):
    """--train_data_dir on a raw EPBD-synth folder, --train_ids_file, and the IDR round adapter: round 2
    starts from round 1's folder (with lr 0 it must come out identical, projection included)."""
    kept = list(train_ds["id"])[:8]
    common = ["--train_data_dir", synth_root, "--cache_dir", tmp_path / "cache", "--num_validation_products", 1,
              "--validation_inference_steps", 1, "--use_feature_cache", "--feature_cache_dir", tmp_path / "features"]
    train_round = script.round_trainer(base_args(tiny_inpainting_dir, clip_dir, "unused", *common))
    out1 = train_round(1, kept, None, 1, tmp_path / "round-1")
    assert (out1 / "train_ids.txt").read_text().split() == kept
    from diffusers_product2img.data import load_epbd

    (exported,) = list((tmp_path / "cache" / "epbd_exports").iterdir())
    first_validation = load_epbd(exported, None, split="validation")[0]["product_name"]
    assert first_validation in (out1 / "README.md").read_text()  # validated on the validation split
    zero_lr = script.round_trainer(base_args(tiny_inpainting_dir, clip_dir, "unused", *common, "--learning_rate", 0,
                                             "--text_encoder_learning_rate", 0, "--adam_weight_decay", 0))
    out2 = zero_lr(2, kept[:4], str(out1), 1, tmp_path / "round-2")
    assert_same_weights(state(out2), state(out1), atol=0)
    assert len(list((tmp_path / "features").iterdir())) == 1  # one cache (full train split) for both rounds
    assert len(list((tmp_path / "cache" / "epbd_exports").iterdir())) == 1  # one export for both rounds
    with pytest.raises(ValueError, match="not in the training data"):
        (tmp_path / "ids.txt").write_text("nope\n")
        run_training(script, base_args(tiny_inpainting_dir, clip_dir, tmp_path / "x", *common, "--train_ids_file",
                                       tmp_path / "ids.txt"), None)


@pytest.fixture(scope="module")
def reference_run(script, tiny_inpainting_dir, clip_dir, train_ds, tmp_path_factory):
    """4 uninterrupted steps from images, with checkpoints every 2 (the resume and cache baseline)."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    logs = {}
    args = base_args(tiny_inpainting_dir, clip_dir, out, "--max_train_steps", 4, "--checkpointing_steps", 2,
                     "--learning_rate", 1e-3, "--text_encoder_learning_rate", 1e-4, "--lr_warmup_steps", 1)
    from accelerate.state import AcceleratorState, GradientState

    run_training(script, args, train_ds, step_callback=lambda s, step_logs: logs.setdefault(s, step_logs))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out, args, logs


class Killed(Exception):
    pass


def test_kill_and_resume_equals_an_uninterrupted_run(script, reference_run, train_ds, tmp_path):
    ref_out, ref_args, ref_logs = reference_run
    out = tmp_path / "resumed"
    args = [a if a != str(ref_out) else str(out) for a in ref_args]

    def kill_at_3(step, logs):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        run_training(script, args, train_ds, step_callback=kill_at_3)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert not (out / "model_index.json").exists()
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    logs = {}
    run_training(script, args + ["--resume_from_checkpoint", "latest"], train_ds,
                 step_callback=lambda s, step_logs: logs.setdefault(s, step_logs))
    assert sorted(logs) == [3, 4]
    for step in (3, 4):
        assert logs[step] == pytest.approx(ref_logs[step], rel=1e-5)
    assert_same_weights(state(out), state(ref_out))


def test_training_from_the_feature_cache_equals_training_from_images(script, reference_run, train_ds, tmp_path):
    ref_out, ref_args, ref_logs = reference_run
    out = tmp_path / "cached"
    args = [a if a != str(ref_out) else str(out) for a in ref_args]
    args += ["--use_feature_cache", "--feature_cache_dir", str(tmp_path / "features"), "--checkpointing_steps", "0"]
    logs = {}
    run_training(script, args, train_ds, step_callback=lambda s, step_logs: logs.setdefault(s, step_logs))
    (cache_dir,) = list((tmp_path / "features").iterdir())
    assert json.loads((cache_dir / "manifest.json").read_text())["num_rows"] == len(train_ds)
    for step in (1, 2, 3, 4):
        assert logs[step] == pytest.approx(ref_logs[step], rel=1e-4)
    assert_same_weights(state(out), state(ref_out), atol=1e-5)


def test_no_cba_trains_the_epbd_ft_baseline(script, tiny_inpainting_dir, clip_dir, train_ds, tmp_path):
    row = train_ds[3]
    row["cutout"].save(tmp_path / "mug.png")
    (tmp_path / "products.jsonl").write_text(json.dumps({"product_name": "Matte Black Mug", "cutout": "mug.png"}) + "\n")
    logs = {}
    out = run_training(script, base_args(tiny_inpainting_dir, clip_dir, tmp_path / "ft", "--max_train_steps", 1,
                                         "--no_cba", "--clip_model_name_or_path", "does/not-exist",
                                         "--validation_products", tmp_path / "products.jsonl",
                                         "--num_validation_products", 4, "--validation_inference_steps", 1),
                       train_ds, step_callback=lambda s, step_logs: logs.setdefault(s, step_logs))
    assert "Validation products: Matte Black Mug." in (out / "README.md").read_text()
    assert Image.open(out / "validation_grid.png").size == (64, 128)
    assert "loss_cba_background" not in logs[1] and logs[1]["loss"] == logs[1]["loss_inpaint"]
    assert "lr/cba_projection" not in logs[1]
    assert not (out / CBA_PROJECTION_DIR).exists() and (out / "model_index.json").exists()
    assert "no CBA" in (out / "README.md").read_text()


def test_lora_mode_saves_adapters_that_load_back(script, tiny_inpainting_dir, clip_dir, train_ds, tmp_path):
    logs = {}
    out = run_training(script, base_args(
        tiny_inpainting_dir, clip_dir, tmp_path / "lora", "--max_train_steps", 2, "--use_lora", "--text_encoder_lora",
        "--lora_rank", 4, "--learning_rate", 1e-2, "--text_encoder_learning_rate", 1e-2,
        "--num_validation_products", 2, "--validation_inference_steps", 1, "--validation_guidance_scale", 1.0,
    ), train_ds, step_callback=lambda s, step_logs: logs.setdefault(s, step_logs))
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("unet.") for k in lora) and any(k.startswith("text_encoder.") for k in lora)
    assert all("lora" in k for k in lora)
    base = Product2ImgPipeline.from_inpainting(tiny_inpainting_dir)
    pipe = Product2ImgPipeline.from_pretrained(out)
    # the folder holds the base weights (and the learned <background> row); the adapters load on top
    assert_same_weights({k: v for k, v in pipe.unet.state_dict().items()}, base.unet.state_dict(), atol=0)
    bg = background_token_id(pipe.tokenizer)
    e0, e1 = base.text_encoder.get_input_embeddings().weight, pipe.text_encoder.get_input_embeddings().weight
    rows = torch.arange(len(e0)) != bg
    assert torch.equal(e0[rows], e1[rows]) and not torch.equal(e0[bg], e1[bg])
    pipe.load_lora_weights(out)
    pipe.set_progress_bar_config(disable=True)
    args = script.parse_args(base_args("x", "y", out, "--validation_inference_steps", 1, "--validation_guidance_scale", 1.0))
    rows = [train_ds[i] for i in range(2)]  # the first training products (no validation split given)
    images = script.generate_validation_images(pipe, rows, args)
    grid = np.asarray(script.validation_grid(rows, images, args), dtype=np.int16)
    saved = np.asarray(Image.open(out / "validation_grid.png"), dtype=np.int16)
    assert np.abs(grid - saved).max() <= 1  # the reloaded adapters give the images of the trained model
    pipe.unload_lora_weights()
    without = np.asarray(script.validation_grid(rows, script.generate_validation_images(pipe, rows, args), args), dtype=np.int16)
    assert np.abs(without - saved).max() > 1


def test_two_processes_gather_the_global_batch(script, tiny_inpainting_dir, clip_dir, synth_root, train_ds, tmp_path):
    """Two CPU processes (gloo): 2 x batch 2 trains exactly like 1 x batch 4.

    ``accelerate launch --cpu --num_processes 2`` starts a single process in accelerate 1.15 (its CPU
    launcher expects mpirun); torchrun's launcher with ``ACCELERATE_USE_CPU=1`` gives 2 gloo processes.
    """
    worker = Path(__file__).with_name("_dist_train_worker.py")
    out2 = tmp_path / "two"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1",
               PYTHONPATH=str(Path(__file__).parent))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(worker),
           str(synth_root), str(tiny_inpainting_dir), str(clip_dir), str(out2)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out2 / "dist_report.json").read_text())
    assert report["world_size"] == 2
    assert report["gather_grad_max_error"] < 1e-6
    assert all(step_logs["cba_batch_size"] == 4 for step_logs in report["logs"].values())

    logs = {}
    out1 = run_training(script, base_args(tiny_inpainting_dir, clip_dir, tmp_path / "one", "--max_train_steps", 2,
                                          "--learning_rate", 1e-3, "--text_encoder_learning_rate", 1e-4),
                        train_ds, step_callback=lambda s, step_logs: logs.setdefault(s, step_logs))
    for step in ("1", "2"):
        assert report["logs"][step] == pytest.approx(logs[int(step)], rel=1e-4)
    # Same update up to float noise. Adam divides by the gradient's magnitude, so an element whose gradient
    # is ~0 (k_proj biases, whose true gradient is 0) turns summation-order noise into a step of up to lr.
    a, b = state(out2), state(out1)
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diffs > 1e-6).float().mean() < 1e-3 and diffs.max() < 1e-3
