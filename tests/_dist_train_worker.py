"""Run by tests/test_training.py under ``accelerate launch --num_processes 2 --cpu``.

1. ``gather_with_grad`` + the training step's scaling give each process the exact gradient of the
   global-batch contrastive loss (checked against the full batch computed locally);
2. ``train()`` runs 2 steps with a per-process batch of 2; the logs (rank 0) go to dist_report.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _training_helpers import base_args, epbd_train_dataset, load_train_script

from diffusers_product2img.cba import cba_loss, gather_with_grad


def check_gather(world: int, rank: int) -> float:
    torch.manual_seed(0)
    full = [torch.randn(2 * world, 8) for _ in range(4)]  # the global batch, known to every rank
    weight = torch.randn(8, 8, requires_grad=True)  # a shared "model": grads are averaged like DDP's
    local = [f[2 * rank : 2 * rank + 2] for f in full]
    text_bg, text_eos = local[0] @ weight, local[2] @ weight
    gathered = [gather_with_grad(t) for t in (text_bg, local[1], text_eos, local[3])]
    loss = cba_loss(gathered[0], gathered[1], gathered[2], gathered[3], 0.05).total * world
    loss.backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)
    grad /= world  # DDP's average
    ref_w = weight.detach().clone().requires_grad_(True)
    cba_loss(full[0] @ ref_w, full[1], full[2] @ ref_w, full[3], 0.05).total.backward()
    return (grad - ref_w.grad).abs().max().item()


def main():
    synth_root, inpainting_dir, clip_dir, out = map(Path, sys.argv[1:5])
    script = load_train_script()
    logs = {}
    args = script.parse_args(base_args(inpainting_dir, clip_dir, out, "--max_train_steps", 2, "--train_batch_size", 2,
                                       "--learning_rate", 1e-3, "--text_encoder_learning_rate", 1e-4))
    dataset = epbd_train_dataset(synth_root)
    script.train(args, train_dataset=dataset, step_callback=lambda s, step_logs: logs.setdefault(str(s), step_logs))
    world, rank = dist.get_world_size(), dist.get_rank()
    error = check_gather(world, rank)
    if rank == 0:
        (out / "dist_report.json").write_text(json.dumps(
            {"world_size": world, "gather_grad_max_error": error, "logs": logs}))
    dist.barrier()


if __name__ == "__main__":
    main()
