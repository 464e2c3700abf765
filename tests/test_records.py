"""The record of every run: a copy of the code, provenance.yaml with versions and git state, the uncommitted diff;
and the report picture test.py draws."""

import math
import shutil
import subprocess
import time

import pytest
import yaml
from conftest import REPO, only_run, run_script, workload

from utils.report import read_series

ARGS = ["--accelerator", "cpu", "--logger_name", "csv", "--max_steps", "3"]


def project_copy(tmp_path, git: bool):
    """The project's files in a new folder, as a fresh git repository with one commit (or no git at all)."""
    repo = tmp_path / "project"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(".*", "runs", "__pycache__", "*.uint16", "docs"))
    if git:
        for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm",
                                                        "start"]):
            subprocess.run(["git", *command], cwd=repo, check=True)
    return repo


def train_in(repo, root, *args):
    return run_script("train.py", "--root_dir", root, *ARGS, *args, repo=repo, timeout=120)


def entries(run) -> list[dict]:
    return yaml.safe_load((run / "provenance.yaml").read_text())


@pytest.mark.slow
def test_code_copy_provenance_and_diff_in_a_dirty_git_checkout(tmp_path):
    repo = project_copy(tmp_path, git=True)
    (repo / "train.py").write_text((repo / "train.py").read_text() + "# edit one\n")  # dirty
    (repo / "notes.py").write_text("# a new file git does not ignore\n")
    train_in(repo, tmp_path / "runs", "--max_steps", "2")
    run = only_run(tmp_path / "runs")
    first = entries(run)[0]
    assert first["dirty"] is True and first["code"] == "code" and first["diff"] == "code.diff"
    assert len(first["git_commit"]) == 40 and first["world_size"] == 1 and first["torch"].startswith("2.")
    assert "train.py" in first["command"] and "--max_steps 2" in first["command"]
    assert "+# edit one" in (run / "code.diff").read_text()
    copied = sorted(str(p.relative_to(run / "code")) for p in (run / "code").rglob("*.py"))
    assert "train.py" in copied and "notes.py" in copied and "utils/provenance.py" in copied
    assert not any(name.startswith(("tests/", ".venv")) for name in copied)
    assert (run / "code" / "train.py").read_text().endswith("# edit one\n")
    assert sum(p.stat().st_size for p in (run / "code").rglob("*")) < 600_000  # its source: 0.3 MB

    # a resume with the same code keeps the copy; with other code it gets its own, and says so
    train_in(repo, tmp_path / "runs", "--resume", run, "--max_steps", "3")
    assert entries(run)[1]["code"] == "code" and entries(run)[1]["diff"] == "code.diff" and not list(run.glob("code-*"))
    (repo / "train.py").write_text((repo / "train.py").read_text() + "# edit two\n")
    train_in(repo, tmp_path / "runs", "--resume", run, "--max_steps", "4")
    third = entries(run)[2]
    assert third["code"].startswith("code-") and (run / third["code"] / "train.py").read_text().endswith("# edit two\n")
    assert "+# edit two" in (run / third["diff"]).read_text()
    resumes = yaml.safe_load((run / "resumes.yaml").read_text())
    assert "code" not in resumes[0] and resumes[1]["code"].startswith(third["code"])
    assert (run / "code" / "train.py").read_text().endswith("# edit one\n")  # the first copy stays as it was


@pytest.mark.slow
def test_a_clean_checkout_has_no_diff_and_no_git_still_works(tmp_path):
    repo = project_copy(tmp_path / "clean", git=True)
    train_in(repo, tmp_path / "clean" / "runs")
    run = only_run(tmp_path / "clean" / "runs")
    assert entries(run)[0]["dirty"] is False and not (run / "code.diff").exists()
    repo = project_copy(tmp_path / "plain", git=False)
    train_in(repo, tmp_path / "plain" / "runs")
    run = only_run(tmp_path / "plain" / "runs")
    assert "git_commit" not in entries(run)[0] and (run / "code" / "train.py").is_file()
    assert not list((run / "code").rglob("site-packages"))


@pytest.mark.slow
@pytest.mark.parametrize("git", [True, False], ids=["git checkout, runs not ignored", "plain copy"])
def test_the_code_copy_holds_the_project_alone_however_many_runs_exist(tmp_path, git):
    """Runs inside the project (a root_dir git does not ignore, or a copy without git) and a virtual environment
    there: each run's code/ holds the same files, none from a run folder or the venv, and a resume with unchanged
    code finds it unchanged."""
    repo = project_copy(tmp_path, git=git)
    (repo / "venv" / "lib").mkdir(parents=True)
    (repo / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (repo / "venv" / "lib" / "site.py").write_text("# a virtual environment's file\n")
    for _ in range(3):
        train_in(repo, "experiments", "--max_steps", "1")
    runs = sorted((repo / "experiments").iterdir())
    copies = [sorted(str(p.relative_to(run / "code")) for p in (run / "code").rglob("*.py")) for run in runs]
    assert len(runs) == 3 and copies[0] == copies[1] == copies[2]
    assert "train.py" in copies[0] and not [name for name in copies[0] if name.startswith(("experiments", "venv"))]
    train_in(repo, "experiments", "--resume", runs[0], "--max_steps", "2")
    assert entries(runs[0])[1]["code"] == "code" and not list(runs[0].glob("code-*"))  # unchanged code


def test_record_provenance_copies_the_code_and_prints_its_cost(tmp_path):
    """The cost is printed, not asserted (timings are measured, never tested): 21 to 37 ms here."""
    import torch

    from utils.provenance import record_provenance

    started = time.perf_counter()
    record_provenance(tmp_path, 1, 1, torch.device("cpu"))
    print(f"record_provenance: {time.perf_counter() - started:.3f} s")
    assert (tmp_path / "code" / "train.py").is_file()


@pytest.mark.slow
def test_report_png_from_test_py_and_a_note_without_csv(tmp_path):
    root = tmp_path / "runs"
    args = ["--root_dir", root, "--accelerator", "cpu", "--logger_name", "csv", "--lr_schedule", "constant"]
    run_script("train.py", *args, "--epochs", "1")
    run = only_run(root)
    run_script("train.py", *args, "--epochs", "2", "--resume", run)  # continued: one curve
    result = run_script("test.py", "--out_dir", run)
    assert f"report: {run / 'report.png'}" in result.stdout
    png = (run / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    series = read_series(run / "logs" / "csv" / "metrics.csv")
    assert {"train_loss", "val_loss", "lr"} | set(workload().metrics) - {"val_confusion"} <= set(series)
    steps = workload().steps_per_epoch  # 4 log windows per epoch, each ending by the epoch's end (the digits: 5, 10,
    windows = sorted({epoch * steps + math.ceil(k * steps / 4) for epoch in (0, 1) for k in (1, 2, 3, 4)})  # 15, 19)
    assert series["train_loss"][0] == windows and series["val_loss"][0] == [steps, 2 * steps]

    bare = tmp_path / "bare"
    run_script("train.py", "--root_dir", bare, "--accelerator", "cpu", "--max_steps", "2", "--logger_name",
               "tensorboard")
    result = run_script("test.py", "--out_dir", only_run(bare))
    assert "no report:" in result.stdout and "csv" in result.stdout and not (only_run(bare) / "report.png").exists()
