"""Contrastive Background Alignment (paper 4.3, eq. 4-5) against hand-computed references."""

import math
import os

import pytest
import torch

from diffusers_product2img.cba import (
    CBA_PROJECTION_DIR,
    TextToImageProjection,
    cba_loss,
    clip_image_embeddings,
    contrastive_loss,
    gather_with_grad,
    pool_token_features,
    symmetric_contrastive_loss,
)

R2 = math.sqrt(2.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny tensors: one thread avoids OpenMP spin-waiting on shared CPU cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def nll(logits, i):
    """-log softmax(logits)[i], written out."""
    return -math.log(math.exp(logits[i]) / sum(math.exp(v) for v in logits))


# q0=(1,0) q1=(0,1); k0=(1,0) k1=(1,1) (cosine ignores the norm, so k1 is not normalised here)
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
K = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
TAU = 0.5
# cos(q_i, k_j): [[1, 1/sqrt2], [0, 1/sqrt2]]
REF_QK = (nll([1 / TAU, (1 / R2) / TAU], 0) + nll([0.0, (1 / R2) / TAU], 1)) / 2
# cos(k_i, q_j): [[1, 0], [1/sqrt2, 1/sqrt2]]
REF_KQ = (nll([1 / TAU, 0.0], 0) + nll([(1 / R2) / TAU, (1 / R2) / TAU], 1)) / 2


def test_contrastive_loss_matches_hand_computed_reference():
    assert contrastive_loss(Q, K, TAU).item() == pytest.approx(REF_QK, rel=1e-6)
    assert contrastive_loss(K, Q, TAU).item() == pytest.approx(REF_KQ, rel=1e-6)
    # the second direction's second row has two equal logits: exactly log 2 for it
    assert REF_KQ == pytest.approx((nll([2.0, 0.0], 0) + math.log(2)) / 2)


def test_symmetric_loss_is_the_mean_of_both_directions_and_symmetric():
    sym = symmetric_contrastive_loss(Q, K, TAU).item()
    assert sym == pytest.approx((REF_QK + REF_KQ) / 2, rel=1e-6)
    assert symmetric_contrastive_loss(K, Q, TAU).item() == pytest.approx(sym, rel=1e-6)
    # one direction alone is not symmetric for this example
    assert REF_QK != pytest.approx(REF_KQ)


def test_temperature_divides_the_cosine():
    # tau enters only as cosine / tau: the reference at another tau, by hand
    tau = 0.05
    ref = (nll([1 / tau, (1 / R2) / tau], 0) + nll([0.0, (1 / R2) / tau], 1)) / 2
    assert contrastive_loss(Q, K, tau).item() == pytest.approx(ref, rel=1e-5)
    # with identical features every logit is equal: the loss is log N whatever tau
    same = torch.ones(5, 3)
    for tau in (0.05, 1.0, 10.0):
        assert contrastive_loss(same, same, tau).item() == pytest.approx(math.log(5), rel=1e-6)
    with pytest.raises(ValueError, match="tau"):
        contrastive_loss(Q, K, 0.0)


def test_cosine_similarity_ignores_scale_and_computes_in_float32():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    base = contrastive_loss(a, b, 0.05)
    assert contrastive_loss(3.0 * a, 0.1 * b, 0.05).item() == pytest.approx(base.item(), rel=1e-5)
    half = contrastive_loss(a.half(), b.half(), 0.05)
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        contrastive_loss(a, b[:3], 0.05)


def test_positives_on_the_diagonal_drive_the_loss_down():
    torch.manual_seed(0)
    keys = torch.randn(6, 16)
    aligned = symmetric_contrastive_loss(keys + 0.01 * torch.randn(6, 16), keys, 0.05)
    shuffled = symmetric_contrastive_loss(keys[torch.tensor([1, 2, 3, 4, 5, 0])], keys, 0.05)
    assert aligned.item() < 0.05 < shuffled.item()
    # gradient descent on the queries pulls each towards its own key
    query = torch.randn(6, 16, requires_grad=True)
    opt = torch.optim.SGD([query], lr=0.5)
    losses = []
    for _ in range(30):
        loss = symmetric_contrastive_loss(query, keys, 0.05)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.1 * losses[0]
    cos = torch.nn.functional.normalize(query.detach(), dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).t()
    assert torch.equal(cos.argmax(dim=1), torch.arange(6))


def test_cba_loss_returns_both_terms():
    torch.manual_seed(1)
    t_bg, i_bg, t_eos, i_full = (torch.randn(4, 8) for _ in range(4))
    out = cba_loss(t_bg, i_bg, t_eos, i_full, tau=0.05)
    assert out.background.item() == pytest.approx(symmetric_contrastive_loss(t_bg, i_bg, 0.05).item())
    assert out.sentence.item() == pytest.approx(symmetric_contrastive_loss(t_eos, i_full, 0.05).item())
    assert out.total.item() == pytest.approx(out.background.item() + out.sentence.item())


def test_gather_with_grad_is_the_identity_with_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    y = gather_with_grad(x)
    assert y is x
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 4))


def test_pool_token_features_picks_one_position_per_row():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    out = pool_token_features(hidden, torch.tensor([4, 1]))
    assert torch.equal(out, torch.stack([hidden[0, 4], hidden[1, 1]]))


def test_projection_starts_from_clip_text_projection_and_round_trips(tmp_path, caplog):
    weight = torch.randn(6, 4)
    proj = TextToImageProjection.from_text_projection(weight, text_hidden_size=4, image_embed_dim=6)
    x = torch.randn(2, 4)
    assert torch.allclose(proj(x), x @ weight.t())
    proj.save_pretrained(tmp_path / CBA_PROJECTION_DIR)
    files = sorted(os.listdir(tmp_path / CBA_PROJECTION_DIR))
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    again = TextToImageProjection.from_pretrained(tmp_path / CBA_PROJECTION_DIR)
    assert torch.equal(again.proj.weight, proj.proj.weight)
    # a CLIP whose projection does not fit the text encoder: random start, with a warning
    with caplog.at_level("WARNING"):
        other = TextToImageProjection.from_text_projection(torch.randn(6, 5), text_hidden_size=4, image_embed_dim=6)
    assert other.proj.weight.shape == (6, 4)
    assert "random projection" in caplog.text


def test_clip_image_embeddings_are_clips_image_features():
    from PIL import Image

    from diffusers_product2img.testing import tiny_clip_model

    model, processor, _ = tiny_clip_model()
    images = [Image.new("RGB", (40, 40), (200, 10, 10)), Image.new("RGB", (40, 40), (10, 10, 200))]
    pixels = processor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        ours = clip_image_embeddings(model, processor, images)
        ref = model.get_image_features(pixel_values=pixels).pooler_output
        from_pixels = clip_image_embeddings(model, None, pixels)
    assert ours.shape == (2, 32)
    assert torch.allclose(ours, ref) and torch.allclose(from_pixels, ref)
