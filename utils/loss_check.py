"""The loss check and the stop vote, done together in one all-reduce at log, validation and checkpoint steps only.

Each step's loss (and the other values training_step returns) stays on the device until then, so no step waits for
the device (on a GPU, reading a value back makes the host wait for every kernel queued before it)."""

import math

import torch
from lightning.fabric import Fabric

from utils.exits import fail
from utils.preemption import StopRequest


def split_step_output(output) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """training_step's output as (loss, {name: other value, detached, as a float tensor on the loss's device})."""
    if not isinstance(output, dict):
        return output, {}
    if "loss" not in output:
        fail(f"training_step returned a dict without 'loss' (keys: {', '.join(map(repr, output))})")
    loss = output["loss"]
    return loss, {name: torch.as_tensor(value, device=loss.device).detach().float().reshape(())
                  for name, value in output.items() if name != "loss"}


def check_losses_and_votes(fabric: Fabric, steps: list[torch.Tensor], stop: StopRequest, step: int):
    """All ranks: for each of the `steps` up to `step` (each a tensor of its loss and other values), the mean over
    ranks of its values; and how many ranks were asked to stop, and how many by Ctrl-C. A NaN or infinite loss on any
    rank stops every rank, naming its step."""
    values = torch.stack(steps).float()  # (steps, 1 + other values)
    flags = torch.cat([values.flatten(), values.new_tensor([stop.requested, stop.interrupted])])
    *sums, stop_votes, interrupt_votes = fabric.all_reduce(flags, reduce_op="sum").tolist()
    width = values.shape[1]
    rows = [sums[start:start + width] for start in range(0, len(sums), width)]
    for bad_step, (loss_sum, *_) in enumerate(rows, start=step - len(rows) + 1):
        if not math.isfinite(loss_sum):  # found before any log or checkpoint of this step
            fail(f"loss is {loss_sum} at step {bad_step}; stopped at step {step}, no checkpoint written from step "
                 f"{bad_step} on", status=1, loggers=fabric.loggers)
    return [[value / fabric.world_size for value in row] for row in rows], stop_votes, interrupt_votes


def check_validation(values: dict, step: int, loggers: list) -> None:
    """All ranks (each has the same values): a NaN or infinite validation metric stops the run as a non-finite
    training loss does, before the weights that gave it can be logged, saved or kept as the best."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"val_{name} is {value} at step {step}; stopped, no checkpoint written from step {step} on",
                 status=1, loggers=loggers)
