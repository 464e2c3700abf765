"""Run folders: ROOT_DIR/<YYYYmmdd-HHMMSS>-OUT_DIR, one per run with one writer at a time; which run --resume
continues; and the run's record: config.yaml from its first start, resumes.yaml with what each resume changed."""

import errno
import fcntl
import os
import re
import socket
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

from lightning.fabric import Fabric

from utils.base_model import base_change
from utils.checkpoint import (
    TOP,
    CheckpointError,
    choose_checkpoint,
    is_checkpoint_file,
    model_mismatch,
    newest_that_opens,
    read_model_weights,
    read_yaml_file,
    run_finished,
    write_text_atomically,
    write_yaml_atomically,
)
from utils.exits import fail

CONFIG, RESUMES, LOCK, SLURM_JOB = "config.yaml", "resumes.yaml", ".lock", "slurm_job_id"


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


# -- one writer per run folder ---------------------------------------------------------------------------------------

class RunInUse(RuntimeError):
    pass


_held_locks = []  # open descriptors: the lock lasts as long as this process


def lock_run_dir(run_dir: Path) -> None:
    """Takes an exclusive OS lock on RUN/.lock for the life of this process (global rank 0). The OS drops it when
    the process ends, however it ends, so a killed job never blocks a resume. RunInUse if another process holds it;
    a file system that cannot lock gets one warning."""
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunInUse(f"run folder {run_dir} is in use by {holder}") from None
    except OSError as err:  # some network file systems have no locks
        os.close(fd)
        print(f"warning: cannot lock {run_dir} ({err.strerror}): nothing stops a second job from writing to it",
              file=sys.stderr)
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _held_locks.append(fd)


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run folder's lock (reads only)."""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also drops the shared lock just taken


def claim_run_dir(fabric: Fabric, cfg) -> tuple[Path, Path | None]:
    """All ranks: (run folder, checkpoint named by --resume or None). Global rank 0 makes a new folder or takes the
    resumed run's, and locks it before anything in it is touched: one writer per run folder."""
    claimed, error = None, None
    if fabric.is_global_zero:
        run_dir, named = find_resume_target(cfg.resume, cfg.root_dir, cfg.out_dir)  # resolved by load_config
        try:
            run_dir = run_dir or create_run_dir(cfg.root_dir, cfg.out_dir)
            lock_run_dir(run_dir)
            claimed = run_dir, named
        except RunInUse as err:
            error = f"resume={cfg.resume!r}: {err}; wait for it to end or resume another run"
        except OSError as err:  # every rank must hear of it: the others wait in the broadcast below
            error = f"the run folder could not be made or locked under {cfg.root_dir!r}: {err}"
    error = fabric.broadcast(error)  # all ranks
    if error:
        fail(error)
    return fabric.broadcast(claimed)  # all ranks


def cannot_write(folder: Path) -> str | None:
    """Why nothing can be written in `folder` or, where it does not exist yet, made in the nearest folder above it
    that does (a read-only disk, a path under /proc, a file in the way); None if it can. Tried with a temporary
    folder, made and removed."""
    folder = folder.absolute()
    existing = next(path for path in [folder, *folder.parents] if path.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder")
        tempfile.TemporaryDirectory(dir=existing, prefix=".write-check-").cleanup()
    except OSError as err:
        return f"{existing}: {err.strerror or err}"
    return None


def check_writable(fabric: Fabric, cfg) -> None:
    """All ranks, before any setup: a one-line error if global rank 0 cannot write where the run goes (the resumed
    run's folder, else ROOT_DIR)."""
    error = None
    if fabric.is_global_zero:
        run_dir, _ = find_resume_target(cfg.resume, cfg.root_dir, cfg.out_dir)
        if reason := cannot_write(run_dir or Path(cfg.root_dir)):
            field = f"resume={cfg.resume!r}" if run_dir else f"root_dir={cfg.root_dir!r}"
            error = f"{field} cannot be written ({reason})"
    error = fabric.broadcast(error)  # all ranks
    if error:
        fail(error)


# -- which run --resume continues --------------------------------------------------------------------------------------

def slurm_job() -> str | None:
    """This SLURM batch job's id (JOB_TASK in a job array); None outside SLURM and in an interactive allocation
    (job name bash or interactive, as Lightning decides)."""
    env = os.environ
    if "SLURM_JOB_ID" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    if "SLURM_ARRAY_TASK_ID" in env:
        return f"{env.get('SLURM_ARRAY_JOB_ID', env['SLURM_JOB_ID'])}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def _auto_target(root_dir: str, out_dir: str) -> Path | None:
    """In a SLURM batch job: the run this job started (a requeue continues it). Elsewhere: the newest run named
    *-OUT_DIR that has a checkpoint, is not finished and is not held by a live job. None starts a new run."""
    root = Path(root_dir)
    pattern = re.compile(rf"\d{{8}}-\d{{6}}-{re.escape(out_dir)}")
    runs = sorted((p for p in root.iterdir() if pattern.fullmatch(p.name)), reverse=True) if root.is_dir() else []
    job = slurm_job()
    if job is not None:
        return next((run for run in runs if _read(run / SLURM_JOB) == job), None)
    for run in runs:
        _, newest = newest_that_opens(run / "checkpoints", move_aside=False, report=False)
        if newest is not None and not run_finished(newest) and not is_locked(run):
            return run
    return None


def find_resume_target(resume: str | None, root_dir: str, out_dir: str) -> tuple[Path | None, Path | None]:
    """(run folder, checkpoint file or None for its newest) for --resume; (None, None) starts a new run.

    resume may be a run folder, a checkpoint file inside one, or 'auto' (see _auto_target). Reads only.
    """
    if resume is None:
        return None, None
    if resume == "auto":
        return _auto_target(root_dir, out_dir), None
    path = Path(resume)
    if (is_checkpoint_file(path) or TOP.fullmatch(path.name)) and (path.parent.parent / CONFIG).is_file():
        if not path.is_file() and not path.is_dir():
            raise ValueError(f"resume={resume!r}: no such checkpoint in {path.parent}")
        return path.parent.parent, path
    if not (path / CONFIG).is_file():
        raise ValueError(f"resume={resume!r} is not a run folder (no config.yaml) nor a checkpoint inside one")
    return path, None


# -- the run's record --------------------------------------------------------------------------------------------------

def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def record_start(run_dir: Path, settings: dict, derived: dict) -> None:
    """config.yaml, written once at the run's first start: the settings in field order, then the values derived
    from them. In a SLURM batch job, also the job's id, so that a requeue finds this run."""
    write_yaml_atomically(run_dir / CONFIG, {**settings, "derived": derived})
    if slurm_job() is not None:
        write_text_atomically(run_dir / SLURM_JOB, slurm_job() + "\n")


def run_record(run_dir: Path) -> tuple[dict, dict]:
    """(settings, derived) in force at the run's latest start: config.yaml with every resume's changes applied."""
    record = read_yaml_file(run_dir / CONFIG) or {}
    if not isinstance(record, dict):
        raise ValueError(f"{run_dir / CONFIG} is not a mapping of field: value")
    derived = record.pop("derived", None) or {}
    record.pop("resume", None)  # older runs recorded it; a record is never an instruction to resume
    resumes = read_yaml_file(run_dir / RESUMES) if (run_dir / RESUMES).is_file() else None
    for entry in resumes or []:
        record.update(entry.get("changed") or {})
        derived.update(entry.get("derived_changed") or {})
    return record, derived


def record_resume(run_dir: Path, settings: dict, derived: dict, at_step: int, checkpoint: Path | None,
                  abandoned: Path | None, code_copy: str | None) -> None:
    """Appends one resume's entry to resumes.yaml: when, from which checkpoint, which settings and derived values
    differ from those in force before, and the copy of the code if it changed. config.yaml and earlier entries stay
    as they were."""
    before, derived_before = run_record(run_dir)
    entry = {"time": f"{datetime.now():%Y-%m-%d %H:%M:%S}", "at_step": at_step,
             "from_checkpoint": checkpoint.name if checkpoint else None,
             "changed": {k: v for k, v in settings.items() if before.get(k) != v},
             "derived_changed": {k: v for k, v in derived.items() if derived_before.get(k) != v}}
    if abandoned:
        entry["abandoned"] = str(abandoned.relative_to(run_dir))
    if code_copy:
        entry["code"] = f"{code_copy} (the code differs from the run's earlier copy)"
    path = run_dir / RESUMES
    entries = (read_yaml_file(path) or []) if path.is_file() else []
    write_yaml_atomically(path, [*entries, entry])


def load_weights_for_reading(fabric: Fabric, run_dir: Path, choice: str | None, model) -> Path:
    """All ranks, for a reader of a run (test.py, sample.py): loads the full weights of the checkpoint `choice` names
    (see choose_checkpoint; a file or a folder of shards) into `model` before Fabric sets it up, changing nothing in
    the run: their moving average where the run kept one (--ema_decay). A checkpoint that is missing, does not open or
    does not fit the model is a one-line error."""
    base = getattr(model, "base_path", None)  # weights fine-tuned from a base fit that base only
    if base and (change := base_change(run_dir, run_record(run_dir)[1].get("base_model"), base)):
        fail(change)
    try:
        checkpoint = choose_checkpoint(fabric, run_dir, choice)
        weights = read_model_weights(checkpoint, average=True)
    except CheckpointError as err:
        fail(f"checkpoint={choice!r}: {err}")
    mismatch = model_mismatch(weights, model.state_dict())
    if mismatch:
        fail(f"checkpoint {checkpoint} does not fit the model: {mismatch}")
    model.load_state_dict(weights)
    return checkpoint
