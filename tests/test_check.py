"""check.py: a user's own copy checked for the template's promises, passing on the template as shipped and failing,
naming the cause, on a copy that keeps state outside the checkpoint and on one whose loss is not a mean over
samples."""

import subprocess
import sys

import pytest
from test_example_adaptations import adapted_copy

pytestmark = pytest.mark.slow
FLAGS = ["--accelerator", "cpu"]

COUNTER = '''
CALLS = [0]


def training_step(model, batch, cfg):  # the copy's own step, weighted by a counter that a resumed process restarts
    CALLS[0] += 1
    return scaled(users_training_step(model, batch, cfg), 1 + CALLS[0] % 3)
'''

BATCH_STATISTICS = '''
def training_step(model, batch, cfg):  # the copy's own step, weighted by a statistic of the whole micro-batch
    first = torch.utils._pytree.tree_leaves(batch)[0].double()
    return scaled(users_training_step(model, batch, cfg), 1 + first.std(0).mean())
'''


def with_wrapped_step(tmp_path, wrapper: str):
    """A copy of the project (whatever its task) whose training_step wraps the copy's own, renamed."""
    repo = adapted_copy(tmp_path, {})
    text = (repo / "train.py").read_text().replace("\ndef training_step(", "\ndef users_training_step(", 1)
    scaled = '''

def scaled(output, factor):
    return {**output, "loss": output["loss"] * factor} if isinstance(output, dict) else output * factor
'''
    main = text.index("\n\n\ndef main(")
    (repo / "train.py").write_text(text[:main] + scaled + "\n" + wrapper + text[main:])
    return repo


def check(repo, *args):
    return subprocess.run([sys.executable, repo / "check.py", *FLAGS, *args], cwd=repo, capture_output=True,
                          text=True, timeout=600)


def test_the_template_as_shipped_keeps_its_promises(tmp_path):
    result = check(adapted_copy(tmp_path, {}))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("resume") and "holds  bit-identical after a resume at step 5 of 10" in lines[0]
    assert "holds  the same weights for 1 process, accumulation 2, 2 processes" in lines[1]
    assert "skipped: no --compile" in lines[2] and "holds  test loss" in lines[3]
    assert not list(tmp_path.glob("project/runs"))  # its runs went to a temporary folder, removed


def test_a_counter_outside_the_checkpoint_fails_resume(tmp_path):
    result = check(with_wrapped_step(tmp_path, COUNTER), "--only", "resume")
    assert result.returncode == 1
    resume = result.stdout.splitlines()[0]
    assert "FAILS" in resume and "differs after a resume at step 5 of 10" in resume
    assert "state kept outside the checkpoint" in resume


def test_a_loss_over_the_batch_fails_devices_and_accumulation(tmp_path):
    result = check(with_wrapped_step(tmp_path, BATCH_STATISTICS), "--only", "splits")
    assert result.returncode == 1
    resume, splits = result.stdout.splitlines()[:2]
    assert "skipped (--only)" in resume and "FAILS" in splits and "the loss is not a mean over samples" in splits


def test_bad_flags_exit_2(tmp_path):
    repo = adapted_copy(tmp_path, {})
    result = check(repo, "--epochs", "0")
    assert result.returncode == 2 and "epochs=0" in result.stderr
    result = check(repo, "--only", "speed")
    assert result.returncode == 2 and "only=['speed'] is invalid" in result.stderr
