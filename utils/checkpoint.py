"""Checkpoints that survive crashes: atomic streaming saves, retention, and picking the newest one that opens.

A checkpoint is one file `epoch-EEEE-step-SSSSSSSS.ckpt` that `torch.load(path, weights_only=True)` opens, or under
fsdp2 a folder of that name: one shard file per rank and `.metadata` (torch.distributed.checkpoint) and `meta.pt`
(the rest of the state). Either is written under a hidden temporary name in the same folder and renamed into place,
so a kill at any moment leaves either the complete checkpoint or none under a checkpoint name. Both kinds load into
a run of any strategy and any number of processes.
"""

import math
import os
import re
import shutil
import sys
import threading
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml
from lightning.fabric import Fabric
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

NAME = re.compile(r"epoch-(\d+)-step-(\d+)\.ckpt")
TOP = re.compile(r"top-step-(\d+)-.*\.ckpt")  # one of the --save_top_k best; retention does not count them
COMPILED = "_orig_mod."  # in the names of modules compiled one by one (fsdp2); checkpoints hold names without it
BEST = "best.ckpt"  # the best validation so far; retention and picking a checkpoint to resume from ignore it
SHARDED = (ModelParallelStrategy,)  # fsdp2: a checkpoint is a folder of shards


class CheckpointError(RuntimeError):
    pass


def checkpoint_name(epoch: int, global_step: int) -> str:
    return f"epoch-{epoch:04d}-step-{global_step:08d}.ckpt"


def top_k_name(global_step: int, monitor: str, value: float) -> str:
    return f"top-step-{global_step:08d}-{monitor}={value!r}.ckpt"  # repr: the value exactly


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


def write_text_atomically(path: Path, text: str) -> None:
    """A small text file (a record, a log, a result) written under a temporary name and renamed into place: a kill
    at any moment leaves the old file or the new one."""
    tmp = _temporary(path)
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def write_yaml_atomically(path: Path, value) -> None:
    """A record (config.yaml, resumes.yaml, provenance.yaml) in field order, non-ASCII text kept readable."""
    write_text_atomically(path, yaml.safe_dump(value, sort_keys=False, allow_unicode=True))


def read_yaml_file(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Fabric's single-file save (on global rank 0), atomic and written in the background. `save_checkpoint` only
    copies the state off the device (and out of the live tensors training goes on changing) and returns; a thread
    streams the copy to a temporary file next to the target, fsyncs it, renames it into place, then runs `after`
    (pruning older checkpoints). One write at a time: the next save and `wait()` wait for it, and the process's
    exit waits too (the thread is not a daemon). Fabric's own save builds the file in memory, moves it from the
    system temp folder, and blocks until it is written."""

    instances: list["AtomicCheckpointIO"] = []  # every one made in this process, for wait_for_writes at an exit

    def __init__(self):
        super().__init__()
        AtomicCheckpointIO.instances.append(self)
        self.after = None  # run once the next checkpoint is in place (set by save_checkpoint)
        self._writer: threading.Thread | None = None
        self._failure: str | None = None

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if failure := self.wait():  # save_checkpoint() checks before each save; this is for direct callers
            raise CheckpointError(failure)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        copy = _copy_off_device(checkpoint, {})
        self._writer = threading.Thread(target=self._write, args=(copy, path, self.after), name="checkpoint-writer")
        self.after = None
        self._writer.start()

    def _write(self, checkpoint: dict, path: Path, after) -> None:
        tmp = _temporary(path)
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)  # tensor by tensor, straight to disk
                file.flush()
                os.fsync(file.fileno())
            _move_into_place(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            self._failure = _save_error(path, err)
            return
        try:
            if after is not None:
                after()
        except OSError as err:
            self._failure = f"saved checkpoint {path}, but could not delete older ones: {err}"

    def wait(self) -> str | None:
        """Waits for the write in progress, if any; returns why it failed (naming the checkpoint), or None."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        failure, self._failure = self._failure, None
        return failure

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code


def _copy_off_device(value, copies: dict):
    """A copy of a checkpoint's dicts, lists and tensors on the CPU, sharing no memory with the original. Tensors
    that shared memory (a tied embedding and head) still share it in the copy, so the file holds them once."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = (storage.data_ptr(), value.device)
        if key not in copies:
            copies[key] = storage.clone() if value.device.type == "cpu" else storage.cpu()
        copy = torch.empty(0, dtype=value.dtype)
        return copy.set_(copies[key], value.storage_offset(), value.size(), value.stride())
    if isinstance(value, dict):
        return {key: _copy_off_device(item, copies) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_copy_off_device(item, copies) for item in value)
    return value


def _move_into_place(tmp: Path, path: Path) -> None:
    """Renames a complete, fsynced checkpoint into place, durably. A file replaces a file atomically; a folder of that
    name (best.ckpt of an fsdp2 run) is first renamed aside and then deleted (a kill in between leaves the newer
    checkpoints, and no best.ckpt)."""
    old = path.with_name(f".{path.name}.old.tmp")
    if path.is_dir() or (tmp.is_dir() and path.exists()):
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)  # the rename itself is durable only once the folder is synced
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def _first_error(fabric: Fabric, error: str | None) -> str | None:
    """All ranks: the error of the lowest rank that had one, so that every rank stops together."""
    if fabric.world_size == 1:
        return error
    errors = [None] * fabric.world_size
    torch.distributed.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _save_error(path: Path, err: BaseException) -> str:
    # torch.distributed.checkpoint's writer can lose the OSError (a short write is all it reports): say how full
    free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
    return f"could not save checkpoint {path}: {_reason(err)} ({free / 1e6:.1f} MB free on its disk)"


def _reason(err: BaseException) -> str:
    """Why a save failed, in words: the OSError (disk full) under torch's wrappers where there is one."""
    if isinstance(err, dcp.CheckpointException):  # {rank: (exception, traceback)} of the ranks that failed
        failure = next(iter(err.failures.values()))
        err = failure[0] if isinstance(failure, tuple) else failure
    while not isinstance(err, OSError) and isinstance(err.__context__, BaseException):
        err = err.__context__
    return getattr(err, "strerror", None) or str(err)


def _background_writer(fabric: Fabric) -> AtomicCheckpointIO | None:
    io = None if isinstance(fabric.strategy, SHARDED) else fabric.strategy.checkpoint_io
    return io if isinstance(io, AtomicCheckpointIO) else None


def finish_saves(fabric: Fabric) -> None:
    """All ranks: waits until the checkpoint being written in the background (by global rank 0) is in place. If
    that write failed, every rank raises CheckpointError naming the checkpoint."""
    writer = _background_writer(fabric)
    failure = writer.wait() if writer is not None and fabric.is_global_zero else None
    if failure := _first_error(fabric, failure):
        raise CheckpointError(failure)


def wait_for_writes() -> list[str]:
    """This process's background checkpoint writes, finished; why each one that failed failed (for an exit)."""
    return [failure for writer in AtomicCheckpointIO.instances if (failure := writer.wait())]


def save_checkpoint(fabric: Fabric, ckpt_dir: Path, name: str, state: dict, keep: int | None = None,
                    protect: Path | None = None) -> Path:
    """Saves atomically; call on all ranks. A single file is written in the background (AtomicCheckpointIO): this
    returns once the state is copied, after the previous write is in place. With `keep`, global rank 0 then deletes
    all but the newest `keep` checkpoints, sparing `protect`, once this one is in place. On any error on any rank,
    in this save or the write before it, every rank raises CheckpointError naming the checkpoint, and nothing is
    left under a checkpoint or temporary name."""
    path = ckpt_dir / name
    sharded = isinstance(fabric.strategy, SHARDED)
    finish_saves(fabric)  # all ranks
    prune = (lambda: prune_checkpoints(ckpt_dir, keep, protect)) if keep and fabric.is_global_zero else None
    if prune is not None and not sharded:
        fabric.strategy.checkpoint_io.after = prune
    error, saved = None, False
    try:
        # every rank writes its shard, or global rank 0 the file (AtomicCheckpointIO); then all wait in a barrier
        fabric.save(_temporary(path) if sharded else path, state)
        saved = True
        if sharded and fabric.is_global_zero:
            _fsync(_temporary(path) / "meta.pt")  # the shards are fsynced by torch's writer
            _fsync(_temporary(path))
            _move_into_place(_temporary(path), path)
            if prune is not None:
                prune()
    # torch's writer wraps a failed write (disk full) in RuntimeError; torch.distributed.checkpoint raises its
    # CheckpointException (a BaseException) on every rank when any rank failed
    except (OSError, RuntimeError, dcp.CheckpointException) as err:
        error = _save_error(path, err)
        if prune is not None and not sharded:
            fabric.strategy.checkpoint_io.after = None  # not left for the next save
        if sharded and fabric.is_global_zero:
            shutil.rmtree(_temporary(path), ignore_errors=True)
        if not saved and not isinstance(err, dcp.CheckpointException) and fabric.world_size > 1:
            fabric.barrier()  # only this rank failed, before fabric.save's closing barrier that the others wait in
    error = _first_error(fabric, error)  # all ranks
    if error:
        raise CheckpointError(error)
    return path


def prune_checkpoints(ckpt_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Deletes all but the newest `keep` checkpoints in the folder (whoever wrote them), sparing `protect`."""
    for path in list_checkpoints(ckpt_dir)[:-keep]:
        if path != protect:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def remove_top_k(ckpt_dir: Path, dropped: list, monitor: str) -> None:
    """Deletes the top-k checkpoints of the [step, value] pairs that dropped out of the k best (gone already: fine,
    a branch may have restored a list that names one deleted later on the old branch)."""
    for step, value in dropped:
        path = ckpt_dir / top_k_name(step, monitor, value)
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def remove_leftovers(ckpt_dir: Path) -> None:
    """Removes temporary files of saves that were killed midway (only the run's own writer may call this)."""
    for tmp in ckpt_dir.glob(".*.tmp"):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def check_shards(folder: Path) -> None:
    """Raises unless the folder's .metadata reads and every shard it names is there, at least as long as the data
    it indexes (a shard cut short by a full disk or a kill is found without reading the tensors)."""
    metadata = dcp.FileSystemReader(folder).read_metadata()
    needed = {}
    for where in metadata.storage_data.values():
        needed[where.relative_path] = max(needed.get(where.relative_path, 0), where.offset + where.length)
    for name, size in sorted(needed.items()):
        if not (folder / name).is_file():
            raise CheckpointError(f"shard {name} is missing")
        if (found := (folder / name).stat().st_size) < size:
            raise CheckpointError(f"shard {name} is truncated ({found} of {size} bytes)")


def open_checkpoint(path: Path) -> dict:
    """The checkpoint's contents, memory-mapped (cheap for any size), without the shards of a folder (their model
    and optimizer state); raises if it is missing, truncated, corrupt or would need unsafe unpickling."""
    if path.is_dir():  # a folder of shards: check them, then read its non-tensor state
        check_shards(path)
        path = path / "meta.pt"
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def check_template_checkpoint(contents) -> None:
    """Raises unless an opened checkpoint is one this template wrote (a plain state_dict given a checkpoint's name is
    not)."""
    missing = [key for key in ("global_step", "config") if not isinstance(contents, dict) or key not in contents]
    if missing:
        raise CheckpointError(f"not a checkpoint of this template (no {missing[0]!r}; a plain state_dict?)")


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step a checkpoint was saved at; None for plain weights."""
    contents = open_checkpoint(path)
    return contents.get("global_step") if isinstance(contents, dict) else None


def run_finished(state: dict) -> bool:
    """Whether the checkpoint ends its run. Checkpoints without the flag (older runs) end it at the last epoch."""
    return bool(state.get("finished", state.get("epoch", 0) >= state.get("config", {}).get("epochs", math.inf)))


def newest_that_opens(ckpt_dir: Path, move_aside: bool, report: bool = True) -> tuple[Path | None, dict | None]:
    """(path, contents) of the newest checkpoint that opens. Newer ones that do not are reported and, with
    move_aside (the run's own writer only), renamed to *.corrupt."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            contents = open_checkpoint(path)
            check_template_checkpoint(contents)
            return path, contents
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            if move_aside:
                aside = path.with_name(path.name + ".corrupt")
                os.replace(path, aside)
                action = f"moved aside to {aside.name}"
            else:
                action = "skipped"
            if report:
                print(f"warning: checkpoint {path} does not open ({type(err).__name__}: {reason}); {action}",
                      file=sys.stderr)
    return None, None


def read_model_weights(path: Path, shapes_only: bool = False, average: bool = False) -> dict[str, torch.Tensor]:
    """The full model weights of a checkpoint file or folder of shards, or a plain state_dict file, read by this
    process alone (any strategy, any number of processes, no process group needed); memory-mapped from a file. With
    `average`, the moving average of the weights (--ema_decay) where the checkpoint holds one. With shapes_only a
    folder's weights are empty tensors on the meta device (nothing read)."""
    if not path.is_dir():
        weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        entry = "ema" if average and isinstance(weights.get("ema"), dict) else "model"
        return weights[entry] if isinstance(weights.get(entry), dict) else weights  # a checkpoint, or weights
    check_shards(path)
    if average and holds_average(path):  # full tensors in meta.pt (utils/ema.py gathers them)
        return torch.load(path / "meta.pt", map_location="cpu", weights_only=True, mmap=True)["ema"]
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    weights = {key.removeprefix("model."): torch.empty(item.size, dtype=item.properties.dtype,
                                                       device="meta" if shapes_only else "cpu")
               for key, item in saved.items() if key.startswith("model.")}
    if not shapes_only:
        dcp.load({"model": weights}, checkpoint_id=path, no_dist=True)
    return weights


def holds_average(path: Path) -> bool:
    """Whether a checkpoint (a file, or a folder's meta.pt) holds a moving average of the weights (--ema_decay)."""
    contents = torch.load(path / "meta.pt" if path.is_dir() else path, map_location="cpu", weights_only=True,
                          mmap=True)
    return isinstance(contents, dict) and isinstance(contents.get("ema"), dict)


def load_checkpoint(fabric: Fabric, path: Path, state: dict) -> dict:
    """All ranks: restores `state` in place from a file or a folder of shards, into a run of any strategy and size;
    returns the checkpoint's entries that `state` does not name. Under DDP or one process a file is fabric.load's;
    Lightning 2.6.6 cannot load a folder there, nor a file into fsdp2 (it numbers the optimizer's tensors in module
    order, not the optimizer's), nor anything into a model compiled unit by unit: torch's state_dict functions can."""
    fsdp2 = isinstance(fabric.strategy, ModelParallelStrategy)
    if not fsdp2 and (path.is_file() or isinstance(fabric.strategy, SHARDED)):
        return fabric.load(path, state)  # also Fabric's FSDP1 and DeepSpeed (GPU only, untested here)
    module, optimizer = state["model"].module, state["optimizer"].optimizer
    if path.is_dir():  # resharded to this run; without fsdp2 every rank reads every shard
        full = {"model": get_model_state_dict(module), "optimizer": get_optimizer_state_dict(module, optimizer)}
        dcp.load(full, checkpoint_id=path, no_dist=not fsdp2)
        rest = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    else:  # every rank reads the file, then keeps its shard
        rest = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        optimizer_state = _named_optimizer_state(rest.pop("optimizer"), module, optimizer)
        full = {"model": rest.pop("model"), "optimizer": optimizer_state}
    options = StateDictOptions(full_state_dict=not path.is_dir())
    set_model_state_dict(module, full["model"], options=options)
    set_optimizer_state_dict(module, optimizer, full["optimizer"], options=options)
    for key in [key for key in state if key not in ("model", "optimizer")]:  # one order on every rank (collectives)
        if hasattr(state[key], "load_state_dict"):
            state[key].load_state_dict(rest.pop(key))
        else:
            state[key] = rest.pop(key)
    return rest


def _named_optimizer_state(saved: dict, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """torch's optimizer state_dict numbers the parameters in the optimizer's group order; torch.distributed's
    state_dict functions name them."""
    names = {param: name.replace(COMPILED, "") for name, param in module.named_parameters()}
    order = [names[param] for group in optimizer.param_groups for param in group["params"]]
    return {"state": {order[index]: value for index, value in saved["state"].items()},
            "param_groups": [{**group, "params": [order[index] for index in group["params"]]}
                             for group in saved["param_groups"]]}


def pick_checkpoint(fabric: Fabric, ckpt_dir: Path, named: Path | None, read_only: bool = False) -> Path | None:
    """All ranks: `named` if given (CheckpointError if it does not open), else the newest that opens, picked on
    global rank 0. The run's own writer (not read_only) first removes leftovers of interrupted saves and moves
    checkpoints that do not open aside; a reader (test.py) changes nothing."""
    if named is not None:
        try:
            contents = open_checkpoint(named)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {named} does not exist") from None
        except Exception as err:
            raise CheckpointError(f"checkpoint {named} does not open ({type(err).__name__})") from None
        if not read_only:  # a reader also takes plain weights; a resume needs the whole state
            try:
                check_template_checkpoint(contents)
            except CheckpointError as err:
                raise CheckpointError(f"checkpoint {named} is {err}") from None
        return named
    picked = None
    if fabric.is_global_zero:
        if not read_only:
            remove_leftovers(ckpt_dir)
        picked, _ = newest_that_opens(ckpt_dir, move_aside=not read_only)
    return fabric.broadcast(picked)


def choose_checkpoint(fabric: Fabric, run_dir: Path, choice: str | None) -> Path:
    """All ranks, reading only: the checkpoint a reader of a run (test.py, sample.py) asked for: 'best', 'last' (the
    newest that opens), a path, or None (best if the run has one, else last). CheckpointError if there is none."""
    best = run_dir / "checkpoints" / BEST
    if choice == "best" and not best.exists():
        raise CheckpointError(f"{run_dir} has no best checkpoint (it has not validated yet); use last")
    use_best = choice == "best" or (choice is None and best.exists())
    named = best if use_best else None if choice in (None, "last") else Path(choice)
    checkpoint = pick_checkpoint(fabric, run_dir / "checkpoints", named, read_only=True)
    if checkpoint is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint that opens")
    return checkpoint


def model_mismatch(saved: dict, model_state: dict) -> str | None:
    """The first difference between a checkpoint's model state_dict and the model's, in words; None if it fits."""
    model_state = {key.replace(COMPILED, ""): value for key, value in model_state.items()}
    missing = [key for key in model_state if key not in saved]
    unexpected = [key for key in saved if key not in model_state]
    if missing:
        return f"missing key {missing[0]!r} ({len(missing)} missing in all)"
    if unexpected:
        return f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)"
    for key, value in model_state.items():
        if tuple(saved[key].shape) != tuple(value.shape):
            return (f"key {key!r} has shape {tuple(saved[key].shape)} in the checkpoint and {tuple(value.shape)} "
                    f"in the model")
    return None


def move_newer_aside(ckpt_dir: Path, resumed_from: Path) -> Path | None:
    """Resuming from an earlier checkpoint starts a branch: the checkpoints after it, best.ckpt and the top-k ones
    included, move (not deleted) to checkpoints/abandoned-<stamp>/. Returns that folder, or None if there were none."""
    step = open_checkpoint(resumed_from)["global_step"]
    newer = [p for p in list_checkpoints(ckpt_dir) if int(NAME.fullmatch(p.name).group(2)) > step]
    newer += [p for p in ckpt_dir.glob("top-step-*") if (top := TOP.fullmatch(p.name)) and int(top[1]) > step]
    best = ckpt_dir / BEST
    if best.exists() and open_checkpoint(best)["global_step"] > step:
        newer.append(best)
    if not newer:
        return None
    aside = ckpt_dir / f"abandoned-{datetime.now():%Y%m%d-%H%M%S}"
    aside.mkdir(exist_ok=True)
    for path in newer:
        os.replace(path, aside / path.name)
    _fsync(ckpt_dir)
    return aside


def load_model_weights(model: torch.nn.Module, path: str) -> str:
    """init_from: model weights only (weights_only loading), from a template checkpoint (a file or a folder of
    shards) or a plain state_dict, also wrapped as Lightning saves it (under 'state_dict') or as DDP names it (keys
    prefixed 'module.'). Missing and unexpected keys are allowed and reported; a shape that does not fit, or a file
    that loads none of the model's tensors, raises CheckpointError."""
    try:
        weights = read_model_weights(Path(path), average=True)
    except FileNotFoundError:
        raise CheckpointError(": no such file") from None
    except Exception as err:
        raise CheckpointError(f" does not open ({type(err).__name__})") from None
    own, unwrapped = model.state_dict(), []
    if isinstance(weights.get("state_dict"), dict):
        weights, unwrapped = weights["state_dict"], ["the 'state_dict' entry"]
    weights = {key: value for key, value in weights.items() if isinstance(value, torch.Tensor)}
    # DDP's wrapper, a LightningModule's `model` attribute, torch.compile's wrapper
    for prefix in ("module.", "model.", COMPILED):
        if weights and all(key.startswith(prefix) for key in weights) and not any(k.startswith(prefix) for k in own):
            weights = {key.removeprefix(prefix): value for key, value in weights.items()}
            unwrapped.append(f"the {prefix!r} prefix")
    shared = [key for key in weights if key in own]
    if not shared:
        raise CheckpointError(f" loads none of the model's {len(own)} tensors: its keys ({_first_keys(weights)}) "
                              f"match none of the model's ({_first_keys(own)})")
    mismatch = model_mismatch({k: weights[k] for k in shared}, {k: own[k] for k in shared})
    if mismatch:
        raise CheckpointError(f" does not fit the model: {mismatch}")
    result = model.load_state_dict(weights, strict=False)
    averaged = " (its moving average)" if holds_average(Path(path)) else ""
    return (f"init_from {path}{averaged}: {len(shared)} of the model's {len(own)} tensors loaded"
            f"{' (unwrapped ' + ' and '.join(unwrapped) + ')' if unwrapped else ''}; missing keys: "
            f"{result.missing_keys or 'none'}; unexpected keys: {result.unexpected_keys or 'none'}")


def _first_keys(state: dict, count: int = 3) -> str:
    keys = list(state)
    return ", ".join(map(repr, keys[:count])) + (", ..." if len(keys) > count else "") if keys else "none"
