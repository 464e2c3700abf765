import functools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# small, fast, deterministic settings for runs in tests
FAST = ["--accelerator", "cpu", "--epochs", "2", "--logger_name", "csv", "tensorboard"]


class Zygote:
    """tests/zygote.py: forks each script run from a process that has imported torch and lightning already."""

    def __init__(self):
        self.proc = None

    def run(self, command: list[str], cwd, env: dict, timeout: float, tmp: Path) -> tuple[int, str, str]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-u", str(REPO / "tests" / "zygote.py")], cwd=REPO,
                                         env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        out, err = tmp / "stdout", tmp / "stderr"
        request = {"argv": command[1:], "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            os.killpg(pid, signal.SIGKILL)  # the script and every rank it started
            self.proc.stdout.readline()
            raise subprocess.TimeoutExpired(command, timeout)
        returncode = json.loads(self.proc.stdout.readline())["returncode"]
        return returncode, out.read_text(), err.read_text()


ZYGOTE = Zygote()


def run_script(script: str, *args, cwd=None, env=None, timeout=300, check_rc: int | None = 0, repo: Path = REPO):
    """Runs a script of the repo (train.py, test.py, ...; or of a copy of it) in a fresh process and returns the
    CompletedProcess. The process is forked from tests/zygote.py, which has imported torch and lightning once for the
    whole suite."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}
    command = [sys.executable, str(repo / script), *map(str, args)]
    with tempfile.TemporaryDirectory() as tmp:
        returncode, stdout, stderr = ZYGOTE.run(command, cwd or repo, full_env, timeout, Path(tmp))
    result = subprocess.CompletedProcess(command, returncode, stdout, stderr)
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


def pytest_collection_modifyitems(items):
    """Tests of the shipped workloads' own numbers live in test_example_*.py: marked `example`, so that a copy adapted
    to another task runs the mechanism tests alone with `pytest -m "not example"`."""
    for item in items:
        if item.path.name.startswith("test_example_"):
            item.add_marker(pytest.mark.example)


@functools.cache
def workload() -> SimpleNamespace:
    """What the mechanism tests know of the default workload, read from this copy's own make_datasets, make_model
    and make_metrics, so that they hold for a user's task as for the digits: optimizer steps per epoch at the default
    batch size, the sizes of the splits, the model's tensors and the names of the validation metrics."""
    from config import parse_config
    from data import make_datasets
    from model import make_model
    from train import make_metrics

    cfg = parse_config([])
    train_set, val_set, test_set = make_datasets(cfg)
    weights = make_model(cfg).state_dict()
    name, tensor = next(iter(weights.items()))
    return SimpleNamespace(steps_per_epoch=len(train_set) // cfg.eff_batch_size, val_samples=len(val_set),
                           test_samples=len(test_set), tensors=len(weights), first_tensor=name,
                           first_shape=tuple(tensor.shape), metrics=[f"val_{name}" for name in make_metrics(cfg)])
