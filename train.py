"""Train a model with an explicit loop on lightning.fabric. Read it top to bottom; edit it freely.

Fabric places devices, starts processes and handles precision; everything else is in this file.

    python train.py                                          # whatever hardware is here
    python train.py --accelerator cpu --devices 2            # DDP over 2 CPU processes (gloo)
    python train.py --precision bf16-mixed --devices 4       # 4 GPUs, bf16 autocast
    python train.py --log_per_epoch 4 --logger_name tensorboard csv --checkpoint_frequency 5 --comment "note"
    python train.py --config_path my.yaml --epochs 20        # a YAML file, then flags on top
    python train.py --resume runs/20261122-104500-train_out  # continue that run (--resume auto: the newest)
    torchrun --nproc_per_node 4 train.py --devices 4
    torchrun --nnodes 2 --node_rank R --nproc_per_node 4 --master_addr HOST --master_port 29500 \
        train.py --devices 4 --num_nodes 2
    fabric run --accelerator cuda --devices 4 train.py
    sbatch scripts/train.slurm                               # SLURM: srun python train.py ...
"""

import dataclasses
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy
from tqdm import tqdm

from config import Config, load_config
from data import NUM_CLASSES, make_datasets
from model import make_model
from utils.batching import plan_batches, planned_world_size, scaled_lr
from utils.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    checkpoint_name,
    pick_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from utils.exits import exit_run, fail
from utils.loggers import log_hyperparams, make_loggers
from utils.preemption import EXIT_PREEMPTED, StopRequest
from utils.rng import gather_rng, restore_rng
from utils.run_dir import create_run_dir, find_resume_target, write_config
from utils.samplers import ResumableShuffleSampler, ShardSampler

print0 = rank_zero_only(print)  # all printing on global rank 0 (fabric.print prints once per node)


@torch.no_grad()
def evaluate(fabric: Fabric, model, loader) -> dict[str, float]:
    """Mean loss and accuracy over every sample of `loader` once. All ranks: compute() syncs across processes."""
    model.eval()
    loss = MeanMetric().to(fabric.device)
    accuracy = MulticlassAccuracy(NUM_CLASSES, average="micro").to(fabric.device)
    count = SumMetric().to(fabric.device)
    for inputs, targets in loader:
        logits = model(inputs)
        loss.update(F.cross_entropy(logits, targets), weight=len(targets))
        accuracy.update(logits, targets)
        count.update(len(targets))
    model.train()
    return {"loss": loss.compute().item(), "acc": accuracy.compute().item(), "samples": int(count.compute().item())}


def make_fabric(cfg: Config) -> Fabric:
    """Fabric with atomic, streamed checkpoint files; a hardware setting it rejects is a one-line error."""
    try:
        return Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                      strategy=cfg.strategy, precision=cfg.precision, plugins=[AtomicCheckpointIO()])
    except (ValueError, RuntimeError, MisconfigurationException) as err:
        fail(str(err).strip().splitlines()[0])


def main(cfg: Config) -> None:
    # -- setup: the batch split is checked before any process starts ------------------------------------------
    fabric = make_fabric(cfg)
    try:
        batches = plan_batches(cfg.eff_batch_size, planned_world_size(fabric), cfg.micro_batch_size)
    except ValueError as err:
        fail(str(err))
    lr = scaled_lr(cfg.base_lr, cfg.eff_batch_size, cfg.base_batch_size, cfg.lr_scaling_rule)
    if not os.environ.get("LT_CLI_USED"):  # under `fabric run` the processes exist already
        fabric.launch()
    stop = StopRequest()  # SIGTERM / SIGUSR1 only set a flag; the loop saves and exits at a step boundary
    # each rank draws its own dropout masks; DDP copies rank 0's initial weights to every rank
    fabric.seed_everything(cfg.seed + fabric.global_rank)

    # -- data: every optimizer step sees the same eff_batch_size samples on any number of devices -------------
    train_set, val_set, _ = make_datasets(cfg)
    sampler = ResumableShuffleSampler(len(train_set), batches.per_device, fabric.world_size, fabric.global_rank,
                                      cfg.seed)
    steps_per_epoch = sampler.steps_per_epoch
    if steps_per_epoch == 0:
        fail(f"eff_batch_size={cfg.eff_batch_size} is larger than the training set ({len(train_set)} samples)")
    # the loader's own generator keeps iterator creation from drawing on the global RNG (exact resume)
    train_loader = DataLoader(train_set, batch_size=batches.micro, sampler=sampler, num_workers=cfg.num_workers,
                              generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(val_set, batch_size=batches.per_device, num_workers=cfg.num_workers,
                            sampler=ShardSampler(len(val_set), fabric.world_size, fabric.global_rank))
    train_loader, val_loader = fabric.setup_dataloaders(train_loader, val_loader, use_distributed_sampler=False)

    # -- model and optimizer -----------------------------------------------------------------------------------
    model = make_model(cfg)
    if cfg.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    model, optimizer = fabric.setup(model, optimizer)

    # -- run folder: the resumed run's own, or a new one chosen on rank 0 and shared with all ranks --------------
    resume_dir, resume_file = fabric.broadcast(find_resume_target(cfg.resume, cfg.root_dir, cfg.out_dir))  # all ranks
    run_dir = resume_dir or (create_run_dir(cfg.root_dir, cfg.out_dir) if fabric.is_global_zero else None)
    run_dir = fabric.broadcast(run_dir)  # all ranks
    ckpt_dir = run_dir / "checkpoints"

    # -- checkpointed state: fabric.save / fabric.load convert the model and optimizer to state_dicts ----------
    state = {"model": model, "optimizer": optimizer, "global_step": 0, "epoch": 0, "config": {},
             "world_size": fabric.world_size, "log_loss_sum": 0.0, "log_loss_steps": 0}
    scaler = getattr(fabric.strategy.precision, "scaler", None)  # 16-mixed: the loss scale must survive too
    if scaler is not None:
        state["scaler"] = scaler

    # -- resume: the named checkpoint, or the newest that opens (corrupt ones are moved aside) -------------------
    resumed_from = None
    if resume_dir is not None:
        try:
            resumed_from = pick_checkpoint(fabric, ckpt_dir, resume_file)  # all ranks
        except CheckpointError as err:
            fail(f"resume={cfg.resume!r}: {err}")
    if resumed_from is not None:
        try:
            rng = fabric.load(resumed_from, state)["rng"]
        except RuntimeError as err:  # a model whose shapes do not match the checkpoint
            fail(f"checkpoint {resumed_from} does not fit the model: {str(err).strip().splitlines()[-1].strip()}")
        if state["config"]["eff_batch_size"] != cfg.eff_batch_size:
            fail(f"eff_batch_size={cfg.eff_batch_size} differs from the checkpoint's "
                 f"{state['config']['eff_batch_size']}: a resumed run keeps its effective batch size")
        if state["world_size"] == fabric.world_size:
            restore_rng(rng[fabric.global_rank])
        else:
            print0(f"resuming on world size {fabric.world_size} (was {state['world_size']}): "
                   f"{batches.per_device} samples per device, {batches.accum_steps} accumulation steps; "
                   f"random states start afresh")
        print0(f"resumed from {resumed_from} at step {state['global_step']}")
    start_step = state["global_step"]

    # -- config.yaml and loggers (rank 0 writes; the loggers are no-ops on other ranks) ---------------------------
    derived = {"world_size": fabric.world_size, "per_device_batch_size": batches.per_device,
               "accum_steps": batches.accum_steps, "micro_batch_size": batches.micro, "lr": lr,
               "steps_per_epoch": steps_per_epoch}
    if fabric.is_global_zero:
        write_config(run_dir, cfg, derived)
    fabric._loggers = make_loggers(cfg.logger_name, run_dir, start_step, cfg.wandb_project)  # needs the run folder
    log_hyperparams(fabric.loggers, {**dataclasses.asdict(cfg), **derived})
    print0(f"run folder {run_dir}: {fabric.world_size} process(es) x {batches.per_device} samples "
           f"({batches.accum_steps} x {batches.micro}) = {cfg.eff_batch_size} per step, lr {lr:.3g}")

    # -- training loop -------------------------------------------------------------------------------------------
    global_step = start_step
    log_every = max(1, steps_per_epoch // cfg.log_per_epoch)
    log_loss_sum, log_loss_steps = state["log_loss_sum"], state["log_loss_steps"]  # carried across a resume
    log_time = time.perf_counter()
    progress = tqdm(total=cfg.epochs * steps_per_epoch, initial=start_step, disable=not fabric.is_global_zero,
                    dynamic_ncols=True)
    for epoch in range(start_step // steps_per_epoch, cfg.epochs):
        sampler.set_position(epoch, global_step - epoch * steps_per_epoch)  # skips steps a resumed epoch has seen
        step_loss = torch.zeros((), device=fabric.device)
        for micro_step, (inputs, targets) in enumerate(train_loader):
            is_accumulating = (micro_step + 1) % batches.accum_steps != 0

            # -- the training step: edit here ---------------------------------------------------------------------
            # no gradient all-reduce on micro-steps that do not step the optimizer
            with fabric.no_backward_sync(model, enabled=is_accumulating):
                loss = F.cross_entropy(model(inputs), targets)
                fabric.backward(loss / batches.accum_steps)
            step_loss += loss.detach() / batches.accum_steps
            if is_accumulating:
                continue
            # all ranks: one reduce per step (the only host sync) finds a bad loss or a stop request on any rank
            flags = torch.stack([step_loss.float(), step_loss.new_tensor(stop.requested, dtype=torch.float32)])
            loss_sum, stop_votes = fabric.all_reduce(flags, reduce_op="sum").tolist()
            if not math.isfinite(loss_sum):
                fail(f"loss is {loss_sum} at step {global_step + 1}; stopped before the optimizer step, "
                     f"no checkpoint written", status=1, loggers=fabric.loggers)
            if cfg.grad_clip is not None:
                fabric.clip_gradients(model, optimizer, max_norm=cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # -----------------------------------------------------------------------------------------------------

            global_step += 1
            step_in_epoch = global_step - epoch * steps_per_epoch
            log_loss_sum += loss_sum / fabric.world_size
            log_loss_steps += 1
            step_loss.zero_()
            progress.update(1)

            # log: train loss log_per_epoch times per epoch, validation at the end of each epoch, in one row
            metrics = {}
            if step_in_epoch % log_every == 0:
                elapsed, log_time = time.perf_counter() - log_time, time.perf_counter()
                metrics = {"train_loss": log_loss_sum / log_loss_steps, "lr": optimizer.param_groups[0]["lr"],
                           "samples_per_sec": log_loss_steps * cfg.eff_batch_size / elapsed}
                progress.set_postfix(loss=f"{metrics['train_loss']:.4f}")
                log_loss_sum, log_loss_steps = 0.0, 0
            end_of_epoch = step_in_epoch == steps_per_epoch
            if end_of_epoch:
                val = evaluate(fabric, model, val_loader)  # all ranks
                metrics |= {"val_loss": val["loss"], "val_acc": val["acc"], "epoch": epoch + 1}
                print0(f"epoch {epoch + 1}: val loss {val['loss']:.4f}, val acc {val['acc']:.4f}")
            if metrics:
                fabric.log_dict(metrics, step=global_step)

            # checkpoint every checkpoint_frequency epochs, at the end, and when asked to stop (all ranks)
            last_step = global_step == cfg.epochs * steps_per_epoch
            due = end_of_epoch and ((epoch + 1) % cfg.checkpoint_frequency == 0 or last_step)
            if due or stop_votes:
                state.update(global_step=global_step, epoch=global_step // steps_per_epoch, rng=gather_rng(fabric),
                             config=dataclasses.asdict(cfg), world_size=fabric.world_size,
                             log_loss_sum=log_loss_sum, log_loss_steps=log_loss_steps)
                try:
                    path = save_checkpoint(fabric, ckpt_dir, checkpoint_name(state["epoch"], global_step), state)
                except CheckpointError as err:
                    fail(str(err), status=1, loggers=fabric.loggers)
                if fabric.is_global_zero:
                    prune_checkpoints(ckpt_dir, cfg.num_checkpoint_keep, protect=resumed_from)
            if stop_votes:
                print0(f"stop requested: saved {path} at step {global_step}; rerun with --resume auto",
                       file=sys.stderr)
                exit_run(EXIT_PREEMPTED, fabric.loggers)
    progress.close()
    for logger in fabric.loggers:
        logger.finalize("success")
    print0(f"done: {run_dir}")


if __name__ == "__main__":
    main(load_config(description=__doc__))
    exit_run(0)  # under DDP: without interpreter teardown, which can deadlock in torch's process-group destructor
