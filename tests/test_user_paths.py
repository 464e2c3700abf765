"""What a week of ordinary use trips over: values a run must read back, finished step-based runs, stray files among
the checkpoints, checkpoints older than today's state, launchers other than the one a run started under, places that
cannot be written, and what test.py says about the checkpoint it evaluated."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_one_error_line, checkpoints, load, only_run, run_script, workload

from utils.checkpoint import checkpoint_name
from utils.lr_schedule import lr_at

pytestmark = pytest.mark.slow
ARGS = ["--accelerator", "cpu", "--logger_name", "csv"]
STEPS = workload().steps_per_epoch  # optimizer steps per epoch (19 for the digits)


def train(root, *args, **kwargs):
    return run_script("train.py", "--root_dir", root, *ARGS, *args, **kwargs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished epoch, with a comment that starts with '-' and holds non-ASCII text, on an explicit
    --devices 1."""
    root = tmp_path_factory.mktemp("finished")
    train(root, "--epochs", "1", "--devices", "1", "--comment=-v2 \u6e29\u5ea6")
    return only_run(root)


def copy_run(run, tmp_path, name=None):
    copy = tmp_path / "runs" / (name or run.name)
    shutil.copytree(run, copy)
    return copy


def snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_what_a_run_accepted_it_reads_back_and_a_resume_says_what_it_changes(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    assert "comment: -v2 \u6e29\u5ea6\n" in (run / "config.yaml").read_text(encoding="utf-8")  # readable, not \\u
    run_script("test.py", "--out_dir", run)  # the record is not parsed as flags: '-v2' is no flag
    result = train(run.parent, "--resume", run, "--epochs", "2")
    assert "resume changes epochs: 1 -> 2" in result.stdout
    # a finished cosine run, extended: the LR goes back up, and the resume says so before training
    peak = 0.002  # the digits: 0.0002 at step 19 ...; 0.00103 at step 20, then cosine to 0.0002 at step 38
    assert f"learning rate: 0.0002 at step {STEPS} under the run's schedule until now; " \
           f"{lr_at(STEPS + 1, peak, 0, 2 * STEPS, 'cosine', 0.1):.3g} at step {STEPS + 1}, then cosine to 0.0002 " \
           f"at step {2 * STEPS}" in result.stdout
    assert load(checkpoints(run)[-1])["config"]["comment"] == "-v2 \u6e29\u5ea6"


def test_a_step_based_run_is_extended_by_unsetting_max_steps(tmp_path):
    train(tmp_path, "--max_steps", "3")
    run = only_run(tmp_path)
    result = train(tmp_path, "--resume", run, "--epochs", "1")
    assert "finished at step 3; nothing to train: raise --max_steps (or unset it, --max_steps none, to train by " \
           "--epochs)" in result.stdout
    result = train(tmp_path, "--resume", run, "--max_steps", "none", "--epochs", "1")
    assert "resume changes max_steps: 3 -> None" in result.stdout
    assert load(checkpoints(run)[-1])["global_step"] == STEPS


def test_plain_weights_under_a_checkpoints_name_are_skipped_on_resume(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    stray = run / "checkpoints" / checkpoint_name(2, 2 * STEPS)
    torch.save(load(checkpoints(run)[-1])["model"], stray)  # a user's copy of the weights, under a checkpoint's name
    result = train(run.parent, "--resume", run, "--epochs", "2")
    assert f"checkpoint {stray} does not open (CheckpointError: not a checkpoint of this template" in result.stderr
    assert "Traceback" not in result.stderr and f"at step {STEPS}" in result.stdout
    assert (run / "checkpoints" / f"{stray.name}.corrupt").is_file()  # moved aside, not deleted
    assert load(checkpoints(run)[-1])["global_step"] == 2 * STEPS  # the real checkpoint took its place


def test_a_checkpoint_older_than_todays_state(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    last = checkpoints(run)[-1]
    state = load(last)
    # a checkpoint from before early stopping kept its own reference (the best value stands in for it) and before
    # training_step returned other values to log (none were being summed)
    torch.save({k: v for k, v in state.items() if k not in ("stop_reference", "log_extra_sums")}, last)
    train(run.parent, "--resume", run, "--epochs", "2")
    assert load(checkpoints(run)[-1])["stop_reference"] is not None

    # a key that today's state holds (a user added it) and the checkpoint lacks: one line, nothing written
    run = copy_run(finished, tmp_path / "other")
    torch.save({k: v for k, v in state.items() if k != "bad_validations"}, checkpoints(run)[-1])
    before = snapshot(run)
    result = train(run.parent, "--resume", run, "--epochs", "2", check_rc=2)
    assert_one_error_line(result, f"checkpoint {checkpoints(run)[-1]} has no 'bad_validations'",
                          "added to `state` after it was saved")
    assert snapshot(run) == before


def launched(launcher: str, script: str, *args, check_rc: int | None = 0):
    """`fabric run` or torchrun with 2 CPU processes, running a script of the repo."""
    bin_dir = Path(sys.executable).parent
    command = {"fabric": [str(bin_dir / "fabric"), "run", "--accelerator", "cpu", "--devices", "2"],
               "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]}[launcher]
    result = subprocess.run([*command, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    if check_rc is not None:
        assert result.returncode == check_rc, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("launcher", ["fabric", "torchrun"])
def test_a_runs_hardware_settings_yield_to_the_launcher(finished, tmp_path, launcher):
    """A run trained with an explicit --devices 1 is evaluated and resumed on 2 processes that a launcher started;
    only a value given on this command that contradicts the launcher is refused."""
    run = copy_run(finished, tmp_path)
    result = launched(launcher, "test.py", "--out_dir", run)
    assert result.stdout.count("test loss") == 1 and f"on {workload().test_samples} samples" in result.stdout
    result = launched(launcher, "train.py", "--resume", run, "--epochs", "2")
    assert "resuming on world size 2 (was 1)" in result.stdout
    assert load(checkpoints(run)[-1])["global_step"] == 2 * STEPS and load(checkpoints(run)[-1])["world_size"] == 2
    if launcher == "torchrun":
        result = launched(launcher, "test.py", "--out_dir", run, "--devices", "1", check_rc=None)
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if "test.py: error:" in line]
        assert len(errors) == 1 and "started 2 processes but devices x num_nodes = 1" in errors[0], result.stderr


def read_only_copy(run, tmp_path):
    """A read-only bind mount of a copy of the run; skips where this machine cannot mount."""
    source, mounted = copy_run(run, tmp_path / "source"), tmp_path / "mounted"
    mounted.mkdir()
    for command in (["mount", "--bind", source, mounted], ["mount", "-o", "remount,bind,ro", mounted]):
        if subprocess.run(list(map(str, command)), capture_output=True).returncode:
            subprocess.run(["umount", mounted], capture_output=True)
            pytest.skip("no read-only bind mount here (needs root)")
    return mounted


def test_places_that_cannot_be_written_are_one_line_before_any_work(finished, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    result = train(a_file / "runs", check_rc=2)
    assert_one_error_line(result, f"root_dir='{a_file / 'runs'}' cannot be written ({a_file}: not a folder)")

    mounted = read_only_copy(finished, tmp_path)
    try:
        before = snapshot(mounted)
        result = train(tmp_path / "unused", "--resume", mounted, "--epochs", "2", check_rc=2)
        assert_one_error_line(result, f"resume='{mounted}' cannot be written", "Read-only file system")
        result = run_script("test.py", "--out_dir", mounted, check_rc=2)  # refused before the evaluation
        assert_one_error_line(result, f"results_dir='{mounted}' cannot be written", "Read-only file system",
                              "pass --results_dir")
        assert "test loss" not in result.stdout
        elsewhere = tmp_path / "results"
        result = run_script("test.py", "--out_dir", mounted, "--results_dir", elsewhere)
        assert f"metrics: {elsewhere / 'test_metrics.json'}" in result.stdout
        assert f"report: {elsewhere / 'report.png'}" in result.stdout and (elsewhere / "report.png").is_file()
        assert snapshot(mounted) == before
    finally:
        subprocess.run(["umount", mounted], check=True)


def test_test_results_name_their_checkpoint_and_another_runs_checkpoint_writes_apart(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    run_script("test.py", "--out_dir", run)
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["checkpoint"] == str(run / "checkpoints" / "best.ckpt") and metrics["checkpoint_step"] == STEPS
    own = snapshot(run)

    other = copy_run(finished, tmp_path, name="20261130-000000-other")
    first = checkpoints(other)[0]
    result = run_script("test.py", "--out_dir", run, "--checkpoint", first)
    apart = run / "evaluations" / f"{other.name}-{first.stem}"
    assert f"metrics: {apart / 'test_metrics.json'}" in result.stdout and (apart / "report.png").is_file()
    assert json.loads((apart / "test_metrics.json").read_text())["checkpoint"] == str(first)
    after = snapshot(run)
    assert {path: after[path] for path in own} == own  # the run's own results are untouched
