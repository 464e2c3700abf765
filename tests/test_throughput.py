"""The FLOP count behind the logged FLOPs per second and MFU (logged on a GPU only), checked on the CPU."""

import torch
from lightning.fabric import Fabric

from config import parse_config
from model import make_model
from train import step_loss
from utils.batching import plan_batches
from utils.throughput import Speed, count_flops


def test_meta_device_count_of_the_gpt_matches_the_formula():
    """Forward and backward of the GPT preset, counted on the meta device: 6 FLOPs per token per weight of every
    matrix multiplication (the tied head included once per use) plus 12 x layers x batch x T^2 x width for
    attention (scores and values, forward and backward): the usual formula, to the FLOP."""
    cfg = parse_config(["--config_path", "configs/shakespeare_char.yaml"])
    batch, T, C, layers, vocab = 12, cfg.model.block_size, cfg.model.n_embd, cfg.model.n_layer, 65
    sample = (torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long))
    flops = count_flops(lambda: make_model(cfg), sample, batch, lambda m, b: step_loss(m, b, cfg))
    model = make_model(cfg)
    block_weights = sum(p.numel() for p in model.blocks.parameters() if p.dim() == 2)
    assert flops == 6 * (block_weights + vocab * C) * batch * T + 12 * layers * batch * T * T * C


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
