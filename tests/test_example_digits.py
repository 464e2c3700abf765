"""The shipped digits workload's own numbers: what the template reaches on it as shipped. A copy adapted to another
task drops or rewrites these (the GPT's are in test_example_gpt.py); the mechanism tests elsewhere hold for any task."""

import json
import time

import pytest
import torch
from conftest import assert_one_error_line, only_run, run_script

COMPILE = ["--accelerator", "cpu", "--logger_name", "csv", "--compile", "--max_steps", "2"]


@pytest.mark.slow
def test_bare_train_then_test_reaches_095(tmp_path):
    """The README's two commands, bare, from a fresh folder: python train.py, then python test.py."""
    start = time.perf_counter()
    result = run_script("train.py", cwd=tmp_path)
    seconds = time.perf_counter() - start
    run = only_run(tmp_path / "runs")
    assert run.name.endswith("-train_out") and len(run.name) == len("YYYYmmdd-HHMMSS-train_out")
    out = run_script("test.py", "--out_dir", run, cwd=tmp_path).stdout
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["samples"] == 270 and metrics["acc"] >= 0.95, metrics
    assert f"test acc {metrics['acc']:.4f}" in out
    print(f"bare train.py took {seconds:.1f} s; test acc {metrics['acc']:.4f}")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not torch.__version__.startswith("2.13.0"), reason="the inductor bug was seen in torch 2.13.0")
def test_the_real_inductor_bug_on_the_default_cnn_is_caught(tmp_path):
    """torch 2.13.0's inductor zeroes a convolution's gradient of the default CNN on CPU, with a right forward."""
    result = run_script("train.py", "--root_dir", tmp_path, *COMPILE, check_rc=2)
    assert_one_error_line(result, "compile=True: the compiled model's gradient of", "differs from eager mode's by 1 ",
                          "--compile false", "--compile_check false")
    assert list(tmp_path.iterdir()) == []  # no run folder, no checkpoint
