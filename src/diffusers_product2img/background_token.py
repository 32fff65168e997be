"""The learnable ``<background>`` token (paper 4.3) and the prompt built from a product name.

The conditioning text is always ``"{product name} <background>"``: no prompt writing. This module
is the single place that builds those token ids, used by the pipeline at inference and by the
training code, so both see exactly the same sequence (and the same positions of the background
and end-of-text tokens, which the contrastive loss pools).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "DEFAULT_BACKGROUND_TOKEN",
    "LEARNED_EMBEDS_NAME",
    "ProductPromptIds",
    "add_background_token",
    "background_token_id",
    "tokenize_product_names",
    "save_learned_embeds",
    "load_learned_embeds",
]

DEFAULT_BACKGROUND_TOKEN = "<background>"
LEARNED_EMBEDS_NAME = "learned_embeds.safetensors"


def background_token_id(tokenizer, background_token: str = DEFAULT_BACKGROUND_TOKEN) -> int:
    """The id of the background token, or a clear error if the tokenizer does not have it."""
    token_id = tokenizer.convert_tokens_to_ids(background_token)
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != background_token:
        raise ValueError(
            f"the tokenizer has no {background_token!r} token: this is not a Product2Img model. Build one from an "
            "SD-Inpainting checkpoint with Product2ImgPipeline.from_inpainting(...), or load its "
            f"{LEARNED_EMBEDS_NAME} with load_learned_embeds(...)"
        )
    return int(token_id)


def add_background_token(
    tokenizer,
    text_encoder,
    background_token: str = DEFAULT_BACKGROUND_TOKEN,
    initializer_word: str = "background",
) -> int:
    """Add the background token to a CLIP tokenizer/text encoder; initialise it from a word.

    The new embedding row is the embedding of ``initializer_word`` (the mean of its sub-token
    embeddings if the tokenizer splits it), as in the paper. Returns the new token id.
    """
    if background_token in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer already has {background_token!r}; pick another background_token")
    init_ids = tokenizer(initializer_word, add_special_tokens=False).input_ids
    if not init_ids:
        raise ValueError(f"initializer_word {initializer_word!r} tokenizes to nothing")
    tokenizer.add_tokens([background_token], special_tokens=False)
    token_id = background_token_id(tokenizer, background_token)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[token_id] = embeddings[init_ids].mean(dim=0)
    return token_id


@dataclass
class ProductPromptIds:
    """Token ids of ``"{name} <background>"`` prompts, padded to the tokenizer's length.

    Attributes:
        input_ids: ``(batch, model_max_length)`` long tensor.
        background_positions: ``(batch,)`` index of the background token in each row.
        eos_positions: ``(batch,)`` index of the end-of-text token (the sentence feature position).
    """

    input_ids: torch.LongTensor
    background_positions: torch.LongTensor
    eos_positions: torch.LongTensor


def check_product_names(names: str | list[str]) -> list[str]:
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError("product name(s) must be a non-empty string or a non-empty list of strings")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"product name #{i} is empty or not a string ({name!r}): every product needs its name")
    return [" ".join(name.split()) for name in names]


def tokenize_product_names(
    tokenizer, names: str | list[str], background_token: str = DEFAULT_BACKGROUND_TOKEN
) -> ProductPromptIds:
    """Tokenize ``"{name} <background>"`` for each name, keeping the background token at the end.

    A name longer than the tokenizer's limit is truncated *before* the background token, so the
    token the model was trained to read for the scene is never cut off (plain truncation of the
    joined string would drop it for long marketplace titles).
    """
    names = check_product_names(names)
    bg_id = background_token_id(tokenizer, background_token)
    max_length = tokenizer.model_max_length
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    room = max_length - 3  # bos, background token, eos
    name_ids = tokenizer(list(names), add_special_tokens=False).input_ids
    rows, bg_positions, eos_positions = [], [], []
    for ids in name_ids:
        ids = [i for i in ids if i != bg_id][:room]  # a literal "<background>" in a title is not a second token
        row = [bos, *ids, bg_id, eos]
        bg_positions.append(len(row) - 2)
        eos_positions.append(len(row) - 1)
        rows.append(row + [pad] * (max_length - len(row)))
    return ProductPromptIds(
        input_ids=torch.tensor(rows, dtype=torch.long),
        background_positions=torch.tensor(bg_positions, dtype=torch.long),
        eos_positions=torch.tensor(eos_positions, dtype=torch.long),
    )


def save_learned_embeds(
    path: str | os.PathLike, tokenizer, text_encoder, background_token: str = DEFAULT_BACKGROUND_TOKEN
) -> None:
    """Write the token's embedding as a textual-inversion file ``{"<background>": tensor(hidden)}``.

    It loads into a stock inpainting pipeline with ``pipe.load_textual_inversion(path)``.
    """
    token_id = background_token_id(tokenizer, background_token)
    vector = text_encoder.get_input_embeddings().weight[token_id].detach().to("cpu", torch.float32).clone()
    tmp = f"{path}.tmp"
    save_file({background_token: vector}, tmp)
    os.replace(tmp, path)


def load_learned_embeds(path: str | os.PathLike, tokenizer, text_encoder) -> str:
    """Load a ``learned_embeds.safetensors`` into a tokenizer/text encoder; returns the token string.

    The token is added if missing, or its embedding overwritten if present.
    """
    state = load_file(str(path))
    if len(state) != 1:
        raise ValueError(f"{path} must hold exactly one token embedding, found keys {sorted(state)}")
    (token, vector), = state.items()
    vector = vector.reshape(-1)
    embeddings = text_encoder.get_input_embeddings()
    if vector.numel() != embeddings.weight.shape[1]:
        raise ValueError(
            f"{path}: the {token!r} embedding has {vector.numel()} values, the text encoder expects "
            f"{embeddings.weight.shape[1]}"
        )
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=False)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = text_encoder.get_input_embeddings()
    with torch.no_grad():
        embeddings.weight[background_token_id(tokenizer, token)] = vector.to(embeddings.weight)
    return token
