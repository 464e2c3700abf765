"""--ema_decay: a moving average of the weights, updated after each optimizer step, saved beside the model, resumed
exactly, and used for validation, best.ckpt, test.py and --init_from."""

import csv

import pytest
import torch
from conftest import checkpoints, load, only_run, run_script, workload
from lightning.fabric import Fabric
from torch.utils.data import DataLoader

from config import parse_config
from data import make_datasets
from model import make_model
from train import evaluate
from utils.ema import EMA

ARGS = ["--accelerator", "cpu", "--logger_name", "csv", "--epochs", "2", "--ema_decay", "0.9"]
STEPS = workload().steps_per_epoch  # optimizer steps per epoch (19 for the digits)
STOP_AT = str(STEPS + STEPS // 2)  # mid-epoch 2


def test_the_average_follows_its_formula_and_swaps_in_and_out():
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(module, decay=0.9)
    start = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    with torch.no_grad():
        for _ in range(3):
            module[0].weight.add_(1.0)
            module(torch.randn(4, 3))  # moves the running statistics and counts a batch (an integer buffer)
            ema.update()
    average = ema.state_dict()
    assert average.keys() == module.state_dict().keys()
    # three updates by +1, +2, +3 over the start: 0.1 x (0.81 x 1 + 0.9 x 2 + 3) = 0.561
    assert torch.allclose(average["0.weight"], start["0.weight"] + 0.561)
    assert average["1.num_batches_tracked"] == 3  # not averaged: copied
    weights = module[0].weight.clone()
    with ema.swapped_in():
        assert torch.equal(module[0].weight, average["0.weight"])
    assert torch.equal(module[0].weight, weights)


def rows(run):
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_validation_uses_the_average_and_a_stop_resumes_exactly(tmp_path):
    run_script("train.py", "--root_dir", tmp_path / "straight", *ARGS)
    straight = only_run(tmp_path / "straight")
    # what the first validation logged is the average's loss, not the weights'
    cfg = parse_config(["--ema_decay", "0.9"])
    first = load(checkpoints(straight)[0])
    logged = next(float(r["val_loss"]) for r in rows(straight) if r["step"] == str(STEPS))
    _, val_set, _ = make_datasets(cfg)
    scores = {}
    for entry in ("ema", "model"):
        model = make_model(cfg)
        model.load_state_dict(first[entry])
        scores[entry] = evaluate(Fabric(accelerator="cpu", devices=1), model, DataLoader(val_set, 64), cfg)["loss"]
    assert scores["ema"] == pytest.approx(logged, rel=1e-6) and abs(scores["model"] - logged) > 1e-3

    run_script("tests/fault_driver.py", "--root_dir", tmp_path / "stopped", *ARGS, check_rc=143,
               env={"FAULT": "sigusr1", "FAULT_AT_FORWARD": STOP_AT})
    stopped = only_run(tmp_path / "stopped")
    run_script("train.py", "--root_dir", tmp_path / "stopped", *ARGS, "--resume", stopped)
    a, b = load(checkpoints(straight)[-1]), load(checkpoints(stopped)[-1])
    for entry in ("model", "ema"):
        assert all(torch.equal(a[entry][k], b[entry][k]) for k in a[entry])
    assert [r["val_loss"] for r in rows(straight)] == [r["val_loss"] for r in rows(stopped)]

    result = run_script("test.py", "--out_dir", straight)
    assert "best.ckpt, its moving average)" in result.stdout
    result = run_script("train.py", "--root_dir", tmp_path / "tuned", "--accelerator", "cpu", "--max_steps", "1",
                        "--init_from", checkpoints(straight)[-1])
    tensors = workload().tensors
    assert f"(its moving average): {tensors} of the model's {tensors} tensors loaded" in result.stdout


@pytest.mark.slow
def test_two_processes_resume_exactly_and_switching_it_on_or_off_says_so(tmp_path):
    run_script("train.py", "--root_dir", tmp_path / "straight", *ARGS, "--devices", "2")
    run_script("tests/fault_driver.py", "--root_dir", tmp_path / "stopped", *ARGS, "--devices", "2", check_rc=143,
               env={"FAULT": "sigusr1", "FAULT_AT_FORWARD": STOP_AT})
    stopped = only_run(tmp_path / "stopped")
    run_script("train.py", "--root_dir", tmp_path / "stopped", *ARGS, "--devices", "2", "--resume", stopped)
    a, b = (load(checkpoints(only_run(tmp_path / name))[-1]) for name in ("straight", "stopped"))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])

    result = run_script("train.py", "--resume", stopped, "--epochs", "3", "--ema_decay", "0")
    assert "holds a moving average of the weights: dropped" in result.stdout
    assert "ema" not in load(checkpoints(stopped)[-1])
    result = run_script("train.py", "--resume", stopped, "--epochs", "4", "--ema_decay", "0.5")
    assert "has no ema: the moving average of the weights (--ema_decay) starts from the resumed weights" in \
        result.stdout
    assert "ema" in load(checkpoints(stopped)[-1])


@pytest.mark.slow
def test_fsdp2_averages_shards_resumes_exactly_and_crosses_to_ddp(tmp_path):
    fsdp2 = [*ARGS, "--devices", "2", "--strategy", "fsdp2"]
    run_script("train.py", "--root_dir", tmp_path / "straight", *fsdp2)
    run_script("tests/fault_driver.py", "--root_dir", tmp_path / "stopped", *fsdp2, check_rc=143,
               env={"FAULT": "sigusr1", "FAULT_AT_FORWARD": STOP_AT})
    stopped = only_run(tmp_path / "stopped")
    run_script("train.py", "--root_dir", tmp_path / "stopped", *fsdp2, "--resume", stopped)
    a, b = (load(checkpoints(only_run(tmp_path / name))[-1] / "meta.pt") for name in ("straight", "stopped"))
    assert a["global_step"] == b["global_step"] == 2 * STEPS
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])  # full tensors, gathered from the shards
    first = workload().first_tensor
    assert a["ema"][first].shape == workload().first_shape

    result = run_script("test.py", "--out_dir", stopped, "--devices", "1", "--strategy", "auto")
    assert "best.ckpt, its moving average)" in result.stdout  # a folder of shards, read on one process
    result = run_script("train.py", "--resume", stopped, "--epochs", "3", "--devices", "1", "--strategy", "auto")
    assert "resuming on world size 1 (was 2)" in result.stdout
    resumed = load(checkpoints(stopped)[-1])  # a file now: the average crossed from shards to one process
    assert resumed["global_step"] == 3 * STEPS and not torch.equal(resumed["ema"][first], b["ema"][first])
