"""The FLOP count behind the logged FLOPs per second and MFU (logged on a GPU only), checked on the CPU."""

import torch
from lightning.fabric import Fabric

from config import parse_config
from model import make_model
from train import step_loss
from utils.batching import plan_batches
from utils.throughput import Speed, compute_type, peak_flops


def test_rates_at_a_log_step():
    """On the CPU no FLOPs are counted (no MFU column); the rates are steps x work / seconds, MFU over the peak."""
    cfg = parse_config(["--config_path", "configs/shakespeare_char.yaml"])
    fabric = Fabric(accelerator="cpu", devices=1)
    sample = (torch.zeros(64, dtype=torch.long), torch.zeros(64, dtype=torch.long))
    speed = Speed(fabric, cfg, sample, plan_batches(12, 1, None), lambda: make_model(cfg),
                  lambda m, b: step_loss(m, b, cfg))
    assert speed.rates(10, 2.0) == {"samples_per_sec": 60.0, "tokens_per_sec": 3840.0}
    speed.flops_per_step, speed.peak_flops = 1e12, 1e13  # what a GPU with a known peak sets
    assert speed.rates(10, 2.0) == {"samples_per_sec": 60.0, "tokens_per_sec": 3840.0, "flops_per_sec": 5e12,
                                    "mfu": 0.5}


def test_peak_flops_of_the_gpus_people_use_are_dense_figures():
    """The names torch.cuda.get_device_name() gives, matched to dense peaks (half the datasheets' sparse ones)."""
    assert peak_flops("NVIDIA H200", "bf16") == 989.4e12  # not in Fabric's table by this name
    assert peak_flops("NVIDIA H200 NVL", "bf16") == 835.5e12  # Fabric's: 1.7e15, the sparse figure
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12  # the SXM part
    assert peak_flops("NVIDIA H100 PCIe", "tf32") == 378e12 and peak_flops("NVIDIA H100 NVL", "fp16") == 835.5e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == peak_flops("NVIDIA A100 80GB PCIe", "bf16") == 312e12
    assert peak_flops("NVIDIA B200", "bf16") == 2250e12 and peak_flops("NVIDIA GeForce RTX 4090", "bf16") == 165.2e12
    assert peak_flops("NVIDIA L4", "fp32") == 30.3e12 and peak_flops("NVIDIA L40S", "bf16") == 362.05e12
    assert peak_flops("NVIDIA L40", "bf16") == 181.05e12  # not the L4's, nor the L40S's
    assert peak_flops("NVIDIA GeForce GTX 1080", "bf16") is None and peak_flops("NVIDIA H200", None) is None
    assert [compute_type(p, True) for p in ("bf16-mixed", "16-mixed", "32-true", "64-true")] == \
        ["bf16", "fp16", "tf32", None]
    assert compute_type("32-true", False) == compute_type(None, False) == "fp32"
