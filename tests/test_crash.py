"""Checkpoints survive crashes: real SIGKILLs mid-save, truncated and corrupt files, a full disk, a malicious
pickle, NaN losses, preemption signals from outside, and loggers that continue cleanly after a resume."""

import csv
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, assert_one_error_line, checkpoints, load, only_run, run_script, workload
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from utils.checkpoint import checkpoint_name, list_checkpoints

pytestmark = pytest.mark.slow
ARGS = ["--accelerator", "cpu", "--epochs", "2", "--logger_name", "csv"]
STEPS = workload().steps_per_epoch  # optimizer steps per epoch (19 for the digits)


def train(root, *args, script="train.py", **kwargs):
    return run_script(script, "--root_dir", root, *ARGS, *args, **kwargs)


def names(run):
    return [p.name for p in checkpoints(run)]


# -- atomic saves --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
def test_sigkill_mid_save_leaves_earlier_checkpoints_and_no_partial_file(tmp_path, delay):
    """A 256 MB save is killed (SIGKILL) `delay` s after its temporary file appears."""
    ckpt_dir, sys_tmp = tmp_path / "checkpoints", tmp_path / "system-tmp"
    sys_tmp.mkdir()
    worker = subprocess.Popen([sys.executable, str(REPO / "tests" / "save_worker.py"), str(ckpt_dir), "256"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(sys_tmp)})
    assert worker.stdout.readline().strip() == "saved 1"
    deadline = time.time() + 60
    while not list(ckpt_dir.glob(".*.tmp")) and time.time() < deadline:
        time.sleep(0.0005)
    time.sleep(delay)
    worker.kill()
    worker.wait()
    saved = list_checkpoints(ckpt_dir)
    assert saved, "the first checkpoint is there"
    for path in saved:  # every file under a checkpoint name is complete
        step = load(path)["global_step"]
        assert torch.equal(load(path)["model"]["weight"][:2, :2], torch.full((2, 2), float(step)))
    assert list(sys_tmp.iterdir()) == []  # nothing written outside the run folder
    leftovers = list(ckpt_dir.glob(".*.tmp"))
    assert len(saved) + len(leftovers) >= 2  # the kill landed in the second save (or right after it)


def test_exit_waits_for_the_write_in_the_background(tmp_path):
    """Saves return once the state is copied; the weights change at once and the process exits right after the
    last save: each checkpoint holds the weights of its own step, complete, and the newest is in place."""
    ckpt_dir = tmp_path / "checkpoints"
    subprocess.run([sys.executable, str(REPO / "tests" / "save_worker.py"), str(ckpt_dir), "64", "2"], check=True)
    saved = list_checkpoints(ckpt_dir)
    assert [load(path)["global_step"] for path in saved] == [1, 2] and not list(ckpt_dir.glob(".*.tmp"))
    for step, path in enumerate(saved, start=1):
        assert torch.equal(load(path)["model"]["weight"], torch.full((64 * 256, 1024), float(step)))


def test_leftover_temp_file_is_removed_at_next_start(root):
    train(root, "--epochs", "1")
    run = only_run(root)
    leftover = run / "checkpoints" / ".epoch-0002-step-00000038.ckpt.tmp"
    leftover.write_bytes(b"half a checkpoint")
    train(root, "--resume", run)
    assert not leftover.exists()


# -- picking the checkpoint to resume from ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_epochs")
    train(root)
    return root


def damage(path, how):
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(len(data))}[how])


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_corrupt_newest_is_moved_aside_and_the_one_before_used(tmp_path, two_epochs, how):
    root = tmp_path / "runs"
    shutil.copytree(two_epochs, root)
    run = only_run(root)
    newest = checkpoints(run)[-1]
    damage(newest, how)
    result = train(root, "--resume", "auto", "--epochs", "3")
    assert f"warning: checkpoint {newest}" in result.stderr
    assert (run / "checkpoints" / f"{newest.name}.corrupt").is_file()
    assert f"at step {STEPS}" in result.stdout  # resumed from the epoch-1 checkpoint
    assert load(checkpoints(run)[-1])["global_step"] == 3 * STEPS


def test_explicit_resume_of_a_corrupt_file_exits_2(tmp_path, two_epochs):
    root = tmp_path / "runs"
    shutil.copytree(two_epochs, root)
    newest = checkpoints(only_run(root))[-1]
    damage(newest, "truncated")
    result = train(root, "--resume", newest, check_rc=2)
    assert_one_error_line(result, f"resume='{newest}'", "does not open")


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, two_epochs):
    root = tmp_path / "runs"
    shutil.copytree(two_epochs, root)
    run = only_run(root)
    marker = tmp_path / "PWNED"
    crafted = run / "checkpoints" / "epoch-0009-step-00000999.ckpt"
    torch.save({"model": RunsCommand(marker)}, crafted)
    with pytest.raises(pickle.UnpicklingError):  # the file really is refused by weights_only loading ...
        torch.load(crafted, weights_only=True)
    result = run_script("test.py", "--out_dir", run, "--checkpoint", "last")  # ... by test.py
    assert f"warning: checkpoint {crafted}" in result.stderr and checkpoint_name(2, 2 * STEPS) in result.stdout
    torch.save({"model": RunsCommand(marker)}, crafted)
    result = train(root, "--resume", run, "--epochs", "3")  # ... and by resume
    assert f"warning: checkpoint {crafted}" in result.stderr and f"at step {2 * STEPS}" in result.stdout
    assert not marker.exists()


def test_resume_refuses_changed_eff_batch_size_and_mismatched_shapes(tmp_path, two_epochs):
    root = tmp_path / "runs"
    shutil.copytree(two_epochs, root)
    run = only_run(root)
    result = train(root, "--resume", run, "--eff_batch_size", "32", "--epochs", "3", check_rc=2)
    assert_one_error_line(result, "eff_batch_size=32", "64")
    newest = checkpoints(run)[-1]
    state = load(newest)
    first, shape = workload().first_tensor, workload().first_shape
    state["model"][first] = torch.zeros(shape[0] + 1, *shape[1:])
    torch.save(state, newest)
    result = train(root, "--resume", run, "--epochs", "3", check_rc=2)
    assert_one_error_line(result, f"checkpoint {newest} does not fit the model")


def test_resume_on_another_world_size_keeps_eff_batch_size(tmp_path, two_epochs):
    root = tmp_path / "runs"
    shutil.copytree(two_epochs, root)
    result = train(root, "--resume", only_run(root), "--epochs", "3", "--devices", "2")
    assert "resuming on world size 2 (was 1): 32 samples per device" in result.stdout
    assert load(checkpoints(only_run(root))[-1])["global_step"] == 3 * STEPS


# -- retention -----------------------------------------------------------------------------------------------------

def test_retention_counts_earlier_files_and_spares_the_resumed_checkpoint(tmp_path):
    root = tmp_path / "runs"
    train(root, "--epochs", "3")
    run = only_run(root)
    assert len(names(run)) == 3
    train(root, "--resume", run, "--epochs", "5", "--num_checkpoint_keep", "1")
    assert names(run) == [checkpoint_name(3, 3 * STEPS), checkpoint_name(5, 5 * STEPS)]


def small_disk(path, megabytes):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    return mounted


@pytest.mark.parametrize("devices", ["1", "2"])
def test_disk_full_during_save(tmp_path, devices):
    """A real ENOSPC: the run lives on a small tmpfs that is filled up before the next save. With 2 DDP processes
    only rank 0 writes, and fails; rank 1 waits in fabric.save's closing barrier: both stop with one line."""
    disk = tmp_path / "disk"
    if not small_disk(disk, 16):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        root = disk / "runs"
        train(root, "--epochs", "1", "--devices", devices)
        run = only_run(root)
        before = names(run)
        stat = os.statvfs(disk)
        # room for the small files a resume writes (resumes.yaml, log rows), not for a checkpoint
        leave = min(300_000, checkpoints(run)[-1].stat().st_size // 2 + 12_288)
        (disk / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - leave))
        result = train(root, "--resume", run, "--epochs", "2", "--devices", devices, check_rc=1, timeout=120)
        # the first save of epoch 2 fails: best.ckpt if the validation improved, else the epoch checkpoint
        assert "could not save checkpoint" in result.stderr
        assert "best.ckpt" in result.stderr or f"epoch-0002-step-{2 * STEPS:08d}.ckpt" in result.stderr
        assert load(run / "checkpoints" / "best.ckpt")["global_step"] == STEPS  # the earlier best, intact
        assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
        assert names(run) == before and load(checkpoints(run)[-1])["global_step"] == STEPS
        assert not list((run / "checkpoints").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)])


# -- bad states ----------------------------------------------------------------------------------------------------

def test_nan_on_one_rank_stops_every_rank_before_the_step(tmp_path):
    """A real NaN in rank 1's output mid-epoch 2: both ranks stop, no checkpoint after the last good one."""
    nan_at = STEPS + STEPS // 2
    result = train(tmp_path, "--devices", "2", script="tests/fault_driver.py", check_rc=1,
                   env={"FAULT": "nan", "FAULT_AT_FORWARD": str(nan_at), "FAULT_RANKS": "1"})
    assert f"loss is nan at step {nan_at}" in result.stderr and "Traceback" not in result.stderr
    assert names(only_run(tmp_path)) == [checkpoint_name(1, STEPS)]


# -- preemption from outside ---------------------------------------------------------------------------------------

def test_sigterm_saves_and_resume_auto_continues_exactly(tmp_path):
    """SIGTERM comes from outside at whatever step the run is at; the same command with --resume auto then ends
    bit-identical to a run that was never stopped. With 2 processes the signal reaches rank 0 only.
    (SIGUSR1 is sent for real by tests/fault_driver.py in test_resume.py.)"""
    command = [sys.executable, str(REPO / "train.py"), "--root_dir", str(tmp_path / "runs"), *ARGS, "--epochs", "3",
               "--devices", "2", "--resume", "auto"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "runs").glob("*/checkpoints/*.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, output
    run = only_run(tmp_path / "runs")
    stopped_at = load(checkpoints(run)[-1])["global_step"]
    assert STEPS <= stopped_at < 3 * STEPS
    assert f"step {stopped_at}; continue with: python train.py --resume {run}" in output
    assert subprocess.run(command, cwd=REPO, capture_output=True).returncode == 0
    run_script("train.py", "--root_dir", tmp_path / "reference", *ARGS, "--epochs", "3", "--devices", "2")
    final, reference = load(checkpoints(run)[-1]), load(checkpoints(only_run(tmp_path / "reference"))[-1])
    assert all(torch.equal(final["model"][k], reference["model"][k]) for k in reference["model"])


# -- loggers across a resume ---------------------------------------------------------------------------------------

def tb_tags(run) -> list[str]:
    """Every summary tag written to the run's TensorBoard event files, in order, repeats included."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    return [value.tag for f in files for event in EventFileLoader(str(f)).Load() for value in event.summary.value]


def test_loggers_continue_after_a_kill(tmp_path):
    """SIGKILL after epoch 2's second log row (the digits: at step 30, after rows for steps 24 and 29, past the
    step-19 checkpoint), resume:
    csv and TensorBoard show every step once, with the values of a run that never stopped; wandb keeps its id.
    The resume warns about nothing, logs hyperparameters no second time, and counts throughput right."""
    args = ["--logger_name", "csv", "tensorboard", "wandb"]
    train(tmp_path / "killed", *args, script="tests/fault_driver.py", check_rc=-signal.SIGKILL,
          env={"FAULT": "sigkill", "FAULT_AT_FORWARD": str(STEPS + math.ceil(STEPS / 2) + 1)})
    run = only_run(tmp_path / "killed")
    resumed = train(tmp_path / "killed", *args, "--resume", run)
    train(tmp_path / "reference", *args)

    def csv_rows(run):
        with open(run / "logs" / "csv" / "metrics.csv") as f:
            return [(r["step"], r["train_loss"], r["val_loss"]) for r in csv.DictReader(f)]

    def tb_steps(run, tag):
        events = EventAccumulator(str(run / "logs" / "tensorboard"))
        events.Reload()
        return [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]

    reference = only_run(tmp_path / "reference")
    assert csv_rows(run) == csv_rows(reference)
    for tag in ("train_loss", "val_loss"):
        assert tb_steps(run, tag) == tb_steps(reference, tag)
    run_id = (run / "logs" / "wandb" / "run_id").read_text().strip()
    assert run_id != (reference / "logs" / "wandb" / "run_id").read_text().strip()
    wandb_runs = sorted((run / "logs" / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in wandb_runs)

    assert "exists and is not empty" not in resumed.stderr + resumed.stdout
    tags = tb_tags(run)
    assert tags.count("_hparams_/session_start_info") == 1 and "hp_metric" not in tags
    events = EventAccumulator(str(run / "logs" / "tensorboard"))
    events.Reload()
    hparams = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/experiment"])
    # the scalar metrics of make_metrics (a confusion matrix logs none), not a placeholder
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        assert {m.name.tag for m in hparams.experiment.metric_infos} == \
            {name for name in csv.DictReader(f).fieldnames if name.startswith("val_")}
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        windows = [(int(r["step"]), float(r["samples_per_sec"])) for r in csv.DictReader(f) if r["train_loss"]]
    after = next(i for i, (step, _) in enumerate(windows) if step > STEPS)  # the window right after the checkpoint
    speeds = [speed for _, speed in windows]
    assert speeds[after] < 2.5 * max(speeds[:after] + speeds[after + 1:]), speeds


def test_grad_scaler_state_survives_a_checkpoint(tmp_path):
    """16-mixed keeps its loss scale across a resume. Fabric uses a scaler only on CUDA (16-mixed becomes bf16 on
    CPU), so this builds Fabric's 16-mixed plugin on CPU by hand and round-trips it as train.py's state does."""
    from lightning.fabric import Fabric
    from lightning.fabric.plugins import MixedPrecision

    from utils.checkpoint import AtomicCheckpointIO, finish_saves, save_checkpoint

    def fabric_16_mixed():
        return Fabric(accelerator="cpu", devices=1, plugins=[AtomicCheckpointIO(), MixedPrecision("16-mixed", "cpu")])

    saver = fabric_16_mixed()
    scaler = saver.strategy.precision.scaler
    scaler.scale(torch.ones(()))  # the scaler starts lazily, at its first use
    scaler.update(new_scale=1234.0)
    path = save_checkpoint(saver, tmp_path, "epoch-0001-step-00000001.ckpt", {"scaler": scaler})
    finish_saves(saver)  # the file is written in the background
    assert load(path)["scaler"]["scale"] == 1234.0  # weights_only loading opens it
    loader = fabric_16_mixed()
    loader.load(path, {"scaler": loader.strategy.precision.scaler})
    assert loader.strategy.precision.scaler.get_scale() == 1234.0
