"""End to end on one CPU process: the run folder, config.yaml, logs read back, checkpoints, retention, test.py."""

import csv
import json
import time

import pytest
import yaml
from conftest import checkpoints, load, only_run, run_script, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb_records import history

from utils.lr_schedule import lr_at
from utils.run_dir import create_run_dir


@pytest.mark.slow
def test_bare_train_then_test_reaches_095(tmp_path):
    """The README's two commands, bare, from a fresh folder: python train.py, then python test.py."""
    start = time.perf_counter()
    result = run_script("train.py", cwd=tmp_path)
    seconds = time.perf_counter() - start
    run = only_run(tmp_path / "runs")
    assert run.name.endswith("-train_out") and len(run.name) == len("YYYYmmdd-HHMMSS-train_out")
    out = run_script("test.py", "--out_dir", run, cwd=tmp_path).stdout
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["samples"] == 270 and metrics["acc"] >= 0.95, metrics
    assert f"test acc {metrics['acc']:.4f}" in out
    print(f"bare train.py took {seconds:.1f} s; test acc {metrics['acc']:.4f}")
    assert "Traceback" not in result.stderr


def test_run_folder_config_logs_and_checkpoints(root):
    train(root, "--epochs", "3", "--log_per_epoch", "4", "--comment", "short note", "--micro_batch_size", "16",
          "--num_checkpoint_keep", "2", "--warmup_steps", "5")
    run = only_run(root)
    names = sorted(p.name for p in run.iterdir() if p.name != "code.diff")  # code.diff: when the tree is dirty
    assert names == [".lock", "checkpoints", "code", "config.yaml", "logs", "provenance.yaml"]

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert list(saved)[:3] == ["accelerator", "devices", "num_nodes"]  # field order, not sorted
    assert saved["comment"] == "short note" and saved["epochs"] == 3
    assert saved["derived"] == {"world_size": 1, "per_device_batch_size": 64, "accum_steps": 4,
                                "micro_batch_size": 16, "lr": 0.002, "steps_per_epoch": 19, "total_steps": 57,
                                "param_groups": {"decay": {"tensors": 4, "params": 151072},  # conv and linear weights
                                                 "no_decay": {"tensors": 4, "params": 234}}}  # biases

    # csv: train loss 4 times per epoch, validation once per epoch, in one row per step
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train_steps = [int(r["step"]) for r in rows if r["train_loss"]]
    assert train_steps == [5, 10, 15, 19, 24, 29, 34, 38, 43, 48, 53, 57]  # each window ends by its epoch's end
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [19, 38, 57]
    assert len({r["step"] for r in rows}) == len(rows)
    assert all(float(r["samples_per_sec"]) > 0 and float(r["grad_norm"]) > 0 for r in rows if r["train_loss"])
    # the LR of each logged step: 5 warmup steps to the peak, then cosine decay to 0.1 x peak at step 57
    assert [float(r["lr"]) for r in rows] == [lr_at(int(r["step"]), 0.002, 5, 57, "cosine", 0.1) for r in rows]
    assert float(rows[0]["lr"]) == 0.002 and float(rows[-1]["lr"]) == pytest.approx(0.0002)

    # tensorboard: real event files, read back
    events = EventAccumulator(str(run / "logs" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train_loss", "val_loss", "val_acc", "lr", "samples_per_sec", "grad_norm"} <= set(scalars)
    assert [e.step for e in events.Scalars("val_acc")] == [19, 38, 57]
    assert events.Scalars("val_acc")[-1].value > 0.8

    # checkpoints: the newest 2 of 3, each one file that weights_only loading opens
    assert [p.name for p in checkpoints(run)] == ["epoch-0002-step-00000038.ckpt", "epoch-0003-step-00000057.ckpt"]
    ckpt = load(checkpoints(run)[-1])
    assert {"model", "optimizer", "epoch", "global_step", "config"} <= set(ckpt)
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["config"]["comment"]) == (3, 57, "short note")
    assert isinstance(ckpt["config"], dict) and "0.weight" in ckpt["model"]
    # weight decay on the 4 weight tensors (2 or more dimensions), not on the 4 biases
    decay, no_decay = ckpt["optimizer"]["param_groups"]
    moments = {i: ckpt["optimizer"]["state"][i]["exp_avg"] for i in decay["params"] + no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and [moments[i].dim() >= 2 for i in decay["params"]] == [True] * 4
    assert no_decay["weight_decay"] == 0.0 and [moments[i].dim() for i in no_decay["params"]] == [1] * 4
    assert decay["betas"] == no_decay["betas"] == (0.9, 0.999)


def test_checkpoint_frequency_and_the_last_one(root):
    train(root, "--epochs", "5", "--checkpoint_frequency", "2", "--num_checkpoint_keep", "10", "--logger_name", "csv")
    names = [p.name for p in checkpoints(only_run(root))]
    assert names == ["epoch-0002-step-00000038.ckpt", "epoch-0004-step-00000076.ckpt",
                     "epoch-0005-step-00000095.ckpt"]


def test_two_runs_in_the_same_second_get_two_folders(tmp_path):
    paths = {create_run_dir(tmp_path, "train_out") for _ in range(3)}
    assert len(paths) == 3 and all(p.is_dir() for p in paths)


def test_wandb_offline(root):
    train(root, "--epochs", "1", "--logger_name", "wandb", "csv")
    run = only_run(root)
    run_id = (run / "logs" / "wandb" / "run_id").read_text().strip()
    (wandb_file,) = (run / "logs" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    val = [(row["trainer/global_step"], row["val_acc"]) for row in history(wandb_file) if "val_acc" in row]
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        assert val == [(int(r["step"]), float(r["val_acc"])) for r in csv.DictReader(f) if r["val_acc"]] != []


def test_the_host_reads_the_device_only_at_log_validation_and_checkpoint_steps(tmp_path):
    """Every read of a tensor's value by the host (.item(), .tolist(): on a GPU each waits for the device), counted
    by optimizer step over 2 epochs of 19 steps, logging twice per epoch: reads happen only at the log steps (10, 29)
    and the epoch ends (log, validation, checkpoint); none on the 34 steps between. AdamW's step counters live on
    the host and are not counted."""
    reads_log = tmp_path / "reads.json"
    run_script("tests/fault_driver.py", "--root_dir", tmp_path, "--epochs", "2", "--log_per_epoch", "2",
               env={"READS_LOG": str(reads_log)})
    reads = {int(step): count for step, count in json.loads(reads_log.read_text()).items()}
    assert set(reads) - {0} == {10, 19, 29, 38}, reads  # 0: before the first step (setup)
