"""LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann et al.).

A small MLP on **L2-normalised** OpenAI CLIP ViT-L/14 image embeddings (768-d, what
``CLIPModel.get_image_features`` returns for ``openai/clip-vit-large-patch14``), predicting a 1-10
rating. The layer stack (``768 -> 1024 -> 128 -> 64 -> 16 -> 1`` with dropouts, no activations) and
the parameter names (``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``) are those
of the released ``sac+logos+ava1-l14-linearMSE.pth``, so that file loads unchanged.

Weights: a local ``.pth`` (read with ``torch.load(weights_only=True)``) or ``.safetensors`` file, or
``"owner/repo/filename"`` on the Hub; the default is a Hub mirror of the GitHub release
(``camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth``). The input width
follows the weights (or ``input_dim``), so a tiny CLIP with a 32-d projection works in tests.
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["DEFAULT_AESTHETIC_WEIGHTS", "AestheticMLP", "load_aesthetic_predictor", "aesthetic_scores"]

DEFAULT_AESTHETIC_WEIGHTS = "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """``input_dim -> 1024 -> 128 -> 64 -> 16 -> 1``, the LAION aesthetic predictor v2 head."""

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, normalized_embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(normalized_embeddings).squeeze(-1)


def _read_state_dict(weights: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = os.fspath(weights)
    if not os.path.exists(path):
        parts = path.split("/")
        if len(parts) < 3:
            raise FileNotFoundError(
                f"aesthetic weights {path!r}: not a local file and not an 'owner/repo/filename' Hub spec"
            )
        from huggingface_hub import hf_hub_download

        path = hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_aesthetic_predictor(
    weights: str | os.PathLike | dict | None = DEFAULT_AESTHETIC_WEIGHTS, input_dim: int | None = None
) -> AestheticMLP:
    """Build the predictor and load its weights (a state dict, a file path or a Hub spec).

    ``weights=None`` gives a randomly initialised head of width ``input_dim`` (offline tests only).
    """
    if weights is None:
        return AestheticMLP(input_dim or 768).eval()
    state = dict(weights) if isinstance(weights, dict) else _read_state_dict(weights)
    state = {(k if k.startswith("layers.") else f"layers.{k}"): v for k, v in state.items()}
    if "layers.0.weight" not in state:
        raise ValueError(f"not an aesthetic-predictor state dict (keys: {sorted(state)[:6]}...)")
    width = int(state["layers.0.weight"].shape[1])
    if input_dim is not None and input_dim != width:
        raise ValueError(
            f"the aesthetic weights expect {width}-d CLIP embeddings but the CLIP model gives {input_dim}-d; "
            "use the CLIP model the predictor was trained on (openai/clip-vit-large-patch14)"
        )
    model = AestheticMLP(width)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


@torch.no_grad()
def aesthetic_scores(predictor: AestheticMLP, image_embeddings: torch.Tensor) -> torch.Tensor:
    """Scores ``(N,)`` for raw CLIP image embeddings ``(N, D)``: L2-normalise, then the MLP."""
    emb = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)
    param = next(predictor.parameters())
    return predictor(emb.to(param.device, param.dtype)).float().cpu()
