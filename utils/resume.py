"""Resuming a run: restore the checkpointed state, refuse what cannot change mid-run, apply what can."""

from pathlib import Path

from lightning.fabric import Fabric

from utils.batching import BatchPlan
from utils.checkpoint import CheckpointError, load_checkpoint, model_mismatch, pick_checkpoint, read_model_weights
from utils.console import print0
from utils.exits import fail
from utils.rng import restore_rng


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
    mismatch = model_mismatch(read_model_weights(path, shapes_only=True), state["model"].state_dict())
    if mismatch:
        fail(f"checkpoint {path} does not fit the model: {mismatch}")
    rng = load_checkpoint(fabric, path, state)["rng"]  # a file or a folder of shards, into any strategy
    for name in ("eff_batch_size", "seed"):  # a new batch size or seed would change the epoch in progress
        if state["config"][name] != getattr(cfg, name):
            fail(f"{name}={getattr(cfg, name)} differs from the checkpoint's {state['config'][name]}: "
                 f"a resumed run keeps its {name}")
    # optimizer settings given now win over the restored ones (the LR is set at every step)
    for group in state["optimizer"].param_groups:
        group["betas"] = (cfg.beta1, cfg.beta2)
    state["optimizer"].param_groups[0]["weight_decay"] = cfg.weight_decay  # the decayed group (make_optimizer)
    if state["world_size"] == fabric.world_size:
        restore_rng(rng[fabric.global_rank])
    else:
        print0(f"resuming on world size {fabric.world_size} (was {state['world_size']}): "
               f"{batches.per_device} samples per device, {batches.accum_steps} accumulation steps; "
               f"random states start afresh")
    return path
