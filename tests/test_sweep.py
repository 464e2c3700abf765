"""sweep.py: trials of an Optuna study run as ordinary train.py runs, shared by workers through one journal file;
pruning at validations; a dead worker's trial failed by its successor; and a SLURM job array whose preempted task is
requeued and resumes its trial (tests/test_slurm.py's local cluster)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, assert_one_error_line, run_script
from test_slurm import job_state, slurm, wait_for_end, wait_until  # noqa: F401 (slurm: the cluster fixture)

pytest.importorskip("optuna")
pytestmark = pytest.mark.slow

SPACE = "base_lr: {type: log_float, low: 1.0e-3, high: 1.0e-2}\ndropout: {type: float, low: 0.0, high: 0.3}\n"
TRAIN = ["--accelerator", "cpu", "--epochs", "1", "--logger_name", "csv"]


def sweep(tmp_path, space: str, *args, **kwargs):
    path = tmp_path / f"space-{abs(hash(space))}.yaml"
    path.write_text(space)
    return run_script("sweep.py", "--study", "s", "--space", path, "--root_dir", tmp_path, *TRAIN, *args, **kwargs)


def report(tmp_path) -> dict[int, str]:
    """{trial number: state} from sweep.py --report's table."""
    table = run_script("sweep.py", "--study", "s", "--report", "--root_dir", tmp_path).stdout
    return {int(row.split("|")[1]): row.split("|")[2].strip() for row in table.splitlines()
            if row.startswith("| ") and row.split("|")[1].strip().isdigit()}


def test_two_workers_share_one_study_and_a_failed_run_is_a_failed_trial(tmp_path):
    """2 workers x 2 trials at once on one journal: trials 0-3, each once, each in its own run folder; a run that
    fails (exit 2) is a failed trial and the worker goes on to its next one; the report draws sweep.png."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    command = [sys.executable, str(REPO / "sweep.py"), "--study", "s", "--space", str(space), "--root_dir",
               str(tmp_path), "--trials", "2", "--pruner", "none", *TRAIN]
    workers = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    assert report(tmp_path) == {0: "complete", 1: "complete", 2: "complete", 3: "complete"}
    runs = sorted((tmp_path / "sweeps" / "s").glob("*-s-trial-*"))
    assert [run.name[-4:] for run in runs] == ["0000", "0001", "0002", "0003"]
    assert all((run / "checkpoints" / "best.ckpt").is_file() for run in runs)
    assert sorted(" ".join(outputs).split("trial ")[1:]) == sorted(set(" ".join(outputs).split("trial ")[1:]))

    result = sweep(tmp_path, "warmup_steps: {type: int, low: 100000, high: 100001}\n", "--trials", "2")
    assert result.stdout.count("failed (train.py exit 2)") == 2
    assert list(report(tmp_path).values()).count("fail") == 2
    assert (tmp_path / "sweeps" / "s" / "sweep.png").stat().st_size > 20_000


def test_a_trial_worse_than_the_median_is_pruned_cleanly(tmp_path):
    """3 trials at a good learning rate, then one at a useless one: the pruner stops it at its first validation,
    which saves a checkpoint and pruned.yaml and exits 0; the study records it as pruned."""
    space = "dropout: {type: float, low: 0.0, high: 0.1}\n"
    sweep(tmp_path, space, "--trials", "3", "--epochs", "2", "--base_lr", "0.004")
    result = sweep(tmp_path, space, "--epochs", "2", "--base_lr", "1e-7")
    assert "trial 3: pruned" in result.stdout and "Traceback" not in result.stderr
    run = next((tmp_path / "sweeps" / "s").glob("*-s-trial-0003"))
    pruned = yaml.safe_load((run / "pruned.yaml").read_text())
    assert list((run / "checkpoints").glob("epoch-0001-*.ckpt")) and pruned["step"] < 2 * 20  # at its first epoch
    assert report(tmp_path)[3] == "pruned"


def test_the_trial_of_a_killed_worker_is_failed_by_the_next(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    command = [sys.executable, str(REPO / "sweep.py"), "--study", "s", "--space", str(space), "--root_dir",
               str(tmp_path), *TRAIN, "--epochs", "20"]
    worker = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: list((tmp_path / "sweeps" / "s").glob("*-s-trial-0000/checkpoints/*.ckpt")), 120,
               "first checkpoint", "local worker")
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its train.py, as a lost node would
    worker.wait()
    result = sweep(tmp_path, SPACE)
    assert "trial 0: its worker" in result.stdout and "failed" in result.stdout
    assert report(tmp_path) == {0: "fail", 1: "complete"}


def test_a_slurm_array_task_preempted_by_usr1_is_requeued_and_resumes_its_trial(slurm, tmp_path):  # noqa: F811
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    command = ["sbatch", "--parsable", "--array=0-1", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
               "--cpus-per-task=1", f"--output={tmp_path}/slurm-%A_%a.out", "scripts/sweep.slurm", "--study", "s",
               "--space", str(space), "--root_dir", str(tmp_path), "--pruner", "none", "--accelerator", "cpu",
               "--epochs", "12", "--logger_name", "csv"]
    array = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    task = f"{array}_0"
    wait_until(lambda: len(list((tmp_path / "sweeps" / "s").glob("*/checkpoints/*.ckpt"))) >= 1, 180, "checkpoint",
               task)
    subprocess.run(["scancel", "--signal=USR1", task], check=True)  # as SLURM does ahead of the time limit
    wait_until(lambda: job_state(task).startswith("PENDING"), 120, "requeue", task)
    time.sleep(3)
    wait_until(lambda: subprocess.run(["scontrol", "update", f"jobid={task}", "StartTime=now"],
                                      capture_output=True).returncode == 0, 60, "restart", task)
    for job in (task, f"{array}_1"):
        details = wait_for_end(job, timeout=300)
        assert details["JobState"] == "COMPLETED", details
    assert report(tmp_path) == {0: "complete", 1: "complete"}  # the preempted trial reported once, no third
    log = (tmp_path / f"slurm-{array}_0.out").read_text()
    assert "stopped (train.py exit 143)" in log and "resuming" in log
    resumed = [run for run in (tmp_path / "sweeps" / "s").glob("*-s-trial-*") if (run / "resumes.yaml").is_file()]
    assert len(resumed) == 1


def test_a_bad_space_is_one_line(tmp_path):
    result = sweep(tmp_path, "learning_rate: {type: float, low: 0, high: 1}\n", check_rc=2)
    assert_one_error_line(result, "'learning_rate' is not a setting of train.py")
    sweep(tmp_path, "lr_schedule: {type: categorical, choices: [cosine]}\n", "--epochs", "1")
    result = sweep(tmp_path, "lr_schedule: {type: categorical, choices: [linear]}\n", check_rc=2)
    assert_one_error_line(result, "does not fit study 's'")
    assert report(tmp_path) == {0: "complete", 1: "fail"}
