"""The order in which training samples are seen: a pure function of the seed and the step.

Training reads an endless stream of *positions*. Epoch ``e`` is a permutation of the dataset drawn
from ``seed + e``; each epoch contributes ``num_rows // global_batch_size`` full global batches
(the remainder is dropped, as ``drop_last`` does). Micro-step ``m`` consumes positions
``[m * G, (m + 1) * G)`` where ``G = per_process_batch_size * num_processes``; process ``r`` takes
its slice ``[m * G + r * b, m * G + (r + 1) * b)``.

So the samples of a step do not depend on how many processes share it, nothing has to be saved to
resume (the step number is enough), and each position is a unique key for that sample's noise and
timestep (:func:`diffusers_product2img.training.loop.sample_generators`).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["EpochOrder", "PositionDataset", "MicroBatchSampler"]


class EpochOrder:
    """Maps a stream position to a dataset row."""

    def __init__(self, num_rows: int, global_batch_size: int, seed: int = 0, shuffle: bool = True):
        if global_batch_size < 1:
            raise ValueError(f"global batch size must be >= 1, got {global_batch_size}")
        if num_rows < global_batch_size:
            raise ValueError(
                f"the training set has {num_rows} examples, fewer than one global batch of {global_batch_size} "
                "(train_batch_size x processes): use a smaller batch or more data"
            )
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_rows // global_batch_size
        self.positions_per_epoch = self.steps_per_epoch * global_batch_size

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs, one order object per run
    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_rows)
        return torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch))

    def epoch_of(self, micro_step: int) -> int:
        return micro_step // self.steps_per_epoch

    def row(self, position: int) -> int:
        epoch, within = divmod(int(position), self.positions_per_epoch)
        return int(self.permutation(epoch)[within])


class PositionDataset(Dataset):
    """Wraps a map-style dataset of rows (dicts): item ``position`` is the row that position reads.

    Each returned row gains ``_position`` (the stream position) and ``_row_index`` (its index in the
    wrapped dataset, the key of the feature cache).
    """

    def __init__(self, rows, order: EpochOrder):
        self.rows = rows
        self.order = order

    def __getitem__(self, position: int) -> dict:
        index = self.order.row(position)
        row = dict(self.rows[index])
        row["_position"] = int(position)
        row["_row_index"] = index
        return row


class MicroBatchSampler(Sampler[list[int]]):
    """Yields this process's list of stream positions for micro-steps ``start .. stop - 1``."""

    def __init__(self, start_micro_step: int, stop_micro_step: int, batch_size: int, num_processes: int = 1,
                 process_index: int = 0):
        self.start, self.stop = int(start_micro_step), int(stop_micro_step)
        self.batch_size, self.num_processes, self.process_index = batch_size, num_processes, process_index

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        global_batch = self.batch_size * self.num_processes
        for step in range(self.start, self.stop):
            first = step * global_batch + self.process_index * self.batch_size
            yield list(range(first, first + self.batch_size))
