"""Checkpoints that survive crashes: atomic streaming saves, retention, and picking the newest one that opens.

A checkpoint is one file `epoch-EEEE-step-SSSSSSSS.ckpt` (a folder of shards under FSDP / DeepSpeed) that
`torch.load(path, weights_only=True)` opens. It is written under a hidden temporary name in the same folder and
renamed into place, so a kill at any moment leaves either the complete file or none under a checkpoint name.
"""

import os
import re
import shutil
import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

NAME = re.compile(r"epoch-(\d+)-step-(\d+)\.ckpt")
SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


class CheckpointError(RuntimeError):
    pass


def checkpoint_name(epoch: int, global_step: int) -> str:
    return f"epoch-{epoch:04d}-step-{global_step:08d}.ckpt"


def is_checkpoint_file(path: Path) -> bool:
    return NAME.fullmatch(path.name) is not None


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in the folder, oldest first (by global step, then epoch)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if is_checkpoint_file(p)]
    return sorted(found, key=lambda p: tuple(int(n) for n in reversed(NAME.fullmatch(p.name).groups())))


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Fabric's single-file save, but streamed straight to a temporary file next to the target, fsynced and
    renamed into place (Fabric's own builds the file in memory and moves it from the system temp folder)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        tmp = _temporary(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)  # tensor by tensor, straight to disk
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
            _fsync(path.parent)  # the rename itself is durable only once the folder is synced
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code


def save_checkpoint(fabric: Fabric, ckpt_dir: Path, name: str, state: dict) -> Path:
    """Saves atomically; call on all ranks. On any error every rank raises CheckpointError naming the file."""
    path = ckpt_dir / name
    error = None
    try:
        if isinstance(fabric.strategy, SHARDED):  # every rank writes shards: commit by renaming the whole folder
            fabric.save(_temporary(path), state)
            fabric.barrier()
            if fabric.is_global_zero:
                os.replace(_temporary(path), path)
                _fsync(ckpt_dir)
        else:
            fabric.save(path, state)  # AtomicCheckpointIO, on global rank 0
    except (OSError, RuntimeError) as err:
        if isinstance(err.__context__, OSError):  # torch's writer wraps a failed write (disk full) in RuntimeError
            err = err.__context__
        error = f"could not save checkpoint {path}: {getattr(err, 'strerror', None) or err}"
    error = fabric.broadcast(error)  # all ranks: the others stop too
    if error:
        raise CheckpointError(error)
    return path


def prune_checkpoints(ckpt_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Deletes all but the newest `keep` checkpoints in the folder (whoever wrote them), sparing `protect`."""
    for path in list_checkpoints(ckpt_dir)[:-keep]:
        if path != protect:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def remove_leftovers(ckpt_dir: Path) -> None:
    """Removes temporary files of saves that were killed midway."""
    for tmp in ckpt_dir.glob(".*.tmp"):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def check_opens(path: Path) -> None:
    """Raises if the checkpoint file is truncated, corrupt or would need unsafe unpickling."""
    if path.is_file():
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def newest_valid_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that opens; those newer that do not are reported and renamed to *.corrupt."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            check_opens(path)
            return path
        except Exception as err:
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            print(f"warning: checkpoint {path} does not open ({type(err).__name__}: {reason}); "
                  f"moved aside to {aside.name}", file=sys.stderr)
    return None


def pick_checkpoint(fabric: Fabric, ckpt_dir: Path, named: Path | None) -> Path | None:
    """All ranks: `named` if given (CheckpointError if it does not open), else the newest valid checkpoint,
    picked on global rank 0 after removing leftovers of interrupted saves."""
    if named is not None:
        try:
            check_opens(named)
        except Exception as err:
            raise CheckpointError(f"checkpoint {named} does not open ({type(err).__name__})") from None
        return named
    picked = None
    if fabric.is_global_zero:
        remove_leftovers(ckpt_dir)
        picked = newest_valid_checkpoint(ckpt_dir)
    return fabric.broadcast(picked)
