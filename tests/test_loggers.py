"""wandb (offline) is flushed and closed on every way out of a run, in 1 and in 2 processes: the values in its
`.wandb` file are read back and compared with metrics.csv."""

import csv

import pytest
from conftest import only_run, run_script, workload
from wandb_records import exit_record, history

from utils.loggers import _wandb_run_id

pytestmark = pytest.mark.slow
ARGS = ["--accelerator", "cpu", "--epochs", "2", "--logger_name", "csv", "wandb"]
STEPS = workload().steps_per_epoch  # optimizer steps per epoch (19 for the digits)
EXITS = {  # how the run ends in epoch 2: (environment of tests/fault_driver.py, exit status)
    "success": ({}, 0),
    "preempted": ({"FAULT": "sigusr1", "FAULT_AT_FORWARD": str(STEPS + max(1, STEPS // 6))}, 143),
    "failed": ({"FAULT": "nan", "FAULT_AT_FORWARD": str(STEPS + max(2, STEPS // 3))}, 1),
}


@pytest.mark.parametrize("devices,how", [(2, "success"), (2, "preempted"), (2, "failed"), (1, "preempted"),
                                         (1, "failed")])
def test_wandb_keeps_every_logged_value(tmp_path, devices, how):
    env, status = EXITS[how]
    run_script("tests/fault_driver.py", "--root_dir", tmp_path, *ARGS, "--devices", devices, env=env,
               check_rc=status)
    run = only_run(tmp_path)
    (wandb_file,) = (run / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = [(row["trainer/global_step"], row["train_loss"]) for row in history(wandb_file) if "train_loss" in row]
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        expected = [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(f) if r["train_loss"]]
    assert len(expected) >= min(4, STEPS) and logged == expected
    assert exit_record(wandb_file) == (0 if how != "failed" else 1)  # wandb.finish() ran


def test_wandb_run_id_is_unique_per_run_folder_and_kept(tmp_path):
    first, second = tmp_path / "a" / "20261123-101010-train_out", tmp_path / "b" / "20261123-101010-train_out"
    assert _wandb_run_id(first) != _wandb_run_id(second)  # same folder name, different root_dir
    assert _wandb_run_id(first) == _wandb_run_id(first)  # a resume continues it
