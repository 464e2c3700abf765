import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# small, fast, deterministic settings for runs in tests
FAST = ["--accelerator", "cpu", "--epochs", "2", "--logger_name", "csv", "tensorboard"]


def run_script(script: str, *args, cwd=None, env=None, timeout=300, check_rc: int | None = 0):
    """Runs a repo script (train.py, test.py, ...) in a fresh Python process and returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}
    command = [sys.executable, str(REPO / script), *map(str, args)]
    # a session of its own, so that a timeout kills every rank the script started, not only the first
    proc = subprocess.Popen(command, cwd=cwd or REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    if check_rc is not None:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        assert result.returncode == check_rc, f"rc={result.returncode}\n{output}"
    return result


def train(root: Path, *args, **kwargs):
    return run_script("train.py", "--root_dir", root, *FAST, *args, **kwargs)


def only_run(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def checkpoints(run: Path) -> list[Path]:
    from utils.checkpoint import list_checkpoints

    return list_checkpoints(run / "checkpoints")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def assert_one_error_line(result, *needles):
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture
def root(tmp_path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path
