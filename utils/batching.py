"""Effective batch size kept constant across any number of devices, and the learning rate scaled to it."""

import math
from dataclasses import dataclass

import torch
from lightning.fabric import Fabric


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    per_device: int  # samples per device per optimizer step
    accum_steps: int  # micro-batches per optimizer step
    micro: int  # samples per device per forward pass


def plan_batches(eff_batch_size: int, world_size: int, micro_batch_size: int | None) -> BatchPlan:
    """per_device * world_size * accum_steps == eff_batch_size, exactly, with the fewest accumulation steps."""
    if eff_batch_size % world_size:
        below = eff_batch_size // world_size * world_size
        nearest = " or ".join(str(size) for size in (below, below + world_size) if size > 0)
        raise ValueError(f"eff_batch_size={eff_batch_size} cannot be split evenly over {world_size} processes "
                         f"(devices x num_nodes): the nearest that can is {nearest}")
    per_device = eff_batch_size // world_size
    cap = micro_batch_size or per_device
    accum_steps = next(k for k in range(1, per_device + 1) if per_device % k == 0 and per_device // k <= cap)
    return BatchPlan(world_size, per_device, accum_steps, per_device // accum_steps)


def scaled_lr(base_lr: float, eff_batch_size: int, base_batch_size: int, rule: str) -> float:
    ratio = eff_batch_size / base_batch_size
    return base_lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def planned_world_size(fabric: Fabric) -> int:
    """The world size Fabric will launch, known before fabric.launch() (fabric.world_size is 1 until then)."""
    strategy = fabric.strategy
    devices = len(getattr(strategy, "parallel_devices", None) or [None])
    return getattr(strategy, "num_nodes", 1) * devices


def optimizer_steps(loader, accum_steps: int):
    """The loader's micro-batches, accum_steps at a time: those of one optimizer step, fetched before its first
    forward so that each one's share of the step's loss is known (loss_weights)."""
    micro_batches = []
    for batch in loader:
        micro_batches.append(batch)
        if len(micro_batches) == accum_steps:
            yield micro_batches
            micro_batches = []


def loss_weights(fabric: Fabric, counts: list) -> list:
    """All ranks, given a tensor count per micro-batch of this step (what its loss averages over: train.py's
    loss_weight): what to multiply each micro-batch's mean loss by, so that the step's gradient (averaged over ranks
    as DDP and FSDP do) is that of the mean over every counted item of all micro-batches on all ranks. One all-reduce
    on the device, no wait for it on the host. Counts of None: every micro-batch weighs the same, 1 / their number."""
    if counts[0] is None:
        return [1 / len(counts)] * len(counts)
    counts = torch.stack(counts)
    total = fabric.all_reduce(counts.sum(), reduce_op="sum") if fabric.world_size > 1 else counts.sum()  # all ranks
    return list(counts * fabric.world_size / total)
