"""Run folders, resume and evaluation that a user cannot trip over: what --resume auto continues, one writer per
run folder, config.yaml as a record, settings changed on resume, branches, and a test.py that only reads."""

import csv
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, assert_one_error_line, checkpoints, load, only_run, run_script, workload

from utils import run_dir as run_dir_module
from utils.checkpoint import checkpoint_name, model_mismatch

pytestmark = pytest.mark.slow
ARGS = ["--accelerator", "cpu", "--epochs", "2", "--logger_name", "csv", "--lr_schedule", "constant"]
STEPS = workload().steps_per_epoch  # optimizer steps per epoch (19 for the digits)


def train(root, *args, driver=False, **kwargs):
    return run_script("tests/fault_driver.py" if driver else "train.py", "--root_dir", root, *ARGS, *args, **kwargs)


def runs(root):
    return sorted(p for p in root.iterdir() if p.is_dir())


def snapshot(run):
    """Every file of a run folder (but the lock) with its bytes: to show that nothing changed."""
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def csv_rows(run):
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run (checkpoints at the end of each epoch)."""
    root = tmp_path_factory.mktemp("finished")
    train(root)
    return only_run(root)


def copy_run(run, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(run.parent, root)
    return only_run(root)


# -- what --resume auto continues ------------------------------------------------------------------------------------

def test_auto_never_continues_a_finished_run_and_skips_runs_without_a_checkpoint(tmp_path):
    root = tmp_path / "runs"
    train(root, driver=True, env={"FAULT": "sigusr1", "FAULT_AT_FORWARD": str(STEPS // 2 + 1)},
          check_rc=143)  # unfinished
    train(root, "--epochs", "1")  # finished
    result = train(root, "--base_lr", "1e30", check_rc=1)  # dies before its first checkpoint
    assert "loss is" in result.stderr
    unfinished, done, died = runs(root)
    assert checkpoints(died) == []
    # a checkpoint made before runs recorded `finished` counts as finished when it is at the last step
    legacy = checkpoints(done)[-1]
    state = load(legacy)
    del state["finished"]
    torch.save(state, legacy)
    before = snapshot(done)

    result = train(root, "--resume", "auto", "--dropout", "0.3")
    assert f"resumed from {unfinished}/checkpoints/" in result.stdout and f"at step {STEPS // 2 + 1}" in result.stdout
    assert snapshot(done) == before  # the finished run is untouched, its config.yaml included
    assert load(checkpoints(unfinished)[-1])["global_step"] == 2 * STEPS

    result = train(root, "--resume", "auto", "--epochs", "1")  # everything finished: a new run
    assert len(runs(root)) == 4 and "resumed from" not in result.stdout
    assert snapshot(done) == before


def test_naming_a_finished_run_trains_nothing_and_changes_nothing(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    result = train(run.parent, "--resume", run)
    assert f"run {run} finished at step {2 * STEPS}; nothing to train: raise --epochs" in result.stdout
    assert snapshot(run) == before


def slurm_env(job, name="train"):
    return {"SLURM_JOB_ID": job, "SLURM_JOB_NAME": name, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
            "SLURM_NNODES": "1"}


def test_slurm_batch_jobs_continue_their_own_run(tmp_path):
    """A requeued job (same job id) continues the run it started, not a newer one of another job; a finished one
    says so and exits 0; an interactive allocation behaves as outside SLURM."""
    root = tmp_path / "runs"
    stop = {"FAULT": "sigusr1", "FAULT_AT_FORWARD": str(STEPS - 1)}
    train(root, "--resume", "auto", "--log_per_epoch", "1", driver=True, env={**slurm_env("101"), **stop},
          check_rc=143)
    train(root, "--resume", "auto", driver=True, env={**slurm_env("102"), **stop}, check_rc=143)
    first, second = runs(root)
    assert (first / "slurm_job_id").read_text().strip() == "101"

    result = train(root, "--resume", "auto", env=slurm_env("101"))  # the requeue of job 101
    assert f"resumed from {first}/checkpoints/" in result.stdout
    assert load(checkpoints(first)[-1])["global_step"] == 2 * STEPS
    assert load(checkpoints(second)[-1])["global_step"] == STEPS - 1
    # throughput right after a resume counts the steps of this process only: the window logged at the end of epoch 1
    # holds all but one step of the stopped process and 1 of this one
    speed = {int(r["step"]): float(r["samples_per_sec"]) for r in csv_rows(first)}
    assert speed[STEPS] < 2 * speed[2 * STEPS], speed
    result = train(root, "--resume", "auto", env=slurm_env("101"))  # requeued again after it finished
    assert f"run {first} finished at step {2 * STEPS}; nothing to train" in result.stdout

    result = train(root, "--resume", "auto", "--epochs", "1", env=slurm_env("103"))  # another job: its own run
    assert len(runs(root)) == 3 and "resumed from" not in result.stdout
    result = train(root, "--resume", "auto", env=slurm_env("104", name="interactive"))  # as outside SLURM
    assert f"resumed from {second}/checkpoints/" in result.stdout


# -- one writer per run folder ---------------------------------------------------------------------------------------

def start(root, *args):
    command = [sys.executable, str(REPO / "train.py"), "--root_dir", str(root), *ARGS, *map(str, args)]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WANDB_MODE": "offline"})


def wait_for_checkpoint(root, proc, seen=()):
    """Waits until `proc` has written a checkpoint not in `seen`: then it is in its loop, with its signal handlers."""
    deadline = time.time() + 120
    while not set(root.glob("*/checkpoints/*.ckpt")) - set(seen):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


def test_one_writer_per_run_folder_and_test_py_on_a_live_run(tmp_path):
    root = tmp_path / "runs"
    live = start(root, "--epochs", "1000", "--checkpoint_frequency", "1")
    wait_for_checkpoint(root, live)
    run = only_run(root)

    result = train(root, "--resume", run, check_rc=2)  # refused: a live job holds the folder
    assert_one_error_line(result, f"resume='{run}'", "is in use by pid", str(live.pid))
    result = train(root, "--resume", "auto", "--epochs", "1")  # auto skips it and starts a new run
    assert "resumed from" not in result.stdout and len(runs(root)) == 2

    live.send_signal(signal.SIGKILL)  # a killed job's lock never blocks a resume
    live.wait()
    seen = list(root.glob("*/checkpoints/*.ckpt"))
    resumed = start(root, "--resume", run, "--epochs", "1000", "--checkpoint_frequency", "1")
    wait_for_checkpoint(root, resumed, seen)  # before that a SIGTERM would find no handler yet, and simply kill it
    evaluations = 0
    while resumed.poll() is None and evaluations < 2:  # test.py while the trainer saves every ~0.3 s
        run_script("test.py", "--out_dir", run)
        evaluations += 1
    assert resumed.poll() is None, resumed.communicate()  # test.py did not break the trainer
    resumed.send_signal(signal.SIGTERM)
    _, stderr = resumed.communicate(timeout=60)
    assert resumed.returncode == 143 and "Traceback" not in stderr, stderr


def test_lock_on_a_file_system_without_locks_warns_once_and_goes_on(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_dir_module.fcntl, "flock", no_locks)
    run_dir_module.lock_run_dir(tmp_path)
    err = capsys.readouterr().err
    assert err.count("warning: cannot lock") == 1 and "No locks available" in err


def test_lock_is_held_for_the_life_of_the_process(tmp_path):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from utils.run_dir import lock_run_dir; "
            "from pathlib import Path; lock_run_dir(Path(sys.argv[2])); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_dir_module.is_locked(tmp_path)
        with pytest.raises(run_dir_module.RunInUse, match=f"pid {holder.pid}"):
            run_dir_module.lock_run_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert not run_dir_module.is_locked(tmp_path)


# -- config.yaml is a record; settings changed on resume; branches ---------------------------------------------------

def test_resume_from_an_earlier_checkpoint_with_new_settings(finished, tmp_path):
    """A branch from the epoch-1 checkpoint with a new base_lr and more epochs: the newer checkpoint is moved aside,
    the new lr is what the optimizer uses and what is logged and recorded, config.yaml stays as first written, and
    test.py evaluates the new branch."""
    run = copy_run(finished, tmp_path)
    config_before = (run / "config.yaml").read_bytes()
    first = checkpoints(run)[0]
    result = train(run.parent, "--resume", first, "--epochs", "3", "--base_lr", "0.004", "--weight_decay", "0.05",
                   "--beta2", "0.99")
    assert "resuming from an earlier checkpoint starts a branch" in result.stdout and "peak lr 0.004" in result.stdout
    abandoned = list((run / "checkpoints").glob(f"abandoned-*/{checkpoint_name(2, 2 * STEPS)}"))
    assert len(abandoned) == 1 and load(abandoned[0])["global_step"] == 2 * STEPS  # moved, not deleted
    assert load(abandoned[0].parent / "best.ckpt")["global_step"] == 2 * STEPS  # the old branch's best went along
    assert [load(p)["global_step"] for p in checkpoints(run)] == [STEPS, 2 * STEPS, 3 * STEPS]
    decay, no_decay = load(checkpoints(run)[-1])["optimizer"]["param_groups"]
    assert (decay["lr"], decay["weight_decay"], decay["betas"]) == (0.004, 0.05, (0.9, 0.99))
    assert (no_decay["weight_decay"], no_decay["betas"]) == (0.0, (0.9, 0.99))

    rows = csv_rows(run)
    assert [int(r["step"]) for r in rows] == sorted({int(r["step"]) for r in rows})  # each step once
    assert {float(r["lr"]) for r in rows if int(r["step"]) <= STEPS} == {0.002}
    assert {float(r["lr"]) for r in rows if int(r["step"]) > STEPS} == {0.004}

    assert (run / "config.yaml").read_bytes() == config_before
    (entry,) = yaml.safe_load((run / "resumes.yaml").read_text())
    assert entry["at_step"] == STEPS and entry["from_checkpoint"] == first.name
    assert entry["changed"] == {"root_dir": str(run.parent), "epochs": 3, "base_lr": 0.004,  # the copy moved it
                                "weight_decay": 0.05, "beta2": 0.99}
    assert entry["derived_changed"] == {"lr": 0.004, "total_steps": 3 * STEPS}
    assert "resume" not in yaml.safe_load(config_before)

    result = run_script("test.py", "--out_dir", run, "--checkpoint", "last")
    assert checkpoint_name(3, 3 * STEPS) in result.stdout
    assert load(run / "checkpoints" / "best.ckpt")["global_step"] > STEPS  # the new branch's own best

    result = train(run.parent, "--resume", run, "--epochs", "4", "--seed", "7", check_rc=2)  # would reshuffle
    assert_one_error_line(result, "seed=7", "42")


def test_a_runs_config_yaml_as_config_path_starts_a_new_run(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    legacy = tmp_path / "legacy.yaml"  # what a resumed run's config.yaml said before: resume: RUN
    legacy.write_text((run / "config.yaml").read_text().replace("derived:", f"resume: {run}\nderived:"))
    for path in (run / "config.yaml", legacy):
        result = train(run.parent, "--config_path", path, "--epochs", "1")
        assert "resumed from" not in result.stdout
    assert len(runs(run.parent)) == 3 and snapshot(run) == before


# -- test.py only reads ----------------------------------------------------------------------------------------------

def test_test_py_changes_nothing_in_the_run(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    ckpt_dir = run / "checkpoints"
    (ckpt_dir / f".{checkpoint_name(3, 3 * STEPS)}.tmp").write_bytes(b"a save in progress")
    (ckpt_dir / checkpoint_name(3, 3 * STEPS)).write_bytes(b"not a checkpoint")
    before = snapshot(run)
    result = run_script("test.py", "--out_dir", run, "--checkpoint", "last")
    assert checkpoint_name(2, 2 * STEPS) in result.stdout and "skipped" in result.stderr
    after = snapshot(run)
    assert after.pop(Path("test_metrics.json")) and after.pop(Path("report.png"))  # its own output, nothing else
    assert after == before


def test_test_py_refuses_a_checkpoint_that_does_not_fit(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    state = load(checkpoints(run)[-1])
    first, shape = workload().first_tensor, workload().first_shape
    state["model"][first] = torch.zeros(shape[0] + 1, *shape[1:])
    torch.save(state, checkpoints(run)[-1])
    result = run_script("test.py", "--out_dir", run, "--checkpoint", "last", check_rc=2)
    assert_one_error_line(result, "does not fit the model", f"'{first}' has shape {(shape[0] + 1, *shape[1:])}",
                          str(shape))
    result = run_script("test.py", "--out_dir", run, "--checkpoint", run / "checkpoints" / "nope.ckpt", check_rc=2)
    assert_one_error_line(result, "nope.ckpt does not exist")
    assert not (run / "test_metrics.json").exists()


def test_model_mismatch_names_the_first_difference():
    model = {"a": torch.zeros(2), "b": torch.zeros(3)}
    assert model_mismatch({"a": torch.zeros(2), "b": torch.zeros(3)}, model) is None
    assert model_mismatch({"a": torch.zeros(2)}, model) == "missing key 'b' (1 missing in all)"
    assert model_mismatch({**model, "c": torch.zeros(1)}, model) == "unexpected key 'c' (1 unexpected in all)"
    assert model_mismatch({"a": torch.zeros(2), "b": torch.zeros(4)}, model) == \
        "key 'b' has shape (4,) in the checkpoint and (3,) in the model"


def test_test_py_under_fabric_run(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    fabric_cli = str(Path(sys.executable).parent / "fabric")
    result = subprocess.run([fabric_cli, "run", "--accelerator", "cpu", "--devices", "2", str(REPO / "test.py"),
                             "--out_dir", str(run)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("test loss") == 1 and f"on {workload().test_samples} samples" in result.stdout


# -- memory at scale -------------------------------------------------------------------------------------------------

def probes(path, kind=None):
    """Lines of tests/fault_driver.py's PROBE_LOG, split; only those of one kind if given."""
    lines = [line.split() for line in path.read_text().splitlines()]
    return [line for line in lines if kind is None or line[1] == kind]


def test_evaluation_forwards_at_most_the_training_micro_batch_and_data_is_built_once_per_node(tmp_path):
    log = tmp_path / "probe.log"
    root = tmp_path / "runs"
    train(root, "--devices", "2", "--eff_batch_size", "128", "--micro_batch_size", "16", "--base_batch_size", "128",
          "--epochs", "1", driver=True, env={"PROBE_LOG": str(log), "DATA_SECONDS": "1"})
    assert {int(size) for _, _, size in probes(log, "train")} == {16}
    assert max(int(size) for _, _, size in probes(log, "eval")) <= 16
    (rank0,), (rank1,) = ([line for line in probes(log, "data") if line[0] == rank] for rank in ("0", "1"))
    assert float(rank0[3]) <= float(rank1[2])  # local rank 0 built the data before rank 1 started

    log.unlink()
    run_script("tests/fault_driver.py", "--out_dir", only_run(root), "--devices", "2",
               env={"SCRIPT": "test", "PROBE_LOG": str(log)})
    assert max(int(size) for _, _, size in probes(log, "eval")) <= 16


def test_throughput_counts_training_time_only(tmp_path):
    """A slow validation (0.5 s per batch) at the end of epoch 1 does not lower the throughput logged in epoch 2."""
    train(tmp_path, "--log_per_epoch", "1", driver=True, env={"EVAL_SECONDS": "0.5"})
    speed = {int(r["step"]): float(r["samples_per_sec"]) for r in csv_rows(only_run(tmp_path))}
    assert speed[2 * STEPS] > 0.5 * speed[STEPS], speed


# -- bad input -------------------------------------------------------------------------------------------------------

def test_iterable_datasets_are_refused(tmp_path):
    result = train(tmp_path, driver=True, env={"ITERABLE_DATA": "1"}, check_rc=2)
    assert_one_error_line(result, "datasets must be map-style")
    assert list(tmp_path.iterdir()) == []


def test_resume_of_a_missing_checkpoint_file(finished):
    missing = finished / "checkpoints" / "epoch-0007-step-00000133.ckpt"
    result = train(finished.parent, "--resume", missing, check_rc=2)
    assert_one_error_line(result, f"resume='{missing}'", "no such checkpoint")


def test_torchrun_with_more_processes_than_devices(tmp_path):
    """--devices given on the command line contradicts the launcher (left unset, it follows torchrun's count)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "train.py"),
               "--root_dir", str(tmp_path), "--accelerator", "cpu", "--devices", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "train.py: error:" in line]
    assert len(errors) == 1 and "started 2 processes but devices x num_nodes = 1" in errors[0], result.stderr
    assert list(tmp_path.iterdir()) == []
