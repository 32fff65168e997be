"""Which parameters train, and how fast (paper 5.1.1).

* the UNet and the ``<background>`` row of the token-embedding matrix: ``learning_rate`` (1e-5);
* every other row of the token-embedding matrix: frozen, bit-identical after training;
* the rest of the text encoder and the CBA projection: ``text_encoder_learning_rate`` (1e-6).

The token embedding is a single ``nn.Parameter``, so "freezing all rows but one" takes two guards
(:class:`FrozenEmbeddingRows`): a gradient hook that zeroes the gradient of the frozen rows, and a
restore of those rows after every optimizer step, because AdamW's weight decay (and 8-bit optimizers'
quantisation) would still move rows whose gradient is zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "FrozenEmbeddingRows",
    "parameter_groups",
    "trainable_parameters",
]


class FrozenEmbeddingRows:
    """Keep every row of an embedding matrix bit-identical except ``trainable_ids``.

    Call :meth:`restore` after each ``optimizer.step()``; :meth:`remove` drops the gradient hook.
    """

    def __init__(self, embedding: nn.Embedding, trainable_ids: Sequence[int]):
        self.weight = embedding.weight
        num_rows = self.weight.shape[0]
        self.trainable_ids = torch.tensor(sorted(set(int(i) for i in trainable_ids)), dtype=torch.long)
        if len(self.trainable_ids) == 0 or self.trainable_ids.min() < 0 or self.trainable_ids.max() >= num_rows:
            raise ValueError(f"trainable row ids {trainable_ids} are not rows of a {num_rows}-row embedding")
        self.weight.requires_grad_(True)
        self.original = self.weight.detach().clone()
        grad_mask = torch.zeros(num_rows, 1, dtype=self.weight.dtype)
        grad_mask[self.trainable_ids] = 1
        self._grad_mask = grad_mask
        self._handle = self.weight.register_hook(self._mask_grad)

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self._grad_mask.device != grad.device or self._grad_mask.dtype != grad.dtype:
            self._grad_mask = self._grad_mask.to(device=grad.device, dtype=grad.dtype)
        return grad * self._grad_mask

    @torch.no_grad()
    def restore(self) -> None:
        """Put the frozen rows back to their original values (the trainable rows keep theirs)."""
        if self.original.device != self.weight.device:
            self.original = self.original.to(self.weight.device)
        ids = self.trainable_ids.to(self.weight.device)
        trained = self.weight[ids].clone()
        self.weight.copy_(self.original.to(self.weight.dtype))
        self.weight[ids] = trained

    def frozen_rows_unchanged(self) -> bool:
        keep = torch.ones(self.weight.shape[0], dtype=torch.bool)
        keep[self.trainable_ids] = False
        current = self.weight.detach().to(self.original.device)
        return bool(torch.equal(current[keep], self.original[keep]))

    def remove(self) -> None:
        self._handle.remove()


def trainable_parameters(module: nn.Module | None, exclude: Iterable[nn.Parameter] = ()) -> list[nn.Parameter]:
    if module is None:
        return []
    excluded = {id(p) for p in exclude}
    return [p for p in module.parameters() if p.requires_grad and id(p) not in excluded]


def parameter_groups(
    unet: nn.Module,
    text_encoder: nn.Module,
    projection: nn.Module | None = None,
    *,
    learning_rate: float = 1e-5,
    text_encoder_learning_rate: float = 1e-6,
    projection_learning_rate: float | None = None,
    weight_decay: float = 1e-2,
) -> list[dict]:
    """Optimizer parameter groups, each with a ``name`` key (kept by torch optimizers).

    Takes the parameters that currently require gradients, so the caller decides what trains
    (full fine-tuning, LoRA adapters, a frozen text encoder): the groups are

    * ``unet``: the UNet's trainable parameters at ``learning_rate``;
    * ``token_embedding``: the text encoder's input-embedding matrix at ``learning_rate`` with no
      weight decay; combine with :class:`FrozenEmbeddingRows` so only the ``<background>`` row moves;
    * ``text_encoder``: the other trainable text-encoder parameters at ``text_encoder_learning_rate``;
    * ``cba_projection``: the projection at ``projection_learning_rate`` (default: the text encoder's).

    Empty groups are left out.
    """
    embedding = text_encoder.get_input_embeddings().weight
    if not embedding.requires_grad:
        raise ValueError("the text encoder's token embedding must require grad: the <background> row trains")
    if projection_learning_rate is None:
        projection_learning_rate = text_encoder_learning_rate
    groups = [
        {"name": "unet", "params": trainable_parameters(unet), "lr": learning_rate, "weight_decay": weight_decay},
        {"name": "token_embedding", "params": [embedding], "lr": learning_rate, "weight_decay": 0.0},
        {
            "name": "text_encoder",
            "params": trainable_parameters(text_encoder, exclude=[embedding]),
            "lr": text_encoder_learning_rate,
            "weight_decay": weight_decay,
        },
        {
            "name": "cba_projection",
            "params": trainable_parameters(projection),
            "lr": projection_learning_rate,
            "weight_decay": weight_decay,
        },
    ]
    return [g for g in groups if g["params"]]
