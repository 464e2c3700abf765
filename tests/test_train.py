"""End to end on one CPU process: the run folder, config.yaml, logs read back, checkpoints, retention, test.py."""

import csv
import json
import math

import pytest
import yaml
from conftest import checkpoints, load, only_run, run_script, train, workload
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb_records import history

from config import parse_config
from model import make_model
from utils.lr_schedule import lr_at
from utils.run_dir import create_run_dir


def test_run_folder_config_logs_and_checkpoints(root):
    train(root, "--epochs", "3", "--log_per_epoch", "4", "--comment", "short note", "--micro_batch_size", "16",
          "--num_checkpoint_keep", "2", "--warmup_steps", "5")
    run = only_run(root)
    names = sorted(p.name for p in run.iterdir() if p.name != "code.diff")  # code.diff: when the tree is dirty
    assert names == [".lock", "checkpoints", "code", "config.yaml", "logs", "provenance.yaml"]

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert list(saved)[:3] == ["accelerator", "devices", "num_nodes"]  # field order, not sorted
    assert saved["comment"] == "short note" and saved["epochs"] == 3
    steps = workload().steps_per_epoch
    params = list(make_model(parse_config([])).parameters())
    assert saved["derived"] == {"world_size": 1, "per_device_batch_size": 64, "accum_steps": 4,
                                "micro_batch_size": 16, "lr": 0.002, "steps_per_epoch": steps, "total_steps": 3 * steps,
                                "param_groups": {name: {"tensors": len(group), "params": sum(p.numel() for p in group)}
                                                 for name, group in (("decay", [p for p in params if p.dim() >= 2]),
                                                                     ("no_decay", [p for p in params if p.dim() < 2]))}}

    # csv: train loss 4 times per epoch, validation once per epoch, in one row per step
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train_steps = [int(r["step"]) for r in rows if r["train_loss"]]
    # each window ends by its epoch's end (the digits' 19 steps: 5, 10, 15, 19, 24, ...)
    assert train_steps == sorted({epoch * steps + math.ceil(k * steps / 4) for epoch in range(3) for k in (1, 2, 3, 4)})
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [steps, 2 * steps, 3 * steps]
    assert len({r["step"] for r in rows}) == len(rows)
    assert all(float(r["samples_per_sec"]) > 0 and float(r["grad_norm"]) > 0 for r in rows if r["train_loss"])
    # the LR of each logged step: 5 warmup steps to the peak, then cosine decay to 0.1 x peak at the last step
    assert [float(r["lr"]) for r in rows] == [lr_at(int(r["step"]), 0.002, 5, 3 * steps, "cosine", 0.1) for r in rows]
    assert float(rows[-1]["lr"]) == pytest.approx(0.0002)

    # tensorboard: real event files, read back, with every value of the csv
    events = EventAccumulator(str(run / "logs" / "tensorboard"))
    events.Reload()
    logged = [name for name in rows[0] if name not in ("step", "epoch")]
    assert {"train_loss", "val_loss", "lr", "samples_per_sec", "grad_norm"} <= set(logged)
    assert set(logged) <= set(events.Tags()["scalars"])
    for name in logged:
        assert [(e.step, e.value) for e in events.Scalars(name)] == \
            [(int(r["step"]), pytest.approx(float(r[name]), rel=1e-6)) for r in rows if r[name]]

    # checkpoints: the newest 2 of 3, each one file that weights_only loading opens
    assert [p.name for p in checkpoints(run)] == [f"epoch-0002-step-{2 * steps:08d}.ckpt",
                                                  f"epoch-0003-step-{3 * steps:08d}.ckpt"]
    ckpt = load(checkpoints(run)[-1])
    assert {"model", "optimizer", "epoch", "global_step", "config"} <= set(ckpt)
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["config"]["comment"]) == (3, 3 * steps, "short note")
    assert isinstance(ckpt["config"], dict) and workload().first_tensor in ckpt["model"]
    # weight decay on the weight tensors (2 or more dimensions), not on the biases
    decay, no_decay = ckpt["optimizer"]["param_groups"]
    moments = {i: ckpt["optimizer"]["state"][i]["exp_avg"] for i in decay["params"] + no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and all(moments[i].dim() >= 2 for i in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(moments[i].dim() < 2 for i in no_decay["params"])
    assert decay["params"] != [] and decay["betas"] == no_decay["betas"] == (0.9, 0.999)


def test_checkpoint_frequency_and_the_last_one(root):
    train(root, "--epochs", "5", "--checkpoint_frequency", "2", "--num_checkpoint_keep", "10", "--logger_name", "csv")
    names = [p.name for p in checkpoints(only_run(root))]
    steps = workload().steps_per_epoch
    assert names == [f"epoch-{epoch:04d}-step-{epoch * steps:08d}.ckpt" for epoch in (2, 4, 5)]


def test_two_runs_in_the_same_second_get_two_folders(tmp_path):
    paths = {create_run_dir(tmp_path, "train_out") for _ in range(3)}
    assert len(paths) == 3 and all(p.is_dir() for p in paths)


def test_wandb_offline(root):
    train(root, "--epochs", "1", "--logger_name", "wandb", "csv")
    run = only_run(root)
    run_id = (run / "logs" / "wandb" / "run_id").read_text().strip()
    (wandb_file,) = (run / "logs" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    val = [(row["trainer/global_step"], row["val_loss"]) for row in history(wandb_file) if "val_loss" in row]
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        assert val == [(int(r["step"]), float(r["val_loss"])) for r in csv.DictReader(f) if r["val_loss"]] != []


def test_the_host_reads_the_device_only_at_log_validation_and_checkpoint_steps(tmp_path):
    """Every read of a tensor's value by the host (.item(), .tolist(): on a GPU each waits for the device), counted
    by optimizer step over 2 epochs, logging twice per epoch: reads happen only at the log steps (10 and 29 of the
    digits' 19 per epoch) and the epoch ends (log, validation, checkpoint); none on the steps between. AdamW's step
    counters live on the host and are not counted."""
    reads_log = tmp_path / "reads.json"
    run_script("tests/fault_driver.py", "--root_dir", tmp_path, "--epochs", "2", "--log_per_epoch", "2",
               env={"READS_LOG": str(reads_log)})
    reads = {int(step): count for step, count in json.loads(reads_log.read_text()).items()}
    steps, half = workload().steps_per_epoch, math.ceil(workload().steps_per_epoch / 2)
    assert set(reads) - {0} == {half, steps, steps + half, 2 * steps}, reads  # 0: before the first step (setup)
