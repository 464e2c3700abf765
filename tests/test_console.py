"""What a user sees: messages that never split the progress bar in a real (pseudo-)terminal, a bar that does not
flood a log file, rank 0 alone printing, --help as written, and Ctrl-C that saves (once) or stops at once (twice)."""

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
from conftest import REPO, checkpoints, load, only_run, run_script, workload

pytestmark = pytest.mark.slow
ARGS = ["--accelerator", "cpu", "--logger_name", "csv"]


def run_in_terminal(args: list[str], columns: int = 100, env=None) -> str:
    """Runs a script with a pseudo-terminal as stdout and stderr, COLUMNS wide; returns every byte it wrote."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, stdin=follower, stdout=follower,
                            stderr=follower, env={**os.environ, "TERM": "xterm", **(env or {})})
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the script exited and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    return b"".join(chunks).decode(errors="replace")


def screen_lines(raw: str, columns: int) -> list[str]:
    """The lines a terminal COLUMNS wide shows for `raw`: carriage returns overwrite, long lines wrap, escape
    sequences are dropped (a single tqdm bar uses none but colour-free clears)."""
    lines, line, col = [], [], 0
    for char in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw):
        if char == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        elif char == "\r":
            col = 0
        else:
            if col == columns:  # the terminal wraps
                lines.append("".join(line).rstrip())
                line, col = [], 0
            line[col:col + 1] = [char]
            col += 1
    return lines + ["".join(line).rstrip()]


@pytest.mark.parametrize("printer", ["tqdm", "plain print"])
def test_messages_never_split_the_progress_bar_in_a_terminal(tmp_path, printer):
    """Validation lines printed while the bar is open each stand on their own screen line. The control prints them
    with plain print(), as the template once did: then they are glued to the bar and the test sees it."""
    env = {"PLAIN_PRINT": "1"} if printer == "plain print" else None
    raw = run_in_terminal(["tests/fault_driver.py", "--root_dir", tmp_path, *ARGS, "--epochs", "3"], env=env)
    lines = screen_lines(raw, 100)
    messages = [line for line in lines if "val loss" in line]
    message = r"step \d+ \(epoch [\d.]+\): val loss [\d.]+(, val \w+ -?[\d.]+)*"
    whole = [line for line in messages if re.fullmatch(message, line)]
    assert len(messages) == 3
    assert (len(whole) == 3) == (printer == "tqdm"), "\n".join(lines)


def test_a_log_file_gets_a_few_bar_updates_not_a_flood(tmp_path):
    """stderr to a file, as under SLURM or nohup: the bar redraws at most every 30 s and where a message is printed,
    so a 10-epoch run writes about 1.5 kB (ten redraws a second would write about 2 kB per second)."""
    with open(tmp_path / "err.log", "w") as err:
        started = time.perf_counter()
        subprocess.run([sys.executable, REPO / "train.py", "--root_dir", tmp_path / "runs", *ARGS, "--epochs", "10"],
                       cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, check=True)
        seconds = time.perf_counter() - started
    text = (tmp_path / "err.log").read_text()
    bars = text.count("it/s")  # each drawing of the bar shows a rate
    # the first and last drawing, and one after each of the 10 validation lines (printed on stdout)
    assert bars <= 13 and len(text) < 2500, (seconds, len(text), text[-800:])


def test_only_rank_0_prints(tmp_path):
    result = run_script("train.py", "--root_dir", tmp_path, *ARGS, "--devices", "2", "--max_steps", "3")
    output = result.stdout + result.stderr
    assert "[rank: 1]" not in output and "Seed set" not in output and "GLOBAL_RANK: 1" not in output
    assert output.count("run folder ") == 1 and output.count("done: ") == 1


def test_help_shows_the_launch_commands_as_written():
    out = run_script("train.py", "--help").stdout
    assert "    torchrun --nnodes 2 --node_rank R --nproc_per_node 4 --master_addr HOST --master_port 29500 \\\n" \
           "        train.py --devices 4 --num_nodes 2\n" in out


# -- Ctrl-C ---------------------------------------------------------------------------------------------------------

def start(tmp_path, *args, env=None) -> subprocess.Popen:
    """train.py (through the fault driver) in a process group of its own, as a shell runs a foreground job."""
    command = [sys.executable, REPO / "tests" / "fault_driver.py", "--root_dir", tmp_path, *ARGS, *map(str, args)]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})


def wait_for(path, pattern: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and re.search(pattern, path.read_text(), re.MULTILINE):
            return
        time.sleep(0.05)
    raise TimeoutError(pattern)


@pytest.mark.parametrize("devices", [1, 2])
def test_ctrl_c_saves_at_the_next_step_and_exits_130(tmp_path, devices):
    """Ctrl-C in a terminal sends SIGINT to every process of the job: every rank saves at the same step."""
    probe = tmp_path / "probe.log"
    proc = start(tmp_path / "runs", "--devices", devices, "--epochs", "50", env={"PROBE_LOG": str(probe)})
    wait_for(probe, r"^0 train .*\n(.*\n){30}")  # well into training
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    run = only_run(tmp_path / "runs")
    saved = load(checkpoints(run)[-1])
    assert not saved["finished"] and saved["global_step"] >= 1
    assert f"interrupted (Ctrl-C): saved {checkpoints(run)[-1]} at step {saved['global_step']}; continue with: " \
           f"python train.py --resume {run}" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


@pytest.mark.parametrize("devices", [1, 2])
def test_a_second_ctrl_c_stops_at_once_and_keeps_earlier_checkpoints(tmp_path, devices):
    """The first Ctrl-C arrives during a slow validation (the save waits for the step boundary); the second stops
    every rank at once. The checkpoints written before are intact and the run resumes from the newest."""
    probe = tmp_path / "probe.log"
    proc = start(tmp_path / "runs", "--devices", devices, "--epochs", "5",
                 env={"PROBE_LOG": str(probe), "EVAL_SECONDS": "0.5"})
    wait_for(probe, r"^0 eval .*\n(.*\n)*0 train .*\n(.*\n)*0 eval ")  # in the second validation
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert stderr.count("second Ctrl-C: stopped at once, without saving") == 1 and "Traceback" not in stderr
    run = only_run(tmp_path / "runs")
    assert [load(path)["global_step"] for path in checkpoints(run)] == [workload().steps_per_epoch]  # epoch 1's only
    resumed = run_script("train.py", "--root_dir", tmp_path / "runs", *ARGS, "--devices", devices, "--epochs", "2",
                         "--resume", run)
    assert "at step" in resumed.stdout
