"""Resuming a run: restore the checkpointed state, refuse what cannot change mid-run, apply what can."""

from pathlib import Path

from lightning.fabric import Fabric

from utils.base_model import base_change
from utils.batching import BatchPlan
from utils.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_mismatch,
    open_checkpoint,
    pick_checkpoint,
    read_model_weights,
)
from utils.console import print0
from utils.exits import fail
from utils.lr_schedule import lr_at
from utils.rng import restore_rng
from utils.run_dir import run_record

# state entries newer than some checkpoints, and their value for such a checkpoint, from the state it restored
ADDED_LATER = {"stop_reference": lambda state: state["best_value"],  # early stopping's reference was the best value
               "log_extra_sums": lambda state: {},  # training_step returned its loss alone
               "top_k": lambda state: []}  # best.ckpt was the only best checkpoint
# state entries a checkpoint may lack, that start fresh
FRESH_IF_ABSENT = {"scaler": "the loss scale of 16-mixed starts fresh (the run trained at another precision)",
                   "ema": "the moving average of the weights (--ema_decay) starts from the resumed weights"}


def resume_state(fabric: Fabric, cfg, ckpt_dir: Path, named: Path | None, state: dict,
                 batches: BatchPlan) -> Path | None:
    """All ranks: restores `state` from the named checkpoint or the newest that opens, refuses what cannot change
    mid-run and applies the optimizer settings given now. Returns the checkpoint; None if the run has none yet."""
    try:
        path = pick_checkpoint(fabric, ckpt_dir, named)  # all ranks
    except CheckpointError as err:
        fail(f"resume={cfg.resume!r}: {err}")
    if path is None:
        return None
    if cfg.model.hf_path:  # the base model the run started from, hashed on rank 0 (all ranks)
        recorded = run_record(ckpt_dir.parent)[1].get("base_model")
        if change := fabric.broadcast(base_change(ckpt_dir.parent, recorded, cfg.model.hf_path)
                                      if fabric.is_global_zero else None):
            fail(change)
    mismatch = model_mismatch(read_model_weights(path, shapes_only=True), state["model"].state_dict())
    if mismatch:
        fail(f"checkpoint {path} does not fit the model: {mismatch}")
    saved = set(open_checkpoint(path)) | ({"model", "optimizer"} if path.is_dir() else set())  # shards hold those
    if ("train_data" in saved) != ("train_data" in state):  # a streamed position means nothing to a sampler
        was, now = ("streamed", "is not") if "train_data" in saved else ("not streamed", "is")
        fail(f"checkpoint {path}: its training data was {was} (litdata) and this run's {now}: a resumed run keeps "
             f"how it reads its training data (data.streaming)")
    stand_ins = {key: value_of for key, value_of in ADDED_LATER.items() if key in state and key not in saved}
    fresh = [key for key in FRESH_IF_ABSENT if key in state and key not in saved]
    missing = sorted(state.keys() - saved - stand_ins.keys() - set(fresh))
    if missing:
        fail(f"checkpoint {path} has no {missing[0]!r}, which this run's state holds (added to `state` after it was "
             f"saved): give it a value for older checkpoints in train.py, or resume from a newer checkpoint")
    kept = {key: state.pop(key) for key in [*stand_ins, *fresh]}
    # how this machine runs AdamW (fused on CUDA) is not the checkpoint's: a fused step under a loss scaler with a
    # restored fused=False would fail
    implementation = [{key: group[key] for key in ("fused", "foreach", "capturable")}
                      for group in state["optimizer"].param_groups]
    unused = load_checkpoint(fabric, path, state)  # a file or a folder of shards, into any strategy
    state.update({key: value_of(state) for key, value_of in stand_ins.items()}, **{key: kept[key] for key in fresh})
    for key in fresh:
        if hasattr(state[key], "restart"):
            state[key].restart()
        print0(f"checkpoint {path.name} has no {key}: {FRESH_IF_ABSENT[key]}")
    if "ema" in unused:
        print0(f"checkpoint {path.name} holds a moving average of the weights: dropped (--ema_decay is 0)")
    rng = unused["rng"]
    for name in ("eff_batch_size", "seed"):  # a new batch size or seed would change the epoch in progress
        if state["config"][name] != getattr(cfg, name):
            fail(f"{name}={getattr(cfg, name)} differs from the checkpoint's {state['config'][name]}: "
                 f"a resumed run keeps its {name}")
    # optimizer settings given now win over the restored ones (the LR is set at every step)
    for group, own in zip(state["optimizer"].param_groups, implementation, strict=True):
        group.update(own, betas=(cfg.beta1, cfg.beta2))
    state["optimizer"].param_groups[0]["weight_decay"] = cfg.weight_decay  # the decayed group (make_optimizer)
    if state["world_size"] == fabric.world_size:
        restore_rng(rng[fabric.global_rank])
    else:
        print0(f"resuming on world size {fabric.world_size} (was {state['world_size']}): "
               f"{batches.per_device} samples per device, {batches.accum_steps} accumulation steps; "
               f"random states start afresh")
    return path


def nothing_to_train(cfg, run_dir: Path, state: dict, total_steps: int) -> str | None:
    """Why a resumed run has nothing left to train (it finished, or stopped early), naming the setting that would
    extend it; None if it trains on."""
    step = state["global_step"]
    if step >= total_steps:
        extend = "--max_steps (or unset it, --max_steps none, to train by --epochs)" if cfg.max_steps else "--epochs"
        return f"run {run_dir} finished at step {step}; nothing to train: raise {extend} to train on"
    if cfg.early_stop_patience and state["bad_validations"] >= cfg.early_stop_patience:
        return (f"run {run_dir} stopped early at step {step}; nothing to train: raise --early_stop_patience (or set "
                f"it to 0) to train on")
    return None


def resume_changes(run_dir: Path, settings: dict, derived: dict, start_step: int) -> list[str]:
    """One line per setting this resume changes against the run's record, and what the learning rate does next when
    its schedule changed (extending a finished cosine run sends it back up, for one)."""
    before, derived_before = run_record(run_dir)

    def flat(values: dict) -> dict:  # the data: and model: groups' settings by their own names
        return {k: v for name, value in values.items() for k, v in (flat(value) if isinstance(value, dict)
                                                                    else {name: value}).items()}

    old, new = flat(before), flat(settings)
    lines = [f"resume changes {name}: {old.get(name)!r} -> {value!r}" for name, value in new.items()
             if old.get(name) != value]
    schedule = ("lr", "warmup_steps", "total_steps", "lr_schedule", "min_lr_ratio")
    was, now = {**old, **derived_before}, {**new, **derived}
    if any(was.get(name, now[name]) != now[name] for name in schedule):
        def lr(values: dict, step: int) -> float:
            return lr_at(step, *(values.get(name, now[name]) for name in schedule))

        lines.append(f"learning rate: {lr(was, start_step):.3g} at step {start_step} under the run's schedule until "
                     f"now; {lr(now, start_step + 1):.3g} at step {start_step + 1}, then {now['lr_schedule']} to "
                     f"{lr(now, now['total_steps']):.3g} at step {now['total_steps']}")
    return lines
