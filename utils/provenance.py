"""What code produced a run. At each start (the first and every resume) rank 0 appends an entry to
RUN/provenance.yaml: the command, time, host, devices, versions, and the git commit with a dirty flag. The project's
Python files are copied to RUN/code/ at the first start; a resume whose files differ keeps its own copy beside it
(code-<stamp>/). A dirty tree's uncommitted diff goes to RUN/code.diff (code-<stamp>.diff on a resume)."""

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
import yaml

from utils.checkpoint import write_text_atomically

PROJECT = Path(__file__).resolve().parents[1]
PROVENANCE = "provenance.yaml"


def _git(*args: str) -> str | None:
    """Output of a git command in the project; None outside a git checkout or without git."""
    try:
        result = subprocess.run(["git", *args], cwd=PROJECT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def project_files() -> list[Path]:
    """The project's own Python files, relative to it, but the tests: in a git checkout the tracked ones and the new
    ones git does not ignore; elsewhere every .py outside hidden folders, virtual environments and __pycache__."""
    listed = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.py")
    if listed is not None:
        found = {Path(name) for name in listed.split("\0") if name and (PROJECT / name).is_file()}
    else:
        found = set()
        for folder, subfolders, files in os.walk(PROJECT):
            subfolders[:] = [name for name in subfolders if not name.startswith((".", "__pycache__"))
                             and not (Path(folder) / name / "pyvenv.cfg").exists()]
            found |= {Path(folder, name).relative_to(PROJECT) for name in files if name.endswith(".py")}
    return sorted(path for path in found if path.parts[0] != "tests")  # the test suite does not train


def _same_files(files: list[Path], copy: Path) -> bool:
    copied = sorted(path.relative_to(copy) for path in copy.rglob("*.py"))
    return copied == files and all((PROJECT / f).read_bytes() == (copy / f).read_bytes() for f in files)


def record_provenance(run_dir: Path, world_size: int, num_nodes: int, device: torch.device) -> str | None:
    """Rank 0: copies the code if it is new to the run and appends this start's entry. Returns the name of a new
    copy made on a resume (None if the code is the copy's already, or at the first start)."""
    stamp = datetime.now()
    files = project_files()
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
             "cuda": torch.version.cuda, "code": new_copy or latest.name}
    if commit is not None:
        diff = _git("diff", "HEAD")
        entry |= {"git_commit": commit.strip(), "dirty": bool(diff)}
        if diff:  # kept beside the copy of the code it belongs to
            entry["diff"] = f"{new_copy or latest.name}.diff"
            if new_copy or not (run_dir / entry["diff"]).exists():
                write_text_atomically(run_dir / entry["diff"], diff)
    path = run_dir / PROVENANCE
    entries = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
    write_text_atomically(path, yaml.safe_dump([*entries, entry], sort_keys=False))
    return None if first_start else new_copy
