"""The GPU paths that can go wrong, shown on the CPU where the CPU can show them: 16-mixed with a real loss scaler
and a fused optimizer (as on CUDA), the scaler across a resume, ..."""

import json
import math

import torch
from conftest import assert_one_error_line, checkpoints, load, only_run, run_script, workload
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision

from utils.model_setup import clip_gradients

STEPS = workload().steps_per_epoch  # optimizer steps per epoch (19 for the digits)
ARGS = ["--accelerator", "cpu", "--logger_name", "csv"]
AMP = {"AMP_SCALER": "1"}  # tests/fault_driver.py: 16-mixed with a real GradScaler and a fused AdamW, as on CUDA


def test_clipping_under_a_loss_scaler_and_a_fused_optimizer_unscales_first():
    """The norm returned is the unscaled one, and the gradients are clipped to max_norm. Fabric's own call refuses
    (a control: it is what made every 16-mixed run on CUDA die at its first log step)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), fused=True))
    fabric.backward(model(torch.randn(32, 8)).float().logsumexp(-1).mean())
    scaled = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    try:
        fabric.clip_gradients(model, optimizer, max_norm=0.01)
        raise AssertionError("Fabric clipped under a scaler with a fused optimizer")
    except NotImplementedError:
        pass
    norm = clip_gradients(fabric, model, optimizer, max_norm=0.01)
    assert norm == scaled / 1024  # a power of two: unscaling is exact
    clipped = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert abs(clipped - 0.01) < 1e-6 and norm > 0.01
    optimizer.step()
    assert scaler.get_scale() == 1024.0  # a finite step: taken, the scale unchanged


def test_16_mixed_trains_clips_and_reads_the_device_only_at_log_steps(tmp_path):
    """A whole run at 16-mixed with --grad_clip, a real scaler and a fused AdamW: every step taken, the scale in the
    checkpoint, and the host reads tensor values only at log, validation and checkpoint steps (as at 32-true)."""
    reads_log = tmp_path / "reads.json"
    run_script("tests/fault_driver.py", "--root_dir", tmp_path, *ARGS, "--precision", "16-mixed", "--grad_clip", "1",
               "--epochs", "2", "--log_per_epoch", "2", env={**AMP, "READS_LOG": str(reads_log)})
    run = only_run(tmp_path)
    scaler = load(checkpoints(run)[-1])["scaler"]
    assert scaler["scale"] == 2.0**16 and scaler["_growth_tracker"] == 2 * STEPS  # no step skipped
    reads = {int(step) for step in json.loads(reads_log.read_text())}
    half = math.ceil(STEPS / 2)
    assert reads - {0} == {half, STEPS, STEPS + half, 2 * STEPS}, reads


def test_a_run_without_a_scaler_resumes_at_16_mixed_with_a_fresh_one(tmp_path):
    run_script("train.py", "--root_dir", tmp_path, *ARGS, "--epochs", "1")
    run = only_run(tmp_path)
    result = run_script("tests/fault_driver.py", "--resume", run, "--precision", "16-mixed", "--epochs", "2", env=AMP)
    assert "the loss scale of 16-mixed starts fresh" in result.stdout
    assert load(checkpoints(run)[-1])["scaler"]["_growth_tracker"] == STEPS


def test_a_nan_in_validation_stops_every_rank_before_it_is_kept(tmp_path):
    """NaN outputs in one validation batch of one rank (as NaN weights give): both ranks stop with one line, exit 1,
    and nothing is saved from that step, best.ckpt included. Negative control: without the check the run ends with
    exit 0, its NaN validation kept as the best."""
    fault = {"NAN_AT_EVAL_FORWARD": "2", "FAULT_RANKS": "1"}
    result = run_script("tests/fault_driver.py", "--root_dir", tmp_path / "checked", *ARGS, "--devices", "2",
                        env=fault, check_rc=1)
    assert_one_error_line(result, f"val_loss is nan at step {STEPS}; stopped, no checkpoint written")
    run = only_run(tmp_path / "checked")
    assert checkpoints(run) == [] and not (run / "checkpoints" / "best.ckpt").exists()

    run_script("tests/fault_driver.py", "--root_dir", tmp_path / "unchecked", *ARGS, "--devices", "2", "--epochs",
               "1", env={**fault, "BREAK": "validation_check"})
    best = load(only_run(tmp_path / "unchecked") / "checkpoints" / "best.ckpt")
    assert math.isnan(best["best_value"])
