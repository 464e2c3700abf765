"""Exact resume: stop anywhere (a real SIGUSR1 at a chosen step), resume, and end bit-identical to a run that
never stopped, with the same logged losses. Negative controls switch off each part and must break equality."""

import csv
import shutil

import pytest
import torch
from conftest import checkpoints, load, only_run, run_script, workload

pytestmark = pytest.mark.slow
ARGS = ["--accelerator", "cpu", "--epochs", "2", "--logger_name", "csv"]  # 32-true, dropout 0.1
STEPS = workload().steps_per_epoch  # optimizer steps per epoch (19 for the digits)


def train(root, *args, env=None, check_rc=0, driver=False):
    script = "tests/fault_driver.py" if driver else "train.py"
    return run_script(script, "--root_dir", root, *ARGS, *args, env=env, check_rc=check_rc)


def stop_at(root, step, *args, ranks=None):
    """Runs until a real SIGUSR1 arrives during optimizer step `step`; the run saves and exits 143."""
    env = {"FAULT": "sigusr1", "FAULT_AT_FORWARD": str(step), **({"FAULT_RANKS": ranks} if ranks else {})}
    result = train(root, *args, env=env, check_rc=143, driver=True)
    assert load(checkpoints(only_run(root))[-1])["global_step"] == step
    return result


def final_state(root) -> dict:
    return load(checkpoints(only_run(root))[-1])


def logged(root) -> list[dict]:
    """metrics.csv without the wall-clock column."""
    with open(only_run(root) / "logs" / "csv" / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k != "samples_per_sec"} for row in csv.DictReader(f)]


def identical(a: dict, b: dict) -> bool:
    """Bit-identical model, optimizer state and step."""
    if a["global_step"] != b["global_step"] or a["model"].keys() != b["model"].keys():
        return False
    same_model = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    same_opt = all(torch.equal(torch.as_tensor(opt_a[i][k]), torch.as_tensor(opt_b[i][k]))
                   for i in opt_a for k in opt_a[i])
    return same_model and same_opt and a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    train(root)
    return root


@pytest.mark.parametrize("step", [1, STEPS // 2 + 1, STEPS, STEPS + STEPS // 3 + 1],
                         ids=["first-step", "mid-epoch", "last-batch-of-epoch", "mid-second-epoch"])
def test_stop_anywhere_resume_exactly(tmp_path, reference, step):
    stop_at(tmp_path, step)
    result = train(tmp_path, "--resume", "auto")
    assert f"at step {step}" in result.stdout
    assert identical(final_state(tmp_path), final_state(reference))
    assert logged(tmp_path) == logged(reference)  # every earlier row kept, none repeated or skipped


def test_resume_right_after_an_epoch_checkpoint_with_more_epochs(tmp_path):
    """A finished 1-epoch run extended to 2 epochs equals a 2-epoch run (at a constant LR: a decaying schedule
    depends on the run's length, so it would differ by design)."""
    train(tmp_path / "reference", "--lr_schedule", "constant")
    train(tmp_path / "extended", "--epochs", "1", "--lr_schedule", "constant")
    run = only_run(tmp_path / "extended")
    train(tmp_path / "extended", "--resume", run, "--epochs", "2")  # a flag overrides the run's own settings
    assert identical(final_state(tmp_path / "extended"), final_state(tmp_path / "reference"))
    assert logged(tmp_path / "extended") == logged(tmp_path / "reference")


def test_ddp_stop_on_one_rank_resume_exactly(tmp_path):
    """2 processes; the signal reaches rank 1 only, yet both stop at the same step; the resume is exact."""
    train(tmp_path / "reference", "--devices", "2")
    stop_at(tmp_path / "stopped", STEPS // 2 + 1, "--devices", "2", ranks="1")
    train(tmp_path / "stopped", "--devices", "2", "--resume", "auto")
    assert identical(final_state(tmp_path / "stopped"), final_state(tmp_path / "reference"))
    assert logged(tmp_path / "stopped") == logged(tmp_path / "reference")


@pytest.fixture(scope="module")
def stopped_mid_second_epoch(tmp_path_factory):
    root = tmp_path_factory.mktemp("stopped")
    stop_at(root, STEPS + STEPS // 3 + 1)
    return root


@pytest.mark.parametrize("part", ["none", "rng", "sampler_epoch", "batch_skip"])
def test_negative_controls(tmp_path, reference, stopped_mid_second_epoch, part):
    """The equality above fails when any one part of exact resume is switched off ('none' switches nothing)."""
    root = tmp_path / "runs"
    shutil.copytree(stopped_mid_second_epoch, root)
    train(root, "--resume", "auto", env={"BREAK": part} if part != "none" else None, driver=True)
    assert identical(final_state(root), final_state(reference)) == (part == "none")
