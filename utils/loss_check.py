"""The loss check and the stop vote, done together in one all-reduce at log, validation and checkpoint steps only.

Each step's loss stays on the device until then, so no step waits for the device (on a GPU, reading a value back
makes the host wait for every kernel queued before it)."""

import math

import torch
from lightning.fabric import Fabric

from utils.exits import fail
from utils.preemption import StopRequest


def check_losses_and_votes(fabric: Fabric, losses: list[torch.Tensor], stop: StopRequest, step: int):
    """All ranks: the mean over ranks of each of the `losses` of the steps up to `step`, and how many ranks were
    asked to stop and how many by Ctrl-C. A NaN or infinite loss on any rank stops every rank, naming its step."""
    flags = torch.cat([torch.stack(losses).float(), losses[0].new_tensor([stop.requested, stop.interrupted])])
    *sums, stop_votes, interrupt_votes = fabric.all_reduce(flags, reduce_op="sum").tolist()
    for bad_step, loss_sum in enumerate(sums, start=step - len(sums) + 1):
        if not math.isfinite(loss_sum):  # found before any log or checkpoint of this step
            fail(f"loss is {loss_sum} at step {bad_step}; stopped at step {step}, no checkpoint written from step "
                 f"{bad_step} on", status=1, loggers=fabric.loggers)
    return [loss_sum / fabric.world_size for loss_sum in sums], stop_votes, interrupt_votes
