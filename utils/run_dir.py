"""Run folders: ROOT_DIR/<YYYYmmdd-HHMMSS>-OUT_DIR, one per run, and finding the run to resume."""

import dataclasses
import os
import re
from datetime import datetime, timedelta
from pathlib import Path

import yaml

from utils.checkpoint import is_checkpoint_file, list_checkpoints


def create_run_dir(root_dir: str, out_dir: str) -> Path:
    """Makes a new run folder; a run started in the same second takes the next free second."""
    stamp = datetime.now()
    while True:
        path = Path(root_dir) / f"{stamp:%Y%m%d-%H%M%S}-{out_dir}"
        try:
            path.mkdir(parents=True)  # atomic: two runs cannot both get the same folder
            return path
        except FileExistsError:
            stamp += timedelta(seconds=1)


def find_resume_target(resume: str | None, root_dir: str, out_dir: str) -> tuple[Path | None, Path | None]:
    """(run folder, checkpoint file or None for its newest) for --resume; (None, None) starts a new run.

    resume may be a run folder, a checkpoint file inside one, or 'auto': the newest run named *-OUT_DIR if it
    has a checkpoint.
    """
    if resume is None:
        return None, None
    if resume == "auto":
        pattern = re.compile(rf"\d{{8}}-\d{{6}}-{re.escape(out_dir)}")
        root = Path(root_dir)
        runs = sorted(p for p in root.iterdir() if pattern.fullmatch(p.name)) if root.is_dir() else []
        if runs and list_checkpoints(runs[-1] / "checkpoints"):
            return runs[-1], None
        return None, None
    path = Path(resume)
    if is_checkpoint_file(path) and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, path
    if not (path / "config.yaml").is_file():
        raise ValueError(f"resume={resume!r} is not a run folder (no config.yaml) nor a checkpoint inside one")
    return path, None


def write_config(run_dir: Path, cfg, derived: dict) -> None:
    """config.yaml: the final config in field order, then the values derived from it."""
    text = yaml.safe_dump({**dataclasses.asdict(cfg), "derived": derived}, sort_keys=False)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(text)
    os.replace(tmp, run_dir / "config.yaml")
