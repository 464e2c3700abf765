"""Real multi-process runs over gloo: DDP started by Fabric, two torchrun "nodes" on loopback, test.py on 4 ranks."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, checkpoints, load, max_weight_diff, only_run, run_script, train, workload

pytestmark = pytest.mark.slow
EXACT = ["--precision", "64-true", "--dropout", "0", "--logger_name", "csv"]


def final_weights(root):
    return load(checkpoints(only_run(root))[-1])["model"]


def test_ddp_two_processes_match_one_process(tmp_path):
    """Same eff_batch_size on 1 and 2 processes: same samples per step, same LR, same weights; one folder."""
    train(tmp_path / "one", *EXACT, "--devices", "1")
    result = train(tmp_path / "two", *EXACT, "--devices", "2")
    assert "Starting with 2 processes" in result.stderr + result.stdout
    run = only_run(tmp_path / "two")
    assert yaml.safe_load((run / "config.yaml").read_text())["derived"]["world_size"] == 2
    assert max_weight_diff(final_weights(tmp_path / "one"), final_weights(tmp_path / "two")) < 1e-10
    # negative control: a different effective batch on 2 processes is visibly different
    train(tmp_path / "other", *EXACT, "--devices", "2", "--eff_batch_size", "32", "--base_batch_size", "32")
    assert max_weight_diff(final_weights(tmp_path / "one"), final_weights(tmp_path / "other")) > 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_loopback_make_one_run(tmp_path):
    root, port = tmp_path / "runs", free_port()
    env = {**os.environ, "WANDB_MODE": "offline"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node",
         "1", "--master_addr", "127.0.0.1", "--master_port", str(port), str(REPO / "train.py"), "--root_dir",
         str(root), "--accelerator", "cpu", "--devices", "1", "--num_nodes", "2", "--epochs", "2", *EXACT],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert sum(output.count("done:") for output in outputs) == 1  # printing on global rank 0 only
    run = only_run(root)
    assert yaml.safe_load((run / "config.yaml").read_text())["derived"]["world_size"] == 2
    # two nodes of one process each train exactly like one process
    train(tmp_path / "one", *EXACT, "--devices", "1")
    assert max_weight_diff(final_weights(tmp_path / "one"), final_weights(root)) < 1e-10


def test_test_py_on_four_ranks_counts_each_sample_once(root):
    train(root, "--epochs", "1", "--logger_name", "csv")
    run = only_run(root)
    single = run_script("test.py", "--out_dir", run)
    one = yaml.safe_load((run / "test_metrics.json").read_text())
    run_script("test.py", "--out_dir", run, "--devices", "4")  # the digits' 270: a padding sampler would count 272
    four = yaml.safe_load((run / "test_metrics.json").read_text())
    assert one["samples"] == four["samples"] == workload().test_samples
    assert one.keys() == four.keys()
    for name, value in one.items():  # every metric (a confusion matrix too) the same on 1 and 4 ranks
        assert four[name] == (pytest.approx(value, rel=1e-6, abs=1e-9) if isinstance(value, float) else value), name
    assert single.stdout.count("test loss") == 1


def test_fabric_run_launches_the_same_script(root):
    """Under `fabric run` the processes exist before train.py starts; it must not launch again."""
    fabric_cli = str(Path(sys.executable).parent / "fabric")
    result = subprocess.run([fabric_cli, "run", "--accelerator", "cpu", "--devices", "2", str(REPO / "train.py"),
                             "--root_dir", str(root), "--epochs", "1", "--logger_name", "csv"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert yaml.safe_load((only_run(root) / "config.yaml").read_text())["derived"]["world_size"] == 2
