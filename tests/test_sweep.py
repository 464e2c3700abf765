"""sweep.py: trials of an Optuna study run as ordinary train.py runs, shared by workers through one journal file;
failed runs, pruning at validations, a dead worker's trial failed by its successor, a space that does not fit; and a
SLURM job array whose preempted task is requeued and resumes its trial (tests/test_slurm.py's local cluster)."""

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


def worker(tmp_path, space: str, *args) -> list[str]:
    path = tmp_path / f"space-{len(list(tmp_path.glob('space-*')))}.yaml"
    path.write_text(space)
    return [sys.executable, str(REPO / "sweep.py"), "--study", "s", "--space", str(path), "--root_dir", str(tmp_path),
            *TRAIN, *args]


def report(tmp_path) -> dict[int, str]:
    """{trial number: state} from sweep.py --report's table."""
    table = run_script("sweep.py", "--study", "s", "--report", "--root_dir", tmp_path).stdout
    return {int(row.split("|")[1]): row.split("|")[2].strip() for row in table.splitlines()
            if row.startswith("| ") and row.split("|")[1].strip().isdigit()}


def test_one_study_through_parallel_workers_failures_pruning_and_a_killed_worker(tmp_path):
    # 2 workers x 2 trials at once on one journal: trials 0-3, each once, each in its own run folder
    parallel = [subprocess.Popen(worker(tmp_path, SPACE, "--trials", "2", "--pruner", "none"), cwd=REPO,
                                 stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=600)[0] for process in parallel]
    assert [process.returncode for process in parallel] == [0, 0], outputs
    started = [line.split(":")[0] for output in outputs for line in output.splitlines() if "--out_dir" in line]
    assert sorted(started) == [f"trial {n}" for n in range(4)]  # no trial run twice
    runs = list((tmp_path / "sweeps" / "s").glob("*-s-trial-*"))  # named by start time, then trial number
    assert sorted(run.name[-4:] for run in runs) == ["0000", "0001", "0002", "0003"]
    assert all((run / "checkpoints" / "best.ckpt").is_file() for run in runs)

    # a run that fails (exit 2: more warmup than steps) is a failed trial, not retried
    result = subprocess.run(worker(tmp_path, "warmup_steps: {type: int, low: 100000, high: 100001}\n"), cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "trial 4 failed (train.py exit 2)" in result.stdout

    # a useless learning rate is worse than the median at the first validation: pruned there, cleanly
    dropout_only = "dropout: {type: float, low: 0.0, high: 0.3}\n"  # the learning rate fixed by a flag
    result = subprocess.run(worker(tmp_path, dropout_only, "--epochs", "2", "--base_lr", "1e-7"), cwd=REPO,
                            capture_output=True, text=True)
    assert "trial 5: pruned" in result.stdout and "Traceback" not in result.stderr, result.stdout + result.stderr
    run = next((tmp_path / "sweeps" / "s").glob("*-s-trial-0005"))
    assert yaml.safe_load((run / "pruned.yaml").read_text())["step"] == 19  # the end of its first epoch
    assert list((run / "checkpoints").glob("epoch-0001-step-00000019.ckpt"))

    # a worker killed with its train.py leaves trial 6 running: the next worker fails it and goes on
    killed = subprocess.Popen(worker(tmp_path, SPACE, "--epochs", "20", "--pruner", "none"), cwd=REPO,
                              stdout=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: list((tmp_path / "sweeps" / "s").glob("*-s-trial-0006/checkpoints/*.ckpt")), 120,
               "first checkpoint", "local worker")
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    result = subprocess.run(worker(tmp_path, SPACE, "--pruner", "none"), cwd=REPO, capture_output=True, text=True)
    assert "trial 6: its worker" in result.stdout and "trial 7: " in result.stdout

    # a range of another kind than the study's earlier trials had: one line, exit 2, its trial failed
    result = run_script(*worker(tmp_path, "dropout: {type: categorical, choices: [0.1]}\n")[1:], check_rc=2)
    assert_one_error_line(result, "does not fit study 's'")
    assert report(tmp_path) == {0: "complete", 1: "complete", 2: "complete", 3: "complete", 4: "fail", 5: "pruned",
                                6: "fail", 7: "complete", 8: "fail"}
    assert (tmp_path / "sweeps" / "s" / "sweep.png").stat().st_size > 20_000


def test_a_slurm_array_task_preempted_by_usr1_is_requeued_and_resumes_its_trial(slurm, tmp_path):  # noqa: F811
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    command = ["sbatch", "--parsable", "--array=0-1", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
               "--cpus-per-task=1", f"--output={tmp_path}/slurm-%A_%a.out", "scripts/sweep.slurm", "--study", "s",
               "--space", str(space), "--root_dir", str(tmp_path), "--pruner", "none", "--accelerator", "cpu",
               "--epochs", "8", "--logger_name", "csv"]
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


def test_a_space_that_names_no_setting_is_one_line(tmp_path):
    result = run_script(*worker(tmp_path, "learning_rate: {type: float, low: 0, high: 1}\n")[1:], check_rc=2)
    assert_one_error_line(result, "'learning_rate' is not a setting of train.py")
    result = run_script(*worker(tmp_path, "data.n_layer: {type: int, low: 1, high: 2}\n")[1:], check_rc=2)
    assert_one_error_line(result, "'data.n_layer' is not a setting of train.py")  # n_layer is a model setting


def test_a_nested_setting_in_a_space_reaches_train_py_as_its_flag(tmp_path):
    import optuna

    from config import parse_config
    from sweep import load_space, suggest

    path = tmp_path / "space.yaml"
    path.write_text("model.n_layer: {type: int, low: 3, high: 3}\nbase_lr: {type: log_float, low: 0.01, high: 0.01}\n")
    flags = suggest(optuna.create_study().ask(), load_space(path))
    assert flags == ["--model.n_layer=3", "--base_lr=0.01"]
    cfg = parse_config(flags)
    assert (cfg.model.n_layer, cfg.base_lr) == (3, 0.01)
