"""The GPU paths that can go wrong, shown on the CPU where the CPU can show them: 16-mixed with a real loss scaler
and a fused optimizer (as on CUDA), the scaler across a resume, ..."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, assert_one_error_line, checkpoints, load, only_run, run_script, workload
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision

from config import parse_config
from utils.datasets import worker_settings
from utils.launching import matmul_precision
from utils.model_setup import clip_gradients
from utils.rng import rng_devices

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_run_without_a_scaler_resumes_at_16_mixed_with_a_fresh_one(tmp_path):
    run_script("train.py", "--root_dir", tmp_path, *ARGS, "--epochs", "1")
    run = only_run(tmp_path)
    result = run_script("tests/fault_driver.py", "--resume", run, "--precision", "16-mixed", "--epochs", "2", env=AMP)
    assert "the loss scale of 16-mixed starts fresh" in result.stdout
    assert load(checkpoints(run)[-1])["scaler"]["_growth_tracker"] == STEPS


@pytest.mark.slow
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


def test_tf32_on_cuda_by_default_and_recorded():
    assert matmul_precision(True, torch.device("cuda", 0)) == "high"  # TF32
    assert matmul_precision(False, torch.device("cuda", 0)) == "highest"
    assert matmul_precision(True, torch.device("cpu")) == "highest"
    assert parse_config([]).tf32 and not parse_config(["--tf32", "false"]).tf32


def test_a_rank_restores_its_own_cuda_generator_after_building_the_weights():
    """setup_model seeds the initial weights inside fork_rng, and torch.manual_seed reseeds every CUDA generator:
    fork_rng must be given this rank's device, or every rank's dropout masks on a GPU come from the same seed."""
    assert rng_devices(torch.device("cuda", 3)) == [3]
    assert rng_devices(torch.device("cpu")) == []


FSDP2_DTYPES = """
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from config import parse_config
from data import make_datasets
from model import make_model, shard_model, sharding_units
from torch.utils._pytree import tree_leaves
from train import step_loss
from utils.launching import mixed_precision_policy
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
cfg = parse_config([])
batch = torch.utils.data.default_collate([make_datasets(cfg)[0][i] for i in range(4)])
for precision in ("bf16-mixed", "32-true"):
    model = make_model(cfg)
    unit, seen = (sharding_units(model) or [model])[0], []
    unit.register_forward_hook(lambda module, args, output: seen.append(tree_leaves(output)[0].dtype))
    model = shard_model(model, mesh, mixed_precision_policy(precision))
    step_loss(model, batch, cfg).backward()
    print(precision, seen[0], next(model.parameters()).dtype)
"""


@pytest.mark.slow
def test_fsdp2_gathers_weights_in_the_autocast_dtype():
    """Under bf16-mixed the first sharding unit computes with bf16 weights gathered from float32 shards (half the
    bytes over the network); at 32-true in float32."""
    result = subprocess.run([sys.executable, "-c", FSDP2_DTYPES], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bf16-mixed torch.bfloat16 torch.float32" in result.stdout
    assert "32-true torch.float32 torch.float32" in result.stdout


def test_loader_settings_follow_the_device():
    def settings(device, processes=1, num_workers=None):
        return worker_settings(torch.device(device), processes, num_workers)

    cores = len(os.sched_getaffinity(0))
    assert settings("cpu") == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    assert settings("cuda") == {"num_workers": max(0, min(4, cores - 1)), "pin_memory": True,
                                "persistent_workers": cores > 1}
    assert settings("cuda", processes=cores)["num_workers"] == 0  # one core per process: none to spare
    assert settings("cpu", num_workers=2) == {"num_workers": 2, "pin_memory": False, "persistent_workers": True}


@pytest.mark.slow
def test_workers_keep_the_resume_exact(tmp_path):
    """With DataLoader workers (the default on CUDA), kept across epochs: a stop mid-epoch 2 and a resume end where
    the run without workers ends."""
    run_script("train.py", "--root_dir", tmp_path / "plain", *ARGS, "--epochs", "2")
    workers = [*ARGS, "--epochs", "2", "--num_workers", "2"]
    run_script("tests/fault_driver.py", "--root_dir", tmp_path / "stopped", *workers, check_rc=143,
               env={"FAULT": "sigusr1", "FAULT_AT_FORWARD": str(STEPS + STEPS // 2)})
    stopped = only_run(tmp_path / "stopped")
    run_script("train.py", "--root_dir", tmp_path / "stopped", *workers, "--resume", stopped)
    a, b = load(checkpoints(only_run(tmp_path / "plain"))[-1]), load(checkpoints(stopped)[-1])
    assert a["global_step"] == b["global_step"] == 2 * STEPS
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
def test_a_peer_that_dies_or_hangs_stops_the_others_with_one_line_and_the_run_resumes_exactly(tmp_path, fault):
    """Rank 1 of 2 killed (-9) or stopped (SIGSTOP: a hung process) mid-epoch 2: rank 0 exits 1 with one line
    within the collective timeout (6 s here; gloo notices a dead peer at once), the stopped process is ended too,
    and `--resume auto` continues from the epoch-1 checkpoint to the weights of a run never stopped."""
    args = [*ARGS, "--devices", "2", "--epochs", "2", "--collective_timeout", "0.1"]
    run_script("train.py", "--root_dir", tmp_path / "straight", *args)
    start = time.perf_counter()
    result = run_script("tests/fault_driver.py", "--root_dir", tmp_path / "faulted", *args, check_rc=1, timeout=120,
                        env={"FAULT": fault, "FAULT_AT_FORWARD": str(STEPS + STEPS // 2), "FAULT_RANKS": "1"})
    assert time.perf_counter() - start < 60
    assert_one_error_line(result, "rank 0: another process of this run died or stopped answering",
                          "Timed out" if fault == "sigstop" else "by peer",  # gloo: reset by or closed by peer
                          "run the same command with --resume auto to continue")
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "faulted")], capture_output=True).stdout == b""
    result = run_script("train.py", "--root_dir", tmp_path / "faulted", *args, "--resume", "auto")
    assert f"at step {STEPS}" in result.stdout
    a, b = (load(checkpoints(only_run(tmp_path / name))[-1]) for name in ("straight", "faulted"))
    assert a["global_step"] == b["global_step"] == 2 * STEPS
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_a_failure_on_rank_0_alone_stops_every_rank_with_one_line(tmp_path):
    """wandb online without an API key (a batch job) fails where only rank 0 goes, starting the loggers: both ranks
    exit 1 with the same one line, none waits for rank 0 in a collective."""
    result = run_script("train.py", "--root_dir", tmp_path, *ARGS, "--devices", "2", "--epochs", "1",
                        "--logger_name", "csv", "wandb", env={"WANDB_MODE": "online", "WANDB_API_KEY": ""},
                        check_rc=1, timeout=120)
    assert_one_error_line(result, "recording the run failed on rank 0: UsageError: No API key configured")


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_as_a_dry_run_on_cpu(tmp_path):
    """scripts/gpu_check.sh --accelerator cpu: every path of the GPU check runs (on CPU processes) and the table
    says so; the kill -9 and resume path ends bit-identical here."""
    table = tmp_path / "gpu_check.md"
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--accelerator", "cpu", "--out", table],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = table.read_text().split("Checkpoint saves")[0].splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [row[0] for row in rows] == ["| 32-true (TF32)", "| bf16-mixed", "| 16-mixed, grad_clip 1",
                                        "| 16-mixed, no clipping", "| bf16-mixed --compile", "| DDP x2 bf16-mixed",
                                        "| fsdp2 x2 bf16-mixed", "| kill -9, --resume auto"]
    assert all(row[1] == "0" for row in rows) and "difference to the run never stopped: 0.0e+00" in rows[-1][-1]
    assert all(float(row[3].replace(",", "")) > 0 for row in rows[:-1])  # tokens per second, from each run's log
    assert "| template save_checkpoint (background) |" in table.read_text()  # the save benchmark, appended
