"""What code produced a run. At each start (the first and every resume) rank 0 appends an entry to RUN/provenance.yaml:
the command, time, host, devices, versions, and the git commit with a dirty flag. The project's Python files (nothing
under any run folder or virtual environment) are copied to RUN/code/ at the first start; a resume whose files differ
keeps its own copy beside it (code-<stamp>/). A dirty tree's uncommitted diff goes to RUN/code.diff
(code-<stamp>.diff on a resume)."""

import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import lightning
import torch

from utils.checkpoint import read_yaml_file, write_text_atomically, write_yaml_atomically
from utils.run_dir import LOCK

PROJECT = Path(__file__).resolve().parents[1]
PROVENANCE = "provenance.yaml"


def _git(*args: str) -> str | None:
    """Output of a git command in the project; None outside a git checkout or without git."""
    try:
        result = subprocess.run(["git", *args], cwd=PROJECT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def _outside_the_code(folder: Path, root_dir: Path) -> bool:
    """Whether a folder holds no project code: hidden or __pycache__, the runs' root folder, any run folder (it holds a
    lock or a provenance record, whatever root it was made under), or a virtual environment."""
    return (folder.name.startswith((".", "__pycache__")) or folder == root_dir or (folder / LOCK).exists()
            or (folder / PROVENANCE).exists() or (folder / "pyvenv.cfg").exists())


def project_files(root_dir: Path) -> list[Path]:
    """The project's own Python files, relative to it, but the tests and anything under a folder that holds no
    project code (see _outside_the_code): in a git checkout the tracked ones and the new ones git does not ignore;
    elsewhere every .py. What runs exist, and whether git ignores them, changes nothing."""
    root_dir = root_dir.resolve()
    listed = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.py")
    if listed is not None:
        candidates = {Path(name) for name in listed.split("\0") if name and (PROJECT / name).is_file()}
        folders = {folder for path in candidates for folder in path.parents if folder != Path(".")}
        outside = {folder for folder in folders if _outside_the_code(PROJECT / folder, root_dir)}
        found = {path for path in candidates if not outside.intersection(path.parents)}
    else:
        found = set()
        for folder, subfolders, files in os.walk(PROJECT):
            subfolders[:] = [name for name in subfolders if not _outside_the_code(Path(folder, name), root_dir)]
            found |= {Path(folder, name).relative_to(PROJECT) for name in files if name.endswith(".py")}
    return sorted(path for path in found if path.parts[0] != "tests")  # the test suite does not train


def _same_files(files: list[Path], copy: Path) -> bool:
    copied = sorted(path.relative_to(copy) for path in copy.rglob("*.py"))
    return copied == files and all((PROJECT / f).read_bytes() == (copy / f).read_bytes() for f in files)


def record_provenance(run_dir: Path, world_size: int, num_nodes: int, device: torch.device) -> str | None:
    """Rank 0: copies the code if it is new to the run and appends this start's entry. Returns the name of a new
    copy made on a resume (None if the code is the copy's already, or at the first start)."""
    stamp = datetime.now()
    files = project_files(run_dir.parent)
    copies = sorted(path for path in run_dir.glob("code-*") if path.is_dir())  # the names sort by time
    latest = copies[-1] if copies else run_dir / "code"
    first_start = not (run_dir / "code").exists()
    new_copy = None
    if first_start or not _same_files(files, latest):
        new_copy = "code" if first_start else f"code-{stamp:%Y%m%d-%H%M%S}"
        tmp = run_dir / f".{new_copy}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for name in files:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / name, tmp / name)
        os.replace(tmp, run_dir / new_copy)  # a complete copy or none
    commit = _git("rev-parse", "HEAD")
    entry = {"time": f"{stamp:%Y-%m-%d %H:%M:%S}", "command": shlex.join([Path(sys.executable).name, *sys.argv]),
             "host": socket.gethostname(), "world_size": world_size, "num_nodes": num_nodes,
             "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"{device.type} ({platform.processor() or platform.machine()})",
             "python": platform.python_version(), "torch": str(torch.__version__), "lightning": lightning.__version__,
             "cuda": torch.version.cuda, "float32_matmul": torch.get_float32_matmul_precision(),  # TF32: high
             "code": new_copy or latest.name}
    if commit is not None:
        diff = _git("diff", "HEAD")
        entry |= {"git_commit": commit.strip(), "dirty": bool(diff)}
        if diff:  # kept beside the copy of the code it belongs to
            entry["diff"] = f"{new_copy or latest.name}.diff"
            if new_copy or not (run_dir / entry["diff"]).exists():
                write_text_atomically(run_dir / entry["diff"], diff)
    path = run_dir / PROVENANCE
    entries = (read_yaml_file(path) or []) if path.is_file() else []
    write_yaml_atomically(path, [*entries, entry])
    return None if first_start else new_copy
