"""Training speed as the loop logs it at log steps: samples (and tokens) per second, and on a GPU FLOPs per second
and MFU (model FLOPs utilization), from a FLOP count taken once on a meta-device copy of the model: nothing is added
to the steps themselves."""

import re

import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.throughput import measure_flops
from torch.utils._pytree import tree_map_only
from torch.utils.data import default_collate

from data import tokens_per_sample
from utils.console import print0

# Dense peaks in TFLOPS (bf16, fp16, tf32, fp32) from NVIDIA's datasheets, whose tensor-core figures are "with
# sparsity", twice the dense peak that training reaches; fp16/bf16 with float32 accumulation, as torch computes.
# Names are matched as words of torch.cuda.get_device_name(), the more specific first ("NVIDIA H100 80GB HBM3" is
# the SXM part; Fabric's own table misses "NVIDIA H200" and lists sparse figures for the NVL parts).
PEAK_TFLOPS = {
    "h200 nvl": (835.5, 835.5, 417.5, 60.0),
    "h200": (989.4, 989.4, 494.7, 66.9),
    "h100 nvl": (835.5, 835.5, 417.5, 60.0),
    "h100 pcie": (756.0, 756.0, 378.0, 51.2),
    "h100": (989.4, 989.4, 494.7, 66.9),
    "b200": (2250.0, 2250.0, 1100.0, 75.0),
    "a100": (312.0, 312.0, 156.0, 19.5),
    "l40s": (362.05, 362.05, 183.0, 91.6),
    "l40": (181.05, 181.05, 90.5, 90.5),
    "l4": (121.0, 121.0, 60.0, 30.3),
    "rtx 4090": (165.2, 165.2, 82.6, 82.6),
}
COMPUTE = ("bf16", "fp16", "tf32", "fp32")


def compute_type(precision: str | None, tf32: bool) -> str | None:
    """What the matrix multiplications run in, which decides the device's peak (None: float64, no tensor cores)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    return None if precision.startswith("64") else "tf32" if tf32 else "fp32"


def peak_flops(device_name: str, compute: str | None) -> float | None:
    """The device's dense peak FLOPs per second in that compute type; None for a device or type not in the table."""
    for name, peaks in PEAK_TFLOPS.items():
        if compute in COMPUTE and re.search(rf"\b{name}\b", device_name.lower()):
            return peaks[COMPUTE.index(compute)] * 1e12
    return None


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
        device, compute = torch.cuda.get_device_name(fabric.device), compute_type(cfg.precision, cfg.tf32)
        peak = peak_flops(device, compute)
        if peak is None:
            print0(f"MFU is not logged: utils/throughput.py has no peak FLOPs for {device} at {compute}")
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
