"""Did CBA align the text encoder with the backgrounds? A mechanism check behind the Table 2 ablation.

CBA (paper 4.3) pulls the text encoder's ``<background>`` feature of a product name towards the CLIP
embedding of that product's background. If it worked, names of *different* categories that share a
scene family (a mug and a pot: kitchen counter) end up close in the text encoder's space, and a new
category's name lands near the seen categories of its scene. The demo measures exactly that, with
no learned judge:

* **cross-category scene agreement** of a feature space: for each query, take its nearest neighbour
  (cosine) among the reference items of *other* categories and check whether that category has the
  same scene family. Queries whose scene has no other category among the references are skipped.
  Its chance level (a random neighbour of another category) is reported beside it;
* the **image side** (the CLIP background embeddings of clean training images, CBA's target): if it
  is high, CBA has a scene signal to align to;
* the **text side** of each trained model, at the ``<background>`` and ``<eos>`` positions: test and
  test_unseen names as queries, training names as references;
* the **background contrastive loss** ``L'cl(b, B)`` of a CBA model on test products (its own
  projection, chunks of ``chunk`` products) beside ``log(chunk)``, the loss of features that cannot
  tell the products apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.synth import category_scene

__all__ = [
    "cross_category_scene_agreement",
    "text_features",
    "clip_background_embeddings",
    "background_contrastive_loss",
    "text_alignment",
    "ARMS",
    "alignment_check",
]


def cross_category_scene_agreement(
    features: np.ndarray | torch.Tensor,
    categories: Sequence[str],
    query_features: np.ndarray | torch.Tensor | None = None,
    query_categories: Sequence[str] | None = None,
) -> dict:
    """Nearest-neighbour scene agreement across categories (see the module docstring).

    Args:
        features: ``(N, D)`` reference features.
        categories: the N reference categories (EPBD-synth category names).
        query_features: ``(M, D)`` queries; ``None`` uses the references themselves.
        query_categories: the M query categories.

    Returns:
        ``{"agreement", "chance", "queries"}``; ``agreement`` and ``chance`` are ``None`` when no query
        has another category of its scene among the references.
    """
    refs = torch.nn.functional.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float64), dim=-1)
    if query_features is None:
        queries, query_categories = refs, list(categories)
    else:
        queries = torch.nn.functional.normalize(torch.as_tensor(np.asarray(query_features), dtype=torch.float64), dim=-1)
        if query_categories is None or len(query_categories) != queries.shape[0]:
            raise ValueError("query_categories must name the category of every query")
    if refs.shape[0] != len(categories):
        raise ValueError(f"{refs.shape[0]} reference features but {len(categories)} categories")
    ref_scenes = np.array([category_scene(c) for c in categories])
    ref_cats = np.array(list(categories))
    sims = (queries @ refs.T).numpy()
    hits, chances = [], []
    for i, cat in enumerate(query_categories):
        other = ref_cats != cat
        scene = category_scene(cat)
        same_scene = other & (ref_scenes == scene)
        if not same_scene.any():
            continue
        row = np.where(other, sims[i], -np.inf)
        hits.append(ref_scenes[int(np.argmax(row))] == scene)
        chances.append(same_scene.sum() / other.sum())
    if not hits:
        return {"agreement": None, "chance": None, "queries": 0}
    return {"agreement": float(np.mean(hits)), "chance": float(np.mean(chances)), "queries": len(hits)}


@torch.no_grad()
def text_features(model_dir: str | Path, names: Sequence[str], batch_size: int = 256) -> dict[str, np.ndarray]:
    """The text encoder's last hidden state at the ``<background>`` and ``<eos>`` positions of
    ``"{name} <background>"`` (what the UNet reads and what CBA trains), for a Product2Img folder."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..background_token import tokenize_product_names

    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval()
    out: dict[str, list] = {"background": [], "eos": []}
    for start in range(0, len(names), batch_size):
        ids = tokenize_product_names(tokenizer, list(names[start:start + batch_size]))
        hidden = encoder(ids.input_ids)[0]
        rows = torch.arange(hidden.shape[0])
        out["background"].append(hidden[rows, ids.background_positions].float())
        out["eos"].append(hidden[rows, ids.eos_positions].float())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


@torch.no_grad()
def clip_background_embeddings(clip_model: str | Path, images: Sequence, masks: Sequence) -> np.ndarray:
    """CLIP image embeddings of the background images ``B`` (product region grey), as CBA computes them."""
    from ..cba import clip_image_embeddings, load_clip_image_encoder
    from ..placement import background_only_image

    model, processor, _ = load_clip_image_encoder(str(clip_model))
    backgrounds = [background_only_image(im, m) for im, m in zip(images, masks)]
    return clip_image_embeddings(model, processor, backgrounds).float().numpy()


@torch.no_grad()
def background_contrastive_loss(model_dir: str | Path, text_background: np.ndarray, background_embeddings: np.ndarray,
                                chunk: int = 64, tau: float | None = None) -> dict | None:
    """``L'cl(b, B)`` of a CBA model (its saved projection) on held-out products, averaged over
    chunks of ``chunk`` (the in-batch negatives), beside ``log(chunk)``; ``None`` without a projection.

    ``text_background`` is the model's ``<background>`` features of the products' names
    (:func:`text_features`), ``background_embeddings`` the CLIP embeddings of their backgrounds.
    """
    from ..cba import (
        CBA_PROJECTION_DIR,
        DEFAULT_CBA_TEMPERATURE,
        TextToImageProjection,
        symmetric_contrastive_loss,
    )

    folder = Path(model_dir) / CBA_PROJECTION_DIR
    if not folder.is_dir():
        return None
    projection = TextToImageProjection.from_pretrained(folder).eval()
    text = projection(torch.as_tensor(text_background, dtype=torch.float32))
    images = torch.as_tensor(background_embeddings, dtype=torch.float32)
    if text.shape[0] != images.shape[0]:
        raise ValueError(f"{text.shape[0]} text features but {images.shape[0]} background embeddings")
    losses, sizes = [], []
    for start in range(0, text.shape[0], chunk):
        a, b = text[start:start + chunk], images[start:start + chunk]
        if a.shape[0] < 2:
            continue
        losses.append(float(symmetric_contrastive_loss(a, b, tau or DEFAULT_CBA_TEMPERATURE)) * a.shape[0])
        sizes.append(a.shape[0])
    if not sizes:
        return None
    return {"loss": sum(losses) / sum(sizes), "uniform": sum(math.log(n) * n for n in sizes) / sum(sizes)}


def text_alignment(model_dir: str | Path, train_names: Sequence[str], train_categories: Sequence[str],
                   splits: dict[str, Sequence], split_background_embeddings: dict[str, np.ndarray]) -> dict:
    """The text-side checks of one trained model, per split (``splits``: lists of ``BenchmarkSample``)."""
    split_names = {split: [s.product_name for s in samples] for split, samples in splits.items()}
    # one pass of the text encoder over the training names and every split's names
    features = text_features(model_dir, [*train_names, *(n for names in split_names.values() for n in names)])
    refs = {position: f[:len(train_names)] for position, f in features.items()}
    start = len(train_names)
    result = {}
    for split, samples in splits.items():
        end = start + len(samples)
        queries = {position: f[start:end] for position, f in features.items()}
        cats = [s.category for s in samples]
        result[split] = {
            position: cross_category_scene_agreement(refs[position], train_categories, queries[position], cats)
            for position in ("background", "eos")
        }
        result[split]["background_loss"] = background_contrastive_loss(model_dir, queries["background"],
                                                                       split_background_embeddings[split])
        start = end
    return result


#: The trained models the check looks at: (label, arm, index into the arm's results).
ARMS = (("IDR round 1 (CBA)", "idr", 1), ("w/o CBA (round-1 data)", "no_cba", None),
        ("IDR round 3 (CBA)", "idr", 3), ("w/o IDR, same steps as round 3 (CBA)", "no_idr", 3))


def alignment_check(data_root: str | Path, clip_model: str | Path, splits: dict[str, Sequence], seeds: dict,
                    resolution: int) -> dict:
    """The whole check for the demo: the image side once, the text side of every arm of every seed.

    ``seeds`` is the demo's per-seed results (each arm's ``model_dir``); ``splits`` its test splits.
    """
    from ..baselines.benchmark import load_benchmark_samples
    from ..data.layout import EPBDLayout

    quality = {s.id: s.extra.get("quality", "good") for s in EPBDLayout(data_root).split_samples("train")}
    train = load_benchmark_samples(data_root, "train", resolution=resolution)
    clean = [s for s in train if quality.get(s.id) == "good"]
    image_side = cross_category_scene_agreement(
        clip_background_embeddings(clip_model, [s.reference for s in clean], [s.product_mask for s in clean]),
        [s.category for s in clean])
    split_bg = {split: clip_background_embeddings(clip_model, [s.reference for s in samples],
                                                  [s.product_mask for s in samples])
                for split, samples in splits.items()}
    names, cats = [s.product_name for s in train], [s.category for s in train]
    models = {}
    for seed, result in seeds.items():
        models[seed] = {}
        for label, arm, index in ARMS:
            record = result[arm] if index is None else result[arm][index]
            models[seed][label] = text_alignment(record["model_dir"], names, cats, splits, split_bg)
    return {"image_side": image_side, "image_side_samples": len(clean), "models": models}
