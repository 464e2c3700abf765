"""sweep.py: trials of an Optuna study run as ordinary train.py runs, shared by workers through one journal file."""

import subprocess
import sys

import pytest
from conftest import REPO, assert_one_error_line, run_script

pytest.importorskip("optuna")
pytestmark = pytest.mark.slow

SPACE = "base_lr: {type: log_float, low: 1.0e-3, high: 1.0e-2}\ndropout: {type: float, low: 0.0, high: 0.3}\n"


def test_two_workers_share_one_study_and_a_failed_trial_is_failed(tmp_path):
    """2 workers x 2 trials at once on one journal: 4 trials, numbers 0-3, each in its own run folder with its own
    value; a space that makes train.py fail gives a failed trial, and the worker goes on to its next one."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    flags = ["--study", "s", "--space", space, "--root_dir", tmp_path, "--accelerator", "cpu", "--epochs", "1",
             "--logger_name", "csv"]
    workers = [subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *map(str, flags), "--trials", "2"],
                                cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    table = run_script("sweep.py", "--study", "s", "--report", "--root_dir", tmp_path).stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and "complete" in line]
    assert sorted(int(row.split("|")[1]) for row in rows) == [0, 1, 2, 3], table
    runs = sorted((tmp_path / "sweeps" / "s").glob("*-s-trial-*"))
    assert [run.name[-4:] for run in runs] == ["0000", "0001", "0002", "0003"]
    assert all((run / "checkpoints" / "best.ckpt").is_file() for run in runs)
    assert "best: trial" in table

    bad = tmp_path / "bad.yaml"
    bad.write_text("warmup_steps: {type: int, low: 100000, high: 100001}\n")  # more than the run's steps: exit 2
    result = run_script("sweep.py", *flags[:2], "--space", bad, *flags[4:], "--trials", "2")
    assert result.stdout.count("failed (train.py exit 2)") == 2
    table = run_script("sweep.py", "--study", "s", "--report", "--root_dir", tmp_path).stdout
    assert table.count("| fail |") == 2


def test_a_bad_space_is_one_line(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: {type: float, low: 0, high: 1}\n")
    result = run_script("sweep.py", "--study", "s", "--space", space, "--root_dir", tmp_path, check_rc=2)
    assert_one_error_line(result, "'learning_rate' is not a setting of train.py")
