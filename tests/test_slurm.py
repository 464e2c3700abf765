"""scripts/train.slurm on a real SLURM (a one-node cluster that scripts/local_slurm.sh starts on this machine): one
run folder for the job's 2 tasks, the weights of `train.py --devices 2`, and preemption by a real USR1 that ends in
exit 143, a requeue, a resume and the weights of a run that was never stopped."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, checkpoints, load, only_run, run_script

pytestmark = pytest.mark.slow
SETTINGS = ["--accelerator", "cpu", "--epochs", "12", "--logger_name", "csv"]
# the test's cluster has 2 CPUs and no GPU: given on the command line, so train.slurm stays a real cluster's script
SBATCH = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def slurm():
    """Starts the local cluster (a no-op if it is up); skips where it cannot run here. OMP_NUM_THREADS=1, as on many
    clusters, must not shrink the node (2 tasks would wait for ever)."""
    try:
        result = subprocess.run([REPO / "scripts" / "local_slurm.sh"], capture_output=True, text=True, timeout=600,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    except OSError as err:
        pytest.skip(f"SLURM cannot be started here: {err}")
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"SLURM cannot be started here (no root, or no packages): {reason}")
    assert f" {len(os.sched_getaffinity(0))} CPUs " in result.stdout, result.stdout  # the machine's, not OMP's


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The same settings without SLURM: `python train.py --devices 2`."""
    root = tmp_path_factory.mktemp("straight")
    run_script("train.py", "--root_dir", root, *SETTINGS, "--devices", "2")
    return load(checkpoints(only_run(root))[-1])


def submit(tmp_path, *args) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the job's python is ours
    command = [*SBATCH, f"--output={tmp_path}/slurm-%j.out", "scripts/train.slurm", "--root_dir", tmp_path / "runs",
               *SETTINGS, *args]
    return subprocess.run(list(map(str, command)), cwd=REPO, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def job_state(job: str) -> str:
    """STATE REASON of a job SLURM still lists; '' once it has left the queue."""
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout.strip()


def wait_until(condition, timeout: float, what: str, job: str) -> None:
    """Waits for `condition()`; fails with the job's state after `timeout` seconds (a job the cluster cannot run stays
    pending for ever: the test must fail, not hang)."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"job {job}: no {what} after {timeout:.0f} s (state: {job_state(job) or 'gone'})"
        time.sleep(0.5)


def wait_for_end(job: str, timeout: float = 180) -> dict:
    wait_until(lambda: not job_state(job), timeout, "end", job)
    details = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in details.split() if "=" in field)


def same_weights(a: dict, b: dict) -> bool:
    return a["global_step"] == b["global_step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_sbatch_trains_one_run_with_the_weights_of_train_py(slurm, straight, tmp_path):
    job = wait_for_end(submit(tmp_path))
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
    run = only_run(tmp_path / "runs")  # two tasks, one run folder
    assert (run / "slurm_job_id").read_text().strip() == job["JobId"]
    assert same_weights(load(checkpoints(run)[-1]), straight)


def test_usr1_saves_exits_143_requeues_and_resumes_exactly(slurm, straight, tmp_path):
    job = submit(tmp_path)
    wait_until(lambda: list((tmp_path / "runs").glob("*/checkpoints/*.ckpt")), 120, "checkpoint", job)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # as SLURM does ahead of the time limit
    wait_until(lambda: job_state(job).startswith("PENDING"), 120, "requeue", job)  # train.slurm requeued it
    # SLURM holds a requeued job for about 2 minutes; start it now (refused for a few seconds after the requeue)
    time.sleep(3)
    wait_until(lambda: subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"],
                                      capture_output=True).returncode == 0, 60, "restart", job)
    details = wait_for_end(job)
    assert details["JobState"] == "COMPLETED" and details["Restarts"] == "1", details
    log = (tmp_path / f"slurm-{job}.out").read_text()
    stopped = load(checkpoints(only_run(tmp_path / "runs"))[0])["global_step"]
    assert "stop requested: saved" in log and "Exited with exit code 143" in log  # the first attempt, kept
    assert f"at step {stopped}" in log and "done: " in log  # the requeued attempt resumed and finished
    assert same_weights(load(checkpoints(only_run(tmp_path / "runs"))[-1]), straight)
