"""Batch split and LR arithmetic, and that accumulation steps the optimizer the right number of times."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST, checkpoints, load, max_weight_diff, only_run, workload
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

from config import parse_config
from train import main
from utils.batching import plan_batches, scaled_lr
from utils.streaming import StreamedSteps


@pytest.mark.parametrize("eff,world,micro,expected", [
    (64, 1, None, (64, 1, 64)),
    (64, 2, None, (32, 1, 32)),
    (64, 2, 16, (32, 2, 16)),
    (64, 4, 10, (16, 2, 8)),  # smallest accumulation whose micro-batch fits under the cap
    (96, 2, 20, (48, 3, 16)),
    (12, 3, 5, (4, 1, 4)),
    (7, 1, 3, (7, 7, 1)),  # a prime splits into micro-batches of 1
])
def test_plan_batches(eff, world, micro, expected):
    plan = plan_batches(eff, world, micro)
    assert (plan.per_device, plan.accum_steps, plan.micro) == expected
    assert plan.per_device * world == eff
    assert plan.micro * plan.accum_steps * world == eff


def test_plan_refuses_uneven_split():
    with pytest.raises(ValueError, match="eff_batch_size=10 .* 4 processes"):
        plan_batches(10, 4, None)


def test_scaled_lr():
    assert scaled_lr(1e-3, 256, 64, "linear") == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 256, 64, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 256, 64, "none") == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 32, 64, "sqrt") == pytest.approx(1e-3 / math.sqrt(2))


def _count_calls(run):
    """Counts optimizer steps and training forwards of the model (nn.Sequential: the default model) during run()."""
    counts = {"optimizer_steps": 0, "forwards": 0}

    def count_step(*_):
        counts["optimizer_steps"] += 1

    def count_forward(module, *_):
        counts["forwards"] += isinstance(module, torch.nn.Sequential) and module.training

    hooks = [register_optimizer_step_post_hook(count_step), register_module_forward_hook(count_forward)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def test_accumulation_counts_steps_and_matches_one_big_batch(root):
    """eff 64 in micro-batches of 16: 4 forwards per optimizer step, steps_per_epoch steps per epoch, same weights as
    no accumulation (float64, no dropout), so the loss is averaged right."""
    common = [*FAST, "--precision", "64-true", "--dropout", "0", "--logger_name", "csv"]
    results = {}
    for micro in ("16", None):
        sub = root / f"micro{micro}"
        cfg = parse_config([*common, "--root_dir", str(sub), *(["--micro_batch_size", micro] if micro else [])])
        counts = _count_calls(lambda cfg=cfg: main(cfg))
        results[micro] = (counts, load(checkpoints(only_run(sub))[-1])["model"])
    accumulated, plain = results["16"][0], results[None][0]
    steps = 2 * workload().steps_per_epoch
    assert accumulated["optimizer_steps"] == plain["optimizer_steps"] == steps
    assert accumulated["forwards"] == 4 * steps and plain["forwards"] == steps
    assert max_weight_diff(results["16"][1], results[None][1]) < 1e-12


class ShortStream(list):
    """A streamed loader that holds fewer micro-batches than the epoch's steps need."""
    restore = current_epoch = None


@pytest.mark.parametrize("batches,fails", [(6, False), (5, True)])
def test_a_streamed_epoch_that_ends_early_stops_the_run_instead_of_shifting_the_steps(batches, fails, capsys):
    """After a resume on another world size litdata may deal a rank fewer samples than the epoch's remaining steps
    need; the loop's count of steps and litdata's epochs would then part. Control: enough batches run to the end."""
    steps = object.__new__(StreamedSteps)
    steps.loader, steps.steps_per_epoch, steps.accum_steps = ShortStream(range(batches)), 4, 2
    steps.fabric = SimpleNamespace(to_device=lambda batch: batch, global_rank=0)
    if not fails:
        assert list(steps.epoch(3, 1)) == [[0, 1], [2, 3], [4, 5]]
        return
    with pytest.raises(SystemExit) as stopped:
        list(steps.epoch(3, 1))
    assert stopped.value.code == 1
    assert "the streamed epoch 3 ended 1 step(s) early on rank 0" in capsys.readouterr().err
