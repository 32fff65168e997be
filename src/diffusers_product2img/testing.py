"""A tiny, offline Product2Img world: components built from config with a fixed seed.

Nothing here downloads anything. Tests, the benchmarks and the offline demo use these builders in
place of the real SD-Inpainting and CLIP checkpoints, which need the Hub. The components are the
same stock classes as the real ones (``UNet2DConditionModel`` with 9 input channels,
``AutoencoderKL`` with an 8x downsampling, ``CLIPTextModel``, ``CLIPTokenizer``), only much smaller,
so every code path that runs here is the one that runs on real weights.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources

import torch

__all__ = [
    "tiny_clip_tokenizer",
    "tiny_text_encoder",
    "tiny_unet",
    "tiny_vae",
    "tiny_scheduler",
    "tiny_inpainting_components",
    "tiny_clip_model",
    "save_tiny_inpainting_pipeline",
    "save_tiny_product2img_pipeline",
    "save_tiny_clip_model",
]

TINY_HIDDEN_SIZE = 32
TINY_PROJECTION_DIM = 32


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable character table of GPT-2/CLIP byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP's BPE: repeatedly merge the lowest-ranked adjacent pair."""
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)
    return word


@lru_cache(maxsize=1)
def _tiny_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    words_file = resources.files("diffusers_product2img") / "assets" / "tiny_vocab_words.txt"
    words = sorted(set(words_file.read_text(encoding="utf-8").split()), key=lambda w: (len(w), w))
    base = list(_bytes_to_unicode().values())
    vocab_tokens = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    known = set(vocab_tokens)
    # Add merges so that every listed word becomes a single token. A merge appended later has a
    # higher rank than all earlier ones, so it never changes how an earlier word is split.
    for word in words:
        symbols = tuple(word[:-1]) + (word[-1] + "</w>",)
        pieces = _bpe(symbols, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in known:
                known.add(pair[0] + pair[1])
                vocab_tokens.append(pair[0] + pair[1])
            pieces = _bpe(symbols, ranks)
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_tokens)}, tuple(merges)


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A real ``CLIPTokenizer`` whose BPE vocabulary holds ~600 English product-listing words.

    Every listed word ("ceramic", "mug", "matte", "black", "kitchen", ...) is one token, anything
    else falls back to sub-words and characters, exactly as CLIP's own tokenizer does.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _tiny_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )


def tiny_text_encoder(vocab_size: int, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TINY_PROJECTION_DIM,
        # The tokenizer's eos id: CLIPTextModel pools the sentence feature at this token.
        eos_token_id=vocab_size - 1,
        bos_token_id=vocab_size - 2,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config).eval()


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=9,  # noisy latents 4 + mask 1 + masked-image latents 4, as in SD-Inpainting
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=16,
    ).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Four blocks give the 8x spatial downsampling of the real SD VAE (64x64 image -> 8x8 latents).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ).eval()


def tiny_scheduler():
    from diffusers import EulerAncestralDiscreteScheduler

    # The SD-1.5 noise schedule.
    return EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )


def tiny_inpainting_components(seed: int = 0) -> dict:
    """The five components of a (tiny) SD-Inpainting checkpoint, before any background token."""
    tokenizer = tiny_clip_tokenizer()
    return {
        "vae": tiny_vae(seed),
        "text_encoder": tiny_text_encoder(len(tokenizer), seed),
        "tokenizer": tokenizer,
        "unet": tiny_unet(seed),
        "scheduler": tiny_scheduler(),
    }


def save_tiny_inpainting_pipeline(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a complete tiny ``StableDiffusionInpaintPipeline`` folder (stands in for the SD-1.5 repo)."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(
        **tiny_inpainting_components(seed), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)


def save_tiny_product2img_pipeline(path: str | os.PathLike, seed: int = 0, background_token: str = "<background>") -> str:
    """Write a complete tiny ``Product2ImgPipeline`` folder (with the background token added)."""
    from .pipeline_product2img import Product2ImgPipeline

    pipe = Product2ImgPipeline.from_components(**tiny_inpainting_components(seed), background_token=background_token)
    pipe.save_pretrained(path)
    return str(path)


def tiny_clip_model(seed: int = 0):
    """A tiny ``CLIPModel`` (text + vision towers) and its ``CLIPImageProcessor``.

    It stands in for CLIP ViT-L/14 (the CBA image encoder, CLIP-c-I/-B) and the PickScore model.
    Its text tower shares the tiny tokenizer's vocabulary.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_HIDDEN_SIZE, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, eos_token_id=len(tokenizer) - 1,
        bos_token_id=len(tokenizer) - 2, pad_token_id=len(tokenizer) - 1,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8,
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
        projection_dim=TINY_PROJECTION_DIM,
    )
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True, do_resize=True,
    )
    return model, processor, tokenizer


def save_tiny_clip_model(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny CLIP folder loadable with ``CLIPModel.from_pretrained`` / ``CLIPImageProcessor``."""
    model, processor, tokenizer = tiny_clip_model(seed)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
