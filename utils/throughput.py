"""Training speed as the loop logs it at log steps: samples (and tokens) per second, and on a GPU FLOPs per second
and MFU (model FLOPs utilization), from a FLOP count taken once on a meta-device copy of the model: nothing is added
to the steps themselves."""

import warnings

import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops
from torch.utils._pytree import tree_map_only
from torch.utils.data import default_collate

from data import tokens_per_sample
from utils.console import print0


def compute_dtype(precision: str | None) -> torch.dtype:
    """The dtype the matrix multiplications run in, which decides the device's peak."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    return {"16-mixed": torch.float16, "16-true": torch.float16, "64-true": torch.float64}.get(precision, torch.float32)


def count_flops(build_model, sample, micro_batch: int, step_loss) -> int:
    """FLOPs of one forward and backward pass of step_loss(model, batch) over a micro-batch of `sample`s (any nesting
    of tensors and numbers), counted on a copy of the model on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = build_model()
    batch = tree_map_only(torch.Tensor, lambda x: x.to("meta"), default_collate([sample] * micro_batch))
    return measure_flops(model, lambda: step_loss(model, batch), lambda loss: loss)


class Speed:
    """Rates over a window of training time, for the whole run (all processes)."""

    def __init__(self, fabric: Fabric, cfg, sample, batches, build_model, step_loss):
        self.samples_per_step = cfg.eff_batch_size
        self.tokens_per_sample = tokens_per_sample(cfg)  # data.py says; None: samples are no token sequences
        self.flops_per_step = self.peak_flops = None
        if fabric.device.type != "cuda":
            return
        flops = count_flops(build_model, sample, batches.micro, step_loss)
        self.flops_per_step = flops * batches.accum_steps * fabric.world_size
        with warnings.catch_warnings():  # an unknown device: one line below instead of Fabric's warning
            warnings.simplefilter("ignore")
            peak = get_available_flops(fabric.device, compute_dtype(cfg.precision))
        if peak is None:
            print0(f"MFU is not logged: Fabric's table has no peak FLOPs for {torch.cuda.get_device_name()} at "
                   f"{compute_dtype(cfg.precision)}")
        else:
            self.peak_flops = peak * fabric.world_size

    def rates(self, steps: int, seconds: float) -> dict:
        rates = {"samples_per_sec": steps * self.samples_per_step / seconds}
        if self.tokens_per_sample:
            rates["tokens_per_sec"] = rates["samples_per_sec"] * self.tokens_per_sample
        if self.flops_per_step:
            rates["flops_per_sec"] = steps * self.flops_per_step / seconds
        if self.peak_flops:
            rates["mfu"] = rates["flops_per_sec"] / self.peak_flops
        return rates
