"""Fréchet distance between two sets of image features, and the feature extractors behind it.

The Fréchet distance between two Gaussians fitted to feature sets ``X`` (generated) and ``Y``
(real) is::

    d^2 = |mu_x - mu_y|^2 + tr(S_x) + tr(S_y) - 2 tr((S_x S_y)^(1/2))

It is computed here in float64 without a general matrix square root: with ``A = S_x^(1/2)`` (from a
symmetric eigendecomposition), ``tr((S_x S_y)^(1/2)) = tr((A S_y A)^(1/2))`` and ``A S_y A`` is
symmetric positive semi-definite, so its square root's trace is the sum of the square roots of its
(clipped non-negative) eigenvalues. This avoids the complex parts and the ``eps`` retries of the
``scipy.linalg.sqrtm`` recipe while giving the same number.

What the *features* are decides what the number means, and numbers from different extractors,
weights, resizing or sample counts are not comparable. Two extractors are provided:

* :class:`InceptionFeatureExtractor` — **FID** proper: the 2048-d pool3 features of the TF-ported
  InceptionV3 (``weights-inception-2015-12-05-6726825d``) as implemented by ``torch-fidelity``
  (the same network ``torchmetrics.image.FrechetInceptionDistance`` uses), fed uint8 images that it
  resizes to 299x299 with TF1-compatible bilinear interpolation. It needs ``pip install
  torch-fidelity`` (which imports torchvision); weights come from torch-fidelity's GitHub release
  unless a local path is given.
* CLIP image embeddings (see :class:`~diffusers_product2img.metrics.clip_scores.CLIPImageEncoder`)
  give **FD-CLIP**, a Fréchet distance in CLIP space: it runs wherever ``transformers`` does, but it
  is a different metric and is always reported under its own name, never as "FID".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "inception_available",
    "InceptionFeatureExtractor",
]


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ``N - 1``) covariance of an ``(N, D)`` feature matrix, in float64."""
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"features must be an (N, D) matrix, got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {feats.shape[0]}")
    if not np.all(np.isfinite(feats)):
        raise ValueError("features contain NaN or inf")
    mu = feats.mean(axis=0)
    sigma = np.cov(feats, rowvar=False)
    return mu, np.atleast_2d(sigma)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) positive semi-definite matrix."""
    sym = (matrix + matrix.T) / 2.0
    eigvals, eigvecs = np.linalg.eigh(sym)
    eigvals = np.clip(eigvals, 0.0, None)
    return (eigvecs * np.sqrt(eigvals)) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the quantity FID reports).

    Symmetric in its two arguments and >= 0; exactly what ``pytorch-fid``/``torch-fidelity`` compute
    with ``scipy.linalg.sqrtm``, up to float64 rounding.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    diff = mu1 - mu2
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    # Rounding leaves a tiny negative number for (near-)identical sets, more so with singular
    # covariances (fewer samples than dimensions); the distance itself is >= 0. A larger negative
    # value means the inputs were not covariance matrices and is returned as it is.
    scale = max(1.0, float(np.trace(sigma1) + np.trace(sigma2)))
    if -1e-6 * scale < value < 0:
        value = 0.0
    return value


def frechet_distance_from_features(features1, features2) -> float:
    """Fréchet distance between the Gaussians fitted to two ``(N, D)`` feature sets."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def inception_available() -> bool:
    """Whether torch-fidelity's InceptionV3 (and so real FID) can be imported here."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: F401
    except Exception:  # ImportError, or torchvision failing to import inside torch_fidelity
        return False
    return True


INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d"


class InceptionFeatureExtractor:
    """FID features: torch-fidelity's TF-compatible InceptionV3, pool3 (2048-d).

    Images are converted to uint8 RGB at their own size and handed over as they are; torch-fidelity
    resizes them to 299x299 with TF1-style bilinear interpolation, as the original TF FID code did.
    Images of equal size are batched together.

    Args:
        weights_path: a local copy of ``weights-inception-2015-12-05-6726825d.pth``; ``None`` lets
            torch-fidelity download it from its GitHub release.
        device: where to run.
        batch_size: images per forward pass.
    """

    name = "FID"

    def __init__(self, weights_path: str | None = None, device: str | torch.device = "cpu", batch_size: int = 32):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as err:
            raise ImportError(
                "real FID needs torch-fidelity's InceptionV3 (`pip install torch-fidelity`, which needs a "
                f"working torchvision): {err}. Use fid='fd-clip' for a Fréchet distance on CLIP features "
                "instead (reported as FD-CLIP, not comparable to FID)."
            ) from err
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.weights_path = weights_path
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_path
        ).to(self.device)
        self.model.eval()

    def describe(self) -> dict:
        """The implementation and its settings, stored next to every number it produces."""
        try:
            import torch_fidelity

            version = getattr(torch_fidelity, "__version__", "unknown")
        except Exception:  # pragma: no cover - only when the import half-works
            version = "unknown"
        return {
            "metric": "FID",
            "implementation": f"torch-fidelity {version} FeatureExtractorInceptionV3 + float64 eigh Frechet distance",
            "features": "InceptionV3 pool3, 2048-d",
            "weights": self.weights_path or INCEPTION_WEIGHTS_NAME,
            "resize": "uint8 input, TF1-compatible bilinear to 299x299 (inside torch-fidelity)",
        }

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        from ..placement import to_rgb

        arrays = [np.asarray(to_rgb(im), dtype=np.uint8) for im in images]
        out: list[torch.Tensor | None] = [None] * len(arrays)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, arr in enumerate(arrays):
            by_size.setdefault(arr.shape[:2], []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = torch.from_numpy(np.stack([arrays[i] for i in chunk])).permute(0, 3, 1, 2).contiguous()
                feats = self.model(batch.to(self.device))
                feats = feats[0] if isinstance(feats, (tuple, list)) else feats
                for i, f in zip(chunk, feats.to("cpu", torch.float64)):
                    out[i] = f
        return torch.stack(out) if out else torch.empty(0, 2048, dtype=torch.float64)


def rank_note(n_samples: int, dim: int) -> str | None:
    """A warning when the covariance is rank-deficient (fewer samples than feature dimensions)."""
    if n_samples <= dim:
        return (
            f"only {n_samples} samples for {dim}-d features: the covariance is rank-deficient and the "
            "distance is biased upwards; compare only runs with the same sample count"
        )
    return None

