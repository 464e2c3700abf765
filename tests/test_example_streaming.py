"""Streamed training data (litdata) on the GPT workload: the chunks, and exact resume on 1 and 2 processes."""

import collections
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, assert_one_error_line, load, max_weight_diff, only_run, run_script

from config import parse_config
from data import DataError, make_datasets

PRESET = ["--config_path", str(REPO / "configs" / "shakespeare_char.yaml"), "--streaming", "true"]
# a 1-layer, 32-wide GPT on 128-character windows: 7,781 streamed windows, 15 steps of 512 per epoch, 20 steps
RUN = [*PRESET, "--accelerator", "cpu", "--logger_name", "csv", "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
       "--block_size", "128", "--eff_batch_size", "512", "--warmup_steps", "2", "--dropout", "0.1", "--max_steps", "20",
       "--log_every_n_steps", "5", "--val_every_n_steps", "20", "--checkpoint_every_n_steps", "100"]
STEPS_PER_EPOCH, STOP_STEP = 15, 10


def test_streamed_windows_are_the_training_split_in_consecutive_pieces():
    cfg = parse_config([*PRESET, "--block_size", "128"])
    train, val, test = make_datasets(cfg)
    memmap_train, memmap_val, memmap_test = make_datasets(parse_config([*PRESET[:2], "--block_size", "128"]))
    tokens = memmap_train.tokens[: memmap_train.end]
    assert len(tokens) // 129 - 32 <= len(train) <= len(tokens) // 129  # whole windows (of each chunk)
    inputs, targets = train[0]
    assert inputs.dtype == torch.int64 and inputs.shape == (128,) and torch.equal(inputs[1:], targets[:-1])
    windows = {tuple(train[i][0].tolist()) for i in range(0, len(train), 97)}
    starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(tokens, 5) == inputs[:5].numpy(), axis=1))
    assert any(np.array_equal(tokens[s : s + 128], inputs.numpy()) for s in starts)  # a piece of the split
    assert len(windows) == len(range(0, len(train), 97))  # no two alike
    # validation and test are the memmap path's
    assert (len(val), len(test)) == (len(memmap_val), len(memmap_test))
    assert all(torch.equal(a, b) for a, b in zip(val[5], memmap_val[5], strict=True))
    chunks = next(REPO.glob("assets/*-train-chunks"))
    written = (chunks / "index.json").stat().st_mtime_ns
    make_datasets(cfg)
    assert (chunks / "index.json").stat().st_mtime_ns == written  # written once
    with pytest.raises(DataError, match="streaming=True is invalid with dataset='digits'"):
        make_datasets(parse_config(["--streaming", "true"]))


def test_check_py_compares_streamed_runs_over_accumulation_not_processes():
    """litdata deals chunks to ranks: a step of 2 processes holds other samples, which check.py must not call a loss
    that is no mean over samples (it found 0.005 there; accumulation on 1 process agrees to 7e-17, by hand)."""
    import check

    assert check.streams(parse_config(PRESET)) and not check.streams(parse_config(PRESET[:2]))
    assert list(check.splits_to_compare(512, True, streamed=True)) == ["1 process", "accumulation 2"]
    assert list(check.splits_to_compare(512, True, streamed=False)) == ["1 process", "accumulation 2", "2 processes"]


def samples(path) -> list[str]:
    """The training samples a run logged (tests/fault_driver.py SAMPLES_LOG), in order, ranks together."""
    return [line.split()[1] for line in path.read_text().splitlines()]


def last_checkpoint(root) -> dict:
    return load(sorted((only_run(root) / "checkpoints").glob("epoch-*.ckpt"))[-1])


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """A straight 2-process run of 20 steps (an epoch is 15), and the same run stopped by a real SIGUSR1 at step 10,
    both with dropout on and the samples each trained on logged."""
    root = tmp_path_factory.mktemp("streamed")
    args = [*RUN, "--devices", "2"]
    run_script("tests/fault_driver.py", "--root_dir", root / "straight", *args,
               env={"SAMPLES_LOG": str(root / "straight.txt")})
    run_script("tests/fault_driver.py", "--root_dir", root / "stopped", *args, check_rc=143,
               env={"SAMPLES_LOG": str(root / "stopped.txt"), "FAULT": "sigusr1", "FAULT_AT_FORWARD": "7"})
    assert last_checkpoint(root / "stopped")["global_step"] == STOP_STEP
    return root, args


@pytest.mark.slow
@pytest.mark.parametrize("part", ["none", "stream_position"])
def test_a_streamed_run_on_2_processes_resumes_bit_identical(two_processes, tmp_path, part):
    """Resumed on 2 processes mid-epoch and through the next epoch, the run ends bit-identical to the straight one.
    Negative control: a resume that does not restore litdata's position differs."""
    root, args = two_processes
    shutil.copytree(root / "stopped", tmp_path / "stopped")
    run_script("tests/fault_driver.py", "--root_dir", tmp_path / "stopped", *args, "--resume", "auto",
               env={"BREAK": part} if part != "none" else None)
    straight, resumed = last_checkpoint(root / "straight"), last_checkpoint(tmp_path / "stopped")
    assert resumed["global_step"] == straight["global_step"] == 20
    assert (max_weight_diff(straight["model"], resumed["model"]) == 0) == (part == "none")


@pytest.mark.slow
def test_a_streamed_run_resumed_on_1_process_sees_each_sample_of_the_epoch_once(two_processes, tmp_path):
    """Stopped on 2 processes at step 10 and resumed on 1: litdata restripes the rest of the epoch, so the epoch's
    samples are those of the straight run, none twice (the order within steps differs)."""
    root, args = two_processes
    shutil.copytree(root / "stopped", tmp_path / "stopped")
    resumed = run_script("tests/fault_driver.py", "--root_dir", tmp_path / "stopped", *args, "--devices", "1",
                         "--resume", "auto", env={"SAMPLES_LOG": str(tmp_path / "resumed.txt")})
    assert "resuming on world size 1 (was 2)" in resumed.stdout
    per_epoch = STEPS_PER_EPOCH * 512
    straight_epoch = collections.Counter(samples(root / "straight.txt")[:per_epoch])
    resumed_epoch = collections.Counter(samples(root / "stopped.txt") +
                                        samples(tmp_path / "resumed.txt")[: (STEPS_PER_EPOCH - STOP_STEP) * 512])
    assert max(straight_epoch.values()) == 1 and resumed_epoch == straight_epoch
    assert last_checkpoint(tmp_path / "stopped")["global_step"] == 20
    # a resume that changes how the training data is read is refused: one line, exit 2
    refused = run_script("train.py", *args, "--streaming", "false", "--resume", only_run(tmp_path / "stopped"),
                         check_rc=2)
    assert_one_error_line(refused, "training data was streamed (litdata) and this run's is not")


@pytest.mark.slow
def test_a_streamed_run_on_1_process_with_loader_workers_resumes_bit_identical_from_moved_chunks(tmp_path):
    """Chunks in --streaming_dir, moved between the stop and the resume (as to an object store): the same chunks
    resume exactly; other chunks are refused."""
    args = [*RUN, "--num_workers", "2", "--max_steps", "6"]  # the epoch's end: the test above
    make_datasets(parse_config(PRESET))  # the shipped text's chunks (written if this clone has none yet), copied
    shutil.copytree(next(REPO.glob("assets/*-train-chunks")), tmp_path / "chunks")
    chunks = ["--streaming_dir", tmp_path / "chunks"]
    run_script("tests/fault_driver.py", "--root_dir", tmp_path / "straight", *args, *chunks)
    run_script("tests/fault_driver.py", "--root_dir", tmp_path / "stopped", *args, *chunks, check_rc=143,
               env={"FAULT": "sigusr1", "FAULT_AT_FORWARD": "3"})
    (tmp_path / "chunks").rename(tmp_path / "moved")
    shutil.copytree(tmp_path / "stopped", tmp_path / "other")
    run_script("tests/fault_driver.py", "--root_dir", tmp_path / "stopped", *args, "--resume", "auto",
               "--streaming_dir", tmp_path / "moved")
    straight, resumed = last_checkpoint(tmp_path / "straight"), last_checkpoint(tmp_path / "stopped")
    assert resumed["global_step"] == 6 and max_weight_diff(straight["model"], resumed["model"]) == 0
    index = tmp_path / "moved" / "index.json"  # a chunk of another name: other chunks
    index.write_text(index.read_text().replace('"chunk-0-3.bin"', '"chunk-0-3-lost.bin"'))
    refused = run_script("train.py", *args, "--streaming_dir", tmp_path / "moved", "--resume",
                         only_run(tmp_path / "other"), check_rc=2)
    assert_one_error_line(refused, "the checkpoint streamed other chunks")


@pytest.mark.slow
def test_ctrl_c_while_the_chunks_are_written_stops_the_run_with_one_line(tmp_path):
    """litdata.optimize answers Ctrl-C with exit status 0: written in a process of its own, the run says it stopped
    (exit 2, one line), and leaves no chunks, no half-written folder and no run folder."""
    chunks = tmp_path / "chunks"
    run = subprocess.Popen([sys.executable, REPO / "train.py", *RUN, "--streaming_dir", chunks, "--root_dir",
                            tmp_path / "runs"], start_new_session=True, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob(".chunks.*.tmp/chunk-*.bin")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGINT)  # as a terminal does: the whole foreground group
    stderr = run.communicate(timeout=60)[1]
    assert run.returncode == 2
    assert_one_error_line(subprocess.CompletedProcess([], 2, "", stderr), "writing the chunks stopped before they "
                          "were complete (exit status 0, KeyboardInterrupt)")
    assert list(tmp_path.iterdir()) == []
