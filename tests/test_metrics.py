"""Metrics library: known values, symmetry/bounds, and the plumbing on tiny local models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_product2img.metrics import (
    AestheticMLP,
    CLIPImageEncoder,
    PickScorer,
    aesthetic_scores,
    clip_c_b,
    clip_c_i,
    clip_image_similarity,
    cutout_to_rgb,
    exact_pixel_rate,
    expansion_rate,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    load_aesthetic_predictor,
    object_expansion,
    product_mae,
)
from diffusers_product2img.placement import background_only_image
from diffusers_product2img.testing import save_tiny_clip_model

# ---------------------------------------------------------------------------------------------
# Scenes: a red product on a textured background, with its cutout and mask.
# ---------------------------------------------------------------------------------------------

SIZE = 64
BOX = (22, 20, 42, 44)  # left, top, right (excl.), bottom (excl.)


def _background(seed: int, base=(70, 110, 160)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    img = np.zeros((SIZE, SIZE, 3), np.float64)
    for c in range(3):
        img[..., c] = base[c] + 20 * np.sin(xx / 7.0 + c) + 10 * np.cos(yy / 5.0)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _product_pixels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = BOX[3] - BOX[1], BOX[2] - BOX[0]
    red = np.zeros((h, w, 3), np.float64)
    red[..., 0], red[..., 1], red[..., 2] = 215, 35, 40
    return np.clip(red + rng.normal(0, 5, red.shape), 0, 255).astype(np.uint8)


def make_scene(bg_seed=0, bg_base=(70, 110, 160)):
    """(image, cutout RGBA, mask L) with the product inside BOX; the mask is hard (0/255)."""
    img = _background(bg_seed, bg_base)
    left, t, r, b = BOX
    img[t:b, left:r] = _product_pixels()
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[t:b, left:r] = 255
    cutout = np.dstack([img, mask])
    return Image.fromarray(img), Image.fromarray(cutout, "RGBA"), Image.fromarray(mask, "L")


def grow_product(image: Image.Image, pixels: int = 6) -> Image.Image:
    """The product visibly grows: product-coloured pixels extend to the right of the mask."""
    arr = np.asarray(image).copy()
    left, t, r, b = BOX
    arr[t:b, r : r + pixels] = _product_pixels(1)[:, :pixels]
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip_model(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir):
    return CLIPImageEncoder.from_pretrained(tiny_clip_dir, load_tokenizer=True, batch_size=3)


# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------


def _closed_form_commuting(mu1, mu2, a, b):
    # Covariances Q diag(a) Q^T and Q diag(b) Q^T commute: tr sqrt(S1 S2) = sum sqrt(a * b).
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def test_frechet_matches_closed_form_for_diagonal_and_rotated_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = _closed_form_commuting(mu1, mu2, a, b)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10, abs=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # 1-d: (mu1 - mu2)^2 + (s1 - s2)^2 for standard deviations s.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)


def test_frechet_matches_scipy_sqrtm_reference_on_general_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 8)) @ rng.normal(size=(8, 8))
    y = rng.normal(size=(50, 8)) @ rng.normal(size=(8, 8)) + 0.5
    mu1, s1 = feature_statistics(x)
    mu2, s2 = feature_statistics(y)
    # The pytorch-fid / torch-fidelity recipe.
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    reference = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(reference, rel=1e-8)  # symmetric


def test_frechet_of_a_set_with_itself_is_zero_and_samples_converge():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(64, 16)) @ rng.normal(size=(16, 16))  # correlated, full rank
    assert frechet_distance_from_features(feats, feats) == pytest.approx(0.0, abs=1e-8)
    low_rank = rng.normal(size=(10, 32))  # fewer samples than dims: singular covariance
    assert frechet_distance_from_features(low_rank, low_rank) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance_from_features(torch.tensor(feats), feats + 1.0) == pytest.approx(16.0, rel=1e-8)
    # Large samples of N(0, I) and N(1, 4I) in 3-d approach 3 * 1 + 3 * (2 - 1)^2 = 6.
    x = rng.normal(size=(40000, 3))
    y = 1.0 + 2.0 * rng.normal(size=(40000, 3))
    assert frechet_distance_from_features(x, y) == pytest.approx(6.0, rel=0.03)
    with pytest.raises(ValueError):
        feature_statistics(np.ones((1, 4)))


# ---------------------------------------------------------------------------------------------
# CLIP-c-I / CLIP-c-B, PickScore, Aesthetics on the tiny CLIP
# ---------------------------------------------------------------------------------------------


def test_clip_similarity_symmetric_bounded_and_any_size(encoder):
    image, cutout, _ = make_scene()
    others = [
        Image.new("RGB", (50, 70), (255, 0, 0)),
        Image.fromarray(_background(3)).resize((300, 20)).convert("L"),
        cutout,  # RGBA
        Image.fromarray(_background(4)).convert("P"),
    ]
    a = [image] * len(others)
    ab = clip_image_similarity(encoder, a, others)
    ba = clip_image_similarity(encoder, others, a)
    assert ab.shape == (4,)
    torch.testing.assert_close(ab, ba)
    assert torch.all(ab <= 100.0) and torch.all(ab >= -100.0)
    same = clip_image_similarity(encoder, [image, cutout], [image, cutout])
    torch.testing.assert_close(same, torch.full((2,), 100.0), atol=1e-3, rtol=0)


def test_clip_c_i_is_100_cosine_of_clip_image_features(encoder):
    image, cutout, _ = make_scene()
    other = Image.fromarray(_background(7))
    scores = clip_c_i(encoder, [cutout, cutout], [image, other])
    # Independent path: the full CLIPModel forward's normalised image_embeds.
    white = cutout_to_rgb(cutout)
    pixels = encoder.image_processor(images=[white, image, other], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = encoder.model(pixel_values=pixels, input_ids=torch.tensor([[0, 1]] * 3))
    emb = out.image_embeds
    expected = 100 * torch.stack([emb[0] @ emb[1], emb[0] @ emb[2]])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


def test_clip_c_b_ignores_the_product_region_and_uses_background_only_image(encoder):
    image, cutout, mask = make_scene()
    repainted = np.asarray(image).copy()
    left, t, r, b = BOX
    repainted[t:b, left:r] = (20, 200, 30)  # a different product inside the (hard) mask
    repainted = Image.fromarray(repainted)
    c_b = clip_c_b(encoder, [cutout, cutout], [image, repainted], [mask, mask])
    torch.testing.assert_close(c_b[0], c_b[1])  # the product region is greyed out before CLIP
    c_i = clip_c_i(encoder, [cutout, cutout], [image, repainted])
    assert not torch.isclose(c_i[0], c_i[1])  # ...while CLIP-c-I sees it
    manual = clip_image_similarity(encoder, [cutout_to_rgb(cutout)], [background_only_image(image, mask)])
    torch.testing.assert_close(c_b[:1], manual)
    # A mask of another size than the image is resized to it.
    big = clip_c_b(encoder, [cutout], [image.resize((128, 128))], [mask])
    assert big.shape == (1,) and -100 <= float(big) <= 100


def test_pickscore_is_exp_logit_scale_times_cosine(encoder):
    image, cutout, _ = make_scene()
    images = [image, cutout, Image.fromarray(_background(5)).resize((40, 90))]
    texts = ["red ceramic mug", "black leather backpack", "mug"]
    scores = PickScorer(encoder).score(images, texts)
    # Independent path: CLIPModel's logits_per_image = exp(logit_scale) * cos, on the diagonal.
    pixels = encoder.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    tokens = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = encoder.model(pixel_values=pixels["pixel_values"], **tokens).logits_per_image
    torch.testing.assert_close(scores, logits.diagonal(), atol=1e-4, rtol=1e-4)
    expected_scale = float(encoder.model.logit_scale.detach().exp())
    assert PickScorer(encoder).describe()["logit_scale_exp"] == pytest.approx(expected_scale, abs=1e-4)
    with pytest.raises(ValueError):
        PickScorer(encoder).score(images, texts[:2])


def _known_aesthetic_state(dim: int) -> dict:
    g = torch.Generator().manual_seed(0)
    shapes = {0: (1024, dim), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    state = {}
    for idx, shape in shapes.items():
        state[f"layers.{idx}.weight"] = torch.randn(shape, generator=g) / shape[1] ** 0.5
        state[f"layers.{idx}.bias"] = torch.randn(shape[0], generator=g) * 0.1
    return state


def test_aesthetic_predictor_shapes_and_known_weights(tmp_path, encoder):
    head = AestheticMLP(32).eval()
    assert head(torch.randn(5, 32)).shape == (5,)
    # A loaded .pth gives exactly the (activation-free) affine map of its layers on normalised embeddings.
    state = _known_aesthetic_state(32)
    torch.save(state, tmp_path / "head.pth")
    loaded = load_aesthetic_predictor(str(tmp_path / "head.pth"), input_dim=32)
    emb = encoder.embed_images([make_scene()[0], Image.fromarray(_background(9))])
    x = torch.nn.functional.normalize(emb, dim=-1)
    for idx in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{idx}.weight"].T + state[f"layers.{idx}.bias"]
    torch.testing.assert_close(aesthetic_scores(loaded, emb), x.squeeze(-1), atol=1e-5, rtol=1e-5)
    # A constant head (zero weights, last bias 5.25) scores 5.25 whatever the image; from safetensors too.
    from safetensors.torch import save_file

    const = {k: torch.zeros_like(v) for k, v in state.items()}
    const["layers.7.bias"] = torch.tensor([5.25])
    save_file(const, str(tmp_path / "const.safetensors"))
    torch.testing.assert_close(
        aesthetic_scores(load_aesthetic_predictor(str(tmp_path / "const.safetensors")), emb), torch.full((2,), 5.25)
    )
    with pytest.raises(ValueError, match="768-d"):
        load_aesthetic_predictor(_known_aesthetic_state(768), input_dim=32)


# ---------------------------------------------------------------------------------------------
# Product fidelity
# ---------------------------------------------------------------------------------------------


def test_exact_pixel_rate_perfect_composite_and_one_changed_pixel():
    reference, cutout, mask = make_scene()
    new_background = Image.fromarray(_background(11, base=(200, 190, 150)))
    composite = Image.composite(reference, new_background, mask)  # product pasted back exactly
    assert exact_pixel_rate(composite, reference, mask) == 1.0
    assert product_mae(composite, reference, mask) == 0.0
    arr = np.asarray(composite).copy()
    arr[30, 30, 1] ^= 1  # one product pixel, one channel, off by one
    n_product = int((np.asarray(mask) == 255).sum())
    assert exact_pixel_rate(Image.fromarray(arr), reference, mask) == pytest.approx(1 - 1 / n_product)
    assert product_mae(Image.fromarray(arr), reference, mask) == pytest.approx(1 / (3 * n_product))
    # Pixels on the soft edge (0 < mask < 255) and outside do not count.
    soft = np.asarray(mask).copy()
    soft[BOX[1], BOX[0] : BOX[2]] = 128
    arr = np.asarray(composite).copy()
    arr[BOX[1], BOX[0] : BOX[2]] = 0
    assert exact_pixel_rate(Image.fromarray(arr), reference, Image.fromarray(soft)) == 1.0
    with pytest.raises(ValueError, match="sizes differ"):
        exact_pixel_rate(composite.resize((32, 32)), reference, mask)
    assert np.isnan(exact_pixel_rate(composite, reference, Image.new("L", (SIZE, SIZE), 0)))


def test_object_expansion_grown_product_scores_higher_than_kept():
    reference, _, mask = make_scene()
    new_background = Image.fromarray(_background(12, base=(90, 160, 90)))
    kept = Image.composite(reference, new_background, mask)
    grown = grow_product(kept, pixels=6)
    much_grown = grow_product(kept, pixels=12)
    rate_kept, rate_grown = expansion_rate(kept, mask, reference), expansion_rate(grown, mask, reference)
    assert rate_kept == 0.0
    assert rate_grown > 0.1
    assert expansion_rate(much_grown, mask, reference, ring_width=8) > expansion_rate(grown, mask, reference, ring_width=8)
    assert object_expansion(kept, reference, mask) == pytest.approx(0.0, abs=1e-9)
    assert object_expansion(grown, reference, mask) > object_expansion(kept, reference, mask)
    # The real photo's own product-coloured surroundings are subtracted: a reference that already has
    # the "growth" makes the same generated image score ~0.
    assert object_expansion(grown, grow_product(reference, 6), mask) == pytest.approx(0.0, abs=0.05)
    # Generated at another size than the reference/mask: both are resized to it.
    assert object_expansion(grown.resize((128, 128)), reference, mask) > 0.05
