"""The guard against miscompiled gradients: --compile is compared once with eager mode before training, and a
compiler that gets the gradients wrong stops the run with one line, exit 2, and nothing written."""

import pytest
import torch
from conftest import assert_one_error_line, only_run, run_script

from utils.compile_check import GRADIENT_FLOOR, gradient_error, tolerance

ARGS = ["--accelerator", "cpu", "--logger_name", "csv", "--compile", "--max_steps", "2"]


def driver(root, *args, backend: str, ranks: str | None = None, check_rc=0):
    env = {"COMPILE_BACKEND": backend, **({"FAULT_RANKS": ranks} if ranks else {})}
    return run_script("tests/fault_driver.py", "--root_dir", root, *ARGS, *args, env=env, check_rc=check_rc)


def test_a_gradient_is_judged_at_the_scale_of_the_largest():
    """A bias gradient that is zero in exact arithmetic (1e-13 one way, 0 the other) passes beside gradients of
    1e-3; a gradient compiled to zero fails (the inductor bug); judged by its own norm alone (the rule of before,
    floor 0) the first fails too: a negative control."""
    largest = torch.tensor(1e-3) * GRADIENT_FLOOR
    zero_in_theory = torch.full((4,), 5e-14)
    assert gradient_error(zero_in_theory, torch.zeros(4), largest) < 1e-6
    assert gradient_error(zero_in_theory, torch.zeros(4), torch.tensor(0.0)) > tolerance("32-true")
    convolution = torch.full((8,), 1e-4)
    assert gradient_error(convolution, torch.zeros(8), largest) == 1
    assert gradient_error(convolution, convolution * 1.0000001, largest) < 1e-3


@pytest.mark.slow
def test_a_wrong_compiler_is_caught_and_every_rank_stops(tmp_path):
    """A backend that halves every gradient, on rank 1 only: both ranks reach the same verdict and exit 2."""
    result = driver(tmp_path, "--devices", "2", backend="half_gradients", ranks="1", check_rc=2)
    assert_one_error_line(result, "compile=True: the compiled model's gradient of", "differs from eager mode's by 0.")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_wrong_compiler_is_caught_under_fsdp2(tmp_path):
    """Under fsdp2 each sharding unit is compiled (torch.compile skips a sharded module's forward, so a whole-model
    compile would compare eager mode with itself): the halved gradients of rank 1 are caught through the sharded
    gradients, and every rank stops."""
    result = driver(tmp_path, "--devices", "2", "--strategy", "fsdp2", backend="half_gradients", ranks="1",
                    check_rc=2)
    assert_one_error_line(result, "compile=True: the compiled model's gradient of", "differs from eager mode's by 0.")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_right_compiler_passes_with_dropout_and_trains(tmp_path):
    """aot_eager compiles the same arithmetic: the check passes (dropout is on: both draw the same masks) and the
    run trains. --compile_check false skips the check even for a wrong compiler."""
    result = driver(tmp_path / "right", "--dropout", "0.3", backend="aot_eager")
    assert "compile check passed" in result.stdout
    assert only_run(tmp_path / "right").joinpath("checkpoints").is_dir()
    result = driver(tmp_path / "skipped", "--compile_check", "false", backend="half_gradients")
    assert "compile check" not in result.stdout
    # at 64-true the check's batch is converted as Fabric's forward converts it (it once met float32 inputs)
    result = driver(tmp_path / "double", "--precision", "64-true", "--max_steps", "1", backend="aot_eager")
    assert "compile check passed" in result.stdout
