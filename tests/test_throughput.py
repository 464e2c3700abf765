"""The FLOP count behind the logged FLOPs per second and MFU (logged on a GPU only), checked on the CPU."""

import torch
from lightning.fabric import Fabric

from config import parse_config
from model import make_model
from train import step_loss
from utils.batching import plan_batches
from utils.throughput import Speed


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
