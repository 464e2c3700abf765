"""Sharded training (--strategy fsdp2: FSDP2's fully_shard through Fabric's ModelParallelStrategy) on 2 CPU processes:
exact resume after kill -9, the same weights as DDP, damaged and failed sharded saves, checkpoints that cross
between DDP and FSDP2, readers on 1 process, and the GPT with a Ctrl-C save, retention, sample.py and init_from."""

import os
import shutil
import subprocess

import pytest
import torch
from conftest import assert_one_error_line, checkpoints, load, only_run, run_script, train, workload
from test_crash import small_disk
from test_example_gpt import TINY
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from utils.checkpoint import checkpoint_name

pytestmark = pytest.mark.slow
FSDP2 = ["--devices", "2", "--strategy", "fsdp2"]
STEPS = workload().steps_per_epoch  # optimizer steps per epoch (19 for the digits)
DOUBLE = ["--devices", "2", "--precision", "64-true", "--dropout", "0"]


def load_any(path, tmp_path) -> dict:
    """A checkpoint file, or a folder of shards joined into one state (model, optimizer and meta.pt's entries)."""
    if not path.is_dir():
        return load(path)
    joined = tmp_path / f"{path.name}.joined"
    dcp_to_torch_save(path, joined)
    return {**load(joined), **load(path / "meta.pt")}


def flat(tree, prefix="") -> dict:
    """Nested dicts and lists as {path: leaf}."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {prefix: tree}
    return {k: v for key, value in items for k, v in flat(value, f"{prefix}/{key}").items()}


def bit_identical(a: dict, b: dict) -> bool:
    """The same step, and every tensor and number of the model and optimizer state equal, bit for bit."""
    if a["global_step"] != b["global_step"]:
        return False
    a, b = flat({k: a[k] for k in ("model", "optimizer")}), flat({k: b[k] for k in ("model", "optimizer")})
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def weight_gap(a: dict, b: dict) -> float:
    assert a["model"].keys() == b["model"].keys()
    return max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])


# -- exact resume after kill -9 ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A straight fsdp2 run (32-true, dropout 0.1) and the same run killed with SIGKILL on both ranks mid-epoch 2,
    after the epoch-1 checkpoint."""
    root = tmp_path_factory.mktemp("killed")
    train(root / "straight", *FSDP2)
    run_script("tests/fault_driver.py", "--root_dir", root / "killed", "--accelerator", "cpu", "--epochs", "2",
               "--logger_name", "csv", "tensorboard", *FSDP2,
               env={"FAULT": "sigkill", "FAULT_AT_FORWARD": str(STEPS + STEPS // 2)},
               check_rc=-9)
    return root


@pytest.mark.parametrize("part", ["none", "rng"])
def test_kill_9_then_resume_is_bit_identical(killed, tmp_path, part):
    """Model and optimizer state end bit-identical to the straight run. Negative control: without restoring the
    random state (dropout masks) they differ."""
    shutil.copytree(killed / "killed", tmp_path / "killed")
    run = only_run(tmp_path / "killed")
    assert [p.name for p in checkpoints(run)] == [checkpoint_name(1, STEPS)] and checkpoints(run)[0].is_dir()
    (run / "checkpoints" / f".{checkpoint_name(2, 2 * STEPS)}.tmp").mkdir()  # what a kill mid-save leaves
    result = run_script("tests/fault_driver.py", "--root_dir", tmp_path / "killed", "--accelerator", "cpu",
                        "--epochs", "2", "--logger_name", "csv", "tensorboard", *FSDP2, "--resume", "auto",
                        env={"BREAK": part} if part != "none" else None)
    assert f"at step {STEPS}" in result.stdout
    assert not list((run / "checkpoints").glob(".*.tmp"))
    straight = load_any(checkpoints(only_run(killed / "straight"))[-1], tmp_path)
    resumed = load_any(checkpoints(run)[-1], tmp_path)
    assert resumed["global_step"] == straight["global_step"] == 2 * STEPS
    assert bit_identical(resumed, straight) == (part == "none")


# -- the same training as DDP, and checkpoints that cross between them ------------------------------------------------

@pytest.fixture(scope="module")
def double(tmp_path_factory):
    """The same 2-epoch run at 64-true without dropout under ddp and under fsdp2 (a checkpoint each epoch)."""
    root = tmp_path_factory.mktemp("double")
    train(root / "ddp", *DOUBLE, "--strategy", "ddp")
    train(root / "fsdp2", *DOUBLE, "--strategy", "fsdp2")
    return root


def test_fsdp2_trains_as_ddp_does(double, tmp_path):
    """The same final weights within 1e-12. Negative control: ranks that start from their own initial weights (which
    DDP would overwrite with rank 0's, and FSDP2 does not) end elsewhere."""
    ddp, fsdp2 = (checkpoints(only_run(double / name)) for name in ("ddp", "fsdp2"))
    assert all(p.is_file() for p in ddp) and all(p.is_dir() for p in fsdp2)
    assert (only_run(double / "fsdp2") / "checkpoints" / "best.ckpt").is_dir()
    assert weight_gap(load_any(ddp[-1], tmp_path), load_any(fsdp2[-1], tmp_path)) < 1e-12
    run_script("tests/fault_driver.py", "--root_dir", tmp_path / "mixed", "--accelerator", "cpu", "--epochs", "2",
               "--logger_name", "csv", *DOUBLE, "--strategy", "fsdp2", env={"BREAK": "same_init"})
    mixed = checkpoints(only_run(tmp_path / "mixed"))[-1]
    assert weight_gap(load_any(ddp[-1], tmp_path), load_any(mixed, tmp_path)) > 1e-3


@pytest.mark.parametrize("source, strategy", [("ddp", "fsdp2"), ("fsdp2", "ddp")])
def test_a_checkpoint_resumes_under_the_other_strategy(double, tmp_path, source, strategy):
    """The epoch-1 checkpoint of one strategy, resumed under the other, ends where the straight run ended (and
    best.ckpt, a file or a folder of shards, is replaced by the new kind)."""
    shutil.copytree(double / source, tmp_path / source)
    run = only_run(tmp_path / source)
    first = checkpoints(run)[0]
    result = train(run.parent, *DOUBLE, "--strategy", strategy, "--resume", first)
    assert f"at step {STEPS}" in result.stdout
    resumed = load_any(checkpoints(run)[-1], tmp_path)
    assert checkpoints(run)[-1].is_dir() == (strategy == "fsdp2")
    assert weight_gap(resumed, load_any(checkpoints(only_run(double / source))[-1], tmp_path)) < 1e-12
    assert (run / "checkpoints" / "best.ckpt").is_dir() == (strategy == "fsdp2")


def test_test_py_reads_shards_on_one_process(double):
    """test.py on 1 process (no strategy) scores the sharded run as the DDP run (test.py on 2 fsdp2 processes: see
    the GPT test below)."""
    scores = []
    for name in ("fsdp2", "ddp"):
        result = run_script("test.py", "--out_dir", only_run(double / name), "--accelerator", "cpu", "--devices", "1",
                            "--strategy", "auto")
        assert f"on {workload().test_samples} samples" in result.stdout and "report:" in result.stdout
        scores.append(result.stdout.split("test loss ")[1].split(" on ")[0])
    assert scores[0] == scores[1], scores


# -- damaged and failed sharded checkpoints ---------------------------------------------------------------------------

def test_damaged_shards_are_moved_aside_and_the_resume_falls_back(double, tmp_path):
    """Copies of the last checkpoint under later names, each damaged one way: all four are reported and moved aside;
    the resume continues from the last (at the end of epoch 2)."""
    shutil.copytree(double / "fsdp2", tmp_path / "runs")
    run = only_run(tmp_path / "runs")
    last = checkpoints(run)[-1]
    ways = [("__1_0.distcp", "truncate"), ("__0_0.distcp", "remove"), (".metadata", "remove"), ("meta.pt", "remove")]
    damage = dict(zip(range(2 * STEPS + 1, 2 * STEPS + 5), ways, strict=True))  # later names than the last
    for step, (name, how) in damage.items():
        copy = last.with_name(f"epoch-0002-step-{step:08d}.ckpt")
        shutil.copytree(last, copy)
        if how == "remove":
            (copy / name).unlink()
        else:
            os.truncate(copy / name, (copy / name).stat().st_size // 2)
    result = train(run.parent, *DOUBLE, "--strategy", "fsdp2", "--resume", run, "--epochs", "3")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 4 and all("moved aside" in line for line in warnings)
    assert "shard __1_0.distcp is truncated" in warnings[3] and "shard __0_0.distcp is missing" in warnings[2]
    assert ".metadata" in warnings[1] and "meta.pt" in warnings[0]
    assert "Traceback" not in result.stderr and f"at step {2 * STEPS}" in result.stdout
    assert sorted(p.name for p in (run / "checkpoints").glob("*.corrupt")) == [
        f"epoch-0002-step-{step:08d}.ckpt.corrupt" for step in damage]
    assert load_any(checkpoints(run)[-1], tmp_path)["global_step"] == 3 * STEPS


def test_disk_full_during_a_sharded_save(tmp_path):
    """A real ENOSPC while the shards are written: one line, exit 1, the earlier checkpoint intact and no temporary
    folder left."""
    disk = tmp_path / "disk"
    if not small_disk(disk, 16):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        root = disk / "runs"
        train(root, *FSDP2, "--epochs", "1")
        run = only_run(root)
        stat = os.statvfs(disk)
        shard = max(path.stat().st_size for path in checkpoints(run)[0].glob("*.distcp"))
        leave = min(600_000, shard // 2 + 12_288)  # less than one shard, room for the small files a resume writes
        (disk / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - leave))
        result = train(root, *FSDP2, "--resume", run, "--epochs", "2", check_rc=1)
        assert_one_error_line(result, "could not save checkpoint", "MB free on its disk")
        # the first save of epoch 2 fails: best.ckpt if the validation improved, else the epoch checkpoint
        assert "best.ckpt" in result.stderr or checkpoint_name(2, 2 * STEPS) in result.stderr
        free = float(result.stderr.split(" MB free")[0].rsplit("(", 1)[1])
        assert free < leave / 1e6  # what the filler left
        assert [p.name for p in checkpoints(run)] == [checkpoint_name(1, STEPS)]
        assert load(checkpoints(run)[0] / "meta.pt")["global_step"] == STEPS
        assert load(run / "checkpoints" / "best.ckpt" / "meta.pt")["global_step"] == STEPS
        assert not list((run / "checkpoints").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)])


# -- the GPT ----------------------------------------------------------------------------------------------------------

@pytest.mark.example  # the GPT workload's own blocks as sharding units
def test_gpt_under_fsdp2_saves_on_ctrl_c_resumes_and_is_read_on_one_process(tmp_path):
    """The GPT preset (shrunk) sharded per block: Ctrl-C in step 5, a log step where the processes vote, saves and
    exits 130; the resume ends bit-identical to a straight run; retention keeps 2 folders; sample.py and init_from
    read the shards on 1 process."""
    args = [*TINY, *FSDP2, "--max_steps", "8", "--warmup_steps", "2", "--val_every_n_steps", "1000",
            "--log_every_n_steps", "5",
            "--checkpoint_every_n_steps", "2", "--num_checkpoint_keep", "2", "--dropout", "0.1"]
    run_script("train.py", "--root_dir", tmp_path / "straight", *args)
    run_script("tests/fault_driver.py", "--root_dir", tmp_path / "stopped", *args, check_rc=130,
               env={"FAULT": "sigint", "FAULT_AT_FORWARD": "5"})
    run = only_run(tmp_path / "stopped")
    assert load(checkpoints(run)[-1] / "meta.pt")["global_step"] == 5
    run_script("train.py", "--root_dir", tmp_path / "stopped", *args, "--resume", run)
    # the 2 newest, and the one this session resumed from (retention spares it)
    assert [p.name for p in checkpoints(run)] == [f"epoch-0000-step-0000000{step}.ckpt" for step in (5, 6, 8)]
    straight = checkpoints(only_run(tmp_path / "straight"))[-1]
    assert bit_identical(load_any(checkpoints(run)[-1], tmp_path), load_any(straight, tmp_path))

    # test.py on 1 process, and on 2 fsdp2 processes one window per forward: 872 on rank 0, 871 on rank 1, yet every
    # forward gathers weights from both ranks (evaluate() has the shorter shard forward once more, uncounted)
    one, two = (run_script("test.py", "--out_dir", run, "--accelerator", "cpu", *hardware).stdout
                for hardware in (["--devices", "1", "--strategy", "auto"], [*FSDP2, "--micro_batch_size", "1"]))
    assert one.split(" on ")[1].split(" samples")[0] == two.split(" on ")[1].split(" samples")[0]
    assert one.split("test loss ")[1].split(" on ")[0] == two.split("test loss ")[1].split(" on ")[0]
    sample = run_script("sample.py", "--out_dir", run, "--prompt", "ROMEO:", "--max_new_tokens", "50")
    assert len(sample.stdout.removesuffix("\n")) == 56
    result = run_script("train.py", "--root_dir", tmp_path / "init", *TINY, "--max_steps", "2", "--warmup_steps", "1",
                        "--init_from", straight, "--val_every_n_steps", "1000")
    assert "init_from" in result.stdout and "missing keys: none; unexpected keys: none" in result.stdout
