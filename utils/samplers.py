"""Samplers that split data over ranks the same way for any world size and can start an epoch part-way."""

import torch
from torch.utils.data import Sampler


class ResumableShuffleSampler(Sampler[int]):
    """This rank's share of a seeded shuffle, cut to whole optimizer steps.

    Step s of an epoch uses the same global samples on any number of ranks (rank r takes every world_size-th
    index), so runs at one eff_batch_size agree across device counts. There is deliberately no set_epoch():
    Fabric's loader would call it with a counter that restarts at 0 in every new process. The loop calls
    set_position(epoch, steps_done) instead, which also skips the steps a resumed epoch has already seen.
    """

    def __init__(self, dataset_size: int, batch_per_step: int, world_size: int, rank: int, seed: int):
        self.dataset_size, self.batch_per_step = dataset_size, batch_per_step
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.steps_per_epoch = dataset_size // (batch_per_step * world_size)
        self.epoch = self.steps_done = 0

    def set_position(self, epoch: int, steps_done: int = 0) -> None:
        self.epoch, self.steps_done = epoch, steps_done

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator)
        mine = order[: self.steps_per_epoch * self.batch_per_step * self.world_size][self.rank :: self.world_size]
        return iter(mine[self.steps_done * self.batch_per_step :].tolist())

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.steps_done) * self.batch_per_step


class ShardSampler(Sampler[int]):
    """Every world_size-th sample from `rank`, no padding: across ranks each sample is seen exactly once."""

    def __init__(self, dataset_size: int, world_size: int, rank: int):
        self.indices = range(rank, dataset_size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
