r"""Train a model with an explicit loop on lightning.fabric. Read it top to bottom; edit it freely.

Fabric places devices, starts processes and handles precision; everything else is in this file. Your task is in
training_step, loss_weight, make_metrics and validation_step just below, make_datasets (data.py) and make_model
(model.py).

    python train.py                                          # whatever hardware is here
    python train.py --accelerator cpu --devices 2            # DDP over 2 CPU processes (gloo)
    python train.py --precision bf16-mixed --devices 4       # 4 GPUs, bf16 autocast
    python train.py --strategy fsdp2 --devices 8 --precision bf16-mixed   # sharded (FSDP2: model.shard_model)
    python train.py --log_per_epoch 4 --logger_name tensorboard csv --checkpoint_frequency 5 --comment "note"
    python train.py --config_path my.yaml --epochs 20        # a YAML file, then flags on top
    python train.py --config_path configs/shakespeare_char.yaml   # a character-level GPT (nanoGPT's CPU recipe)
    python train.py --config_path configs/shakespeare_char.yaml --data.streaming true   # its data streamed (litdata)
    python train.py --resume runs/20261122-104500-train_out  # continue that run
    python train.py --resume auto                            # the newest unfinished run, else a new one
    torchrun --nproc_per_node 4 train.py --devices 4
    torchrun --nnodes 2 --node_rank R --nproc_per_node 4 --master_addr HOST --master_port 29500 \
        train.py --devices 4 --num_nodes 2
    fabric run --accelerator cuda --devices 4 train.py
    sbatch scripts/train.slurm                               # SLURM: srun python train.py ...
"""

import contextlib
import math
import sys
import time

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torchmetrics import MetricCollection

from config import Config, load_config, settings_record
from data import IGNORE_INDEX, num_classes
from model import make_model
from utils.batching import loss_weights, plan_batches, planned_world_size, scaled_lr
from utils.checkpoint import (
    BEST,
    CheckpointError,
    checkpoint_name,
    finish_saves,
    remove_top_k,
    save_checkpoint,
    top_k_name,
)
from utils.console import print0, progress_bar
from utils.datasets import load_datasets, make_loaders
from utils.early_stopping import follow_top_k, follow_validation, monitor_direction
from utils.ema import EMA
from utils.evaluation import run_evaluation
from utils.exits import exit_run, fail, on_rank_zero, peer_failures_reported
from utils.launching import launch, make_fabric, shorten_collective_timeout
from utils.loggers import close_loggers, is_log_step, log_hparams_table
from utils.loss_check import check_losses_and_votes, check_validation, split_step_output
from utils.lr_schedule import lr_at
from utils.metrics import Accuracy, ConfusionMatrix, MeanLoss
from utils.model_setup import clip_gradients, setup_model
from utils.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, StopRequest
from utils.resume import nothing_to_train, resume_state
from utils.rng import gather_rng
from utils.run_dir import check_writable, claim_run_dir
from utils.run_start import start_records
from utils.sweep_trial import SweepTrial
from utils.throughput import Speed

# -- your task: these four functions, make_datasets (data.py) and make_model (model.py) ---------------------------

def training_step(model, batch, cfg: Config) -> torch.Tensor | dict:
    """The loss of one micro-batch, a scalar tensor, or a dict holding it under "loss" beside other scalar tensors to
    log (as train_<name>, averaged over the log window). Keep the loss a mean over what loss_weight counts."""
    inputs, targets = batch
    logits = model(inputs)  # (batch, classes) or (batch, time, vocabulary)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)


def loss_weight(batch, cfg: Config) -> torch.Tensor | None:
    """What training_step's loss is a mean over, counted on the device: here the scored targets (samples; tokens of
    padded text). A step's loss is then the mean over all of them in all its micro-batches on all devices, as if one
    batch (a mean of per-micro-batch means would weigh a token of a short batch more). None: micro-batches weigh
    the same (samples that count alike; it saves an all-reduce per step)."""
    return (batch[1] != IGNORE_INDEX).sum()


def make_metrics(cfg: Config) -> MetricCollection:
    """The validation and test metrics, logged as val_<name> and test_<name>. A metric's higher_is_better gives
    --monitor its direction; a metric whose value is a matrix (a confusion matrix) is drawn by test.py's report.
    These never make the host wait for the device until compute() (see utils/metrics.py)."""
    metrics = {"loss": MeanLoss(), "acc": Accuracy()}
    if cfg.data.dataset == "digits":
        metrics["confusion"] = ConfusionMatrix(num_classes(cfg))
    return MetricCollection(metrics)


def validation_step(model, batch, metrics: MetricCollection, cfg: Config) -> None:
    """Updates the metrics with one batch (per scored target: the padded end of a text split is not scored)."""
    inputs, targets = batch
    logits = model(inputs).flatten(0, -2).float()  # (samples or tokens, classes)
    targets = targets.flatten()
    scored = targets != IGNORE_INDEX  # a weight, not a mask: cutting with a mask waits for the device
    losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    predictions = logits.argmax(-1)
    metrics["loss"].update(losses, weight=scored)
    metrics["acc"].update(predictions == targets, weight=scored)
    if "confusion" in metrics:
        metrics["confusion"].update(predictions, targets)

# -------------------------------------------------------------------------------------------------------------------


def evaluate(fabric: Fabric, model, loader, cfg: Config) -> dict:
    """{metric name: value} of make_metrics over `loader` once, through validation_step, and the number of samples
    (validation here, the test split in test.py). All ranks: the metrics sync across processes."""
    return run_evaluation(fabric, model, loader, cfg, make_metrics(cfg), validation_step)


def step_loss(model, batch, cfg: Config) -> torch.Tensor:
    """training_step's loss alone: what the compile check and the FLOP count differentiate."""
    return split_step_output(training_step(model, batch, cfg))[0]


def main(cfg: Config) -> None:
    # -- setup: the batch split is checked before any process starts ------------------------------------------
    fabric = make_fabric(cfg)
    try:
        batches = plan_batches(cfg.eff_batch_size, planned_world_size(fabric), cfg.micro_batch_size)
    except ValueError as err:
        fail(str(err))
    lr = scaled_lr(cfg.base_lr, cfg.eff_batch_size, cfg.base_batch_size, cfg.lr_scaling_rule)
    launch(fabric)
    cfg = fabric.broadcast(cfg)  # all ranks: rank 0's settings, and the run its --resume chose
    check_writable(fabric, cfg)  # all ranks: a run folder that cannot be written fails now, not after setup
    stop = StopRequest()  # SIGTERM, SIGUSR1, Ctrl-C only set a flag; the loop saves and exits (utils/preemption.py)
    # each rank draws its own dropout masks (the initial weights are the same everywhere: see setup_model)
    fabric.seed_everything(cfg.seed + fabric.global_rank, verbose=False)

    # -- data: every optimizer step sees the same eff_batch_size samples on any number of devices -------------
    train_set, val_set, _ = load_datasets(fabric, cfg)
    better = monitor_direction(cfg, make_metrics(cfg))  # --monitor names a metric: checked before the model is built
    train_steps, val_loader = make_loaders(fabric, cfg, train_set, val_set, batches)  # all ranks
    steps_per_epoch = train_steps.steps_per_epoch
    if steps_per_epoch == 0:
        fail(f"eff_batch_size={cfg.eff_batch_size} is larger than the training set ({train_steps.dataset_size} "
             f"samples)")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch  # max_steps alone ends the run when set
    if cfg.warmup_steps >= total_steps:
        fail(f"warmup_steps={cfg.warmup_steps} is invalid: expected fewer than the run's {total_steps} steps")

    # -- model and optimizer ---------------------------------------------------------------------------------------
    model, optimizer, param_groups = setup_model(fabric, cfg, lr, train_set, batches.micro,
                                                 lambda module, batch: step_loss(module, batch, cfg))
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None  # validated, saved and read in place of the weights

    # speed at log steps: samples (tokens) per second; on a GPU also FLOPs per second and MFU, from one FLOP count
    speed = Speed(fabric, cfg, train_set[0], batches, lambda: make_model(cfg), lambda m, b: step_loss(m, b, cfg))

    # -- run folder: a new one, or the resumed run's; locked by rank 0 before anything in it is touched ----------
    run_dir, resume_file = claim_run_dir(fabric, cfg)  # all ranks
    ckpt_dir = run_dir / "checkpoints"
    trial = SweepTrial(fabric, run_dir)  # a trial of sweep.py's study, or nothing
    resumed = cfg.resume is not None

    # -- checkpointed state: fabric.save / fabric.load convert the model and optimizer to state_dicts ----------
    state = {"model": model, "optimizer": optimizer, "global_step": 0, "epoch": 0, "config": {},
             "world_size": fabric.world_size, "log_loss_sum": 0.0, "log_loss_steps": 0, "finished": False,
             "log_extra_sums": {}, "best_value": None, "best_step": None, "stop_reference": None,
             "bad_validations": 0, "top_k": []}
    scaler = getattr(fabric.strategy.precision, "scaler", None)  # 16-mixed: the loss scale must survive too
    state |= {name: value for name, value in (("scaler", scaler), ("ema", ema)) if value is not None}
    if hasattr(train_steps, "state_dict"):  # streamed data: litdata's position in the epoch
        state["train_data"] = train_steps

    # -- resume: the named checkpoint, or the newest that opens (corrupt ones are moved aside) -------------------
    resumed_from = resume_state(fabric, cfg, ckpt_dir, resume_file, state, batches) if resumed else None
    start_step = state["global_step"]
    if resumed and (finished := nothing_to_train(cfg, run_dir, state, total_steps)):
        print0(finished)
        exit_run(0)

    # -- the run's record and loggers: config.yaml at the first start, what each resume changed -------------------
    derived = {"world_size": fabric.world_size, "per_device_batch_size": batches.per_device,
               "accum_steps": batches.accum_steps, "micro_batch_size": batches.micro, "lr": lr,
               "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "param_groups": param_groups}
    settings = settings_record(cfg)
    hyperparams = {**settings, **derived}
    # all ranks: rank 0 moves a branch's newer checkpoints aside, records the run and its code, and starts the loggers
    # (they live on rank 0 only: fabric.log_dict is a no-op elsewhere); a failure there stops every rank
    fabric._loggers = on_rank_zero(fabric, "recording the run", lambda: start_records(
        fabric, cfg, run_dir, settings, derived, start_step, resumed_from, resume_file)) or []
    if resumed_from is not None:
        print0(f"resumed from {resumed_from} at step {start_step}")
    print0(f"run folder {run_dir}: {fabric.world_size} process(es) x {batches.per_device} samples "
           f"({batches.accum_steps} x {batches.micro}) = {cfg.eff_batch_size} per step, {total_steps} steps, "
           f"peak lr {lr:.3g}")

    # -- training loop -------------------------------------------------------------------------------------------
    global_step = start_step
    log_loss_sum, log_loss_steps = state["log_loss_sum"], state["log_loss_steps"]  # carried across a resume
    log_extra_sums = state["log_extra_sums"]  # {name: sum over the window} of training_step's other values
    best_value, stop_reference, bad_validations = state["best_value"], state["stop_reference"], \
        state["bad_validations"]  # best.ckpt, and early stopping's reference (utils/early_stopping.py)
    top_k = state["top_k"]  # the --save_top_k best [step, value] pairs
    window_start, window_steps = time.perf_counter(), 0  # throughput: training time of this process only
    unsynced_steps = []  # this rank's loss (and other values) of each step since the last log, validation or checkpoint
    stop_early = False
    progress = progress_bar(total_steps, start_step, enabled=fabric.is_global_zero)
    model.train()  # dropout on: a model may come in eval mode (Hugging Face's from_pretrained returns one)
    for epoch in range(start_step // steps_per_epoch, math.ceil(total_steps / steps_per_epoch)):
        # a resumed epoch skips the steps it has seen
        for micro_batches in train_steps.epoch(epoch, global_step - epoch * steps_per_epoch):
            # -- the micro-batches, then the optimizer step (the loss itself: training_step at the top) -------------
            # each micro-batch's loss weighs by its share of the step's scored items on all ranks (all ranks)
            weights = loss_weights(fabric, [loss_weight(batch, cfg) for batch in micro_batches])
            step_values = 0  # the step's loss and other values, on the device: reading them would wait for it
            for micro_step, batch in enumerate(micro_batches):
                # no gradient all-reduce on micro-steps that do not step the optimizer
                with fabric.no_backward_sync(model, enabled=micro_step < batches.accum_steps - 1):
                    loss, extras = split_step_output(training_step(model, batch, cfg))
                    fabric.backward(loss * weights[micro_step])
                extra_names = list(extras)
                step_values = step_values + torch.stack([loss.detach().float(), *extras.values()]) * weights[micro_step]
            for group in optimizer.param_groups:  # the LR is a function of the step alone: the same after a resume
                group["lr"] = lr_at(global_step + 1, lr, cfg.warmup_steps, total_steps, cfg.lr_schedule,
                                    cfg.min_lr_ratio)
            # the gradient norm before clipping; without clipping only where it is logged (it would add no sync)
            log_now = is_log_step(cfg, global_step + 1, steps_per_epoch, total_steps)
            if cfg.grad_clip is not None or log_now:
                grad_norm = clip_gradients(fabric, model, optimizer, cfg.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            # -----------------------------------------------------------------------------------------------------

            global_step += 1
            if global_step == start_step + 1:  # compiled and loaded: a dead or hung peer is now noticed sooner
                shorten_collective_timeout(cfg.collective_timeout)
            window_steps += 1
            unsynced_steps.append(step_values)
            progress.update(1)
            end_of_epoch, last_step = global_step % steps_per_epoch == 0, global_step == total_steps
            # validate and save every val_every_n_steps / checkpoint_every_n_steps (else by epochs), and at the end
            validate = last_step or (global_step % cfg.val_every_n_steps == 0 if cfg.val_every_n_steps
                                     else end_of_epoch)
            periodic = global_step % cfg.checkpoint_every_n_steps == 0 if cfg.checkpoint_every_n_steps \
                else end_of_epoch and (global_step // steps_per_epoch) % cfg.checkpoint_frequency == 0

            # all ranks, at log, validation and checkpoint steps only (the host waits for the device nowhere else): the
            # losses since then, checked, and any rank's stop request (one process needs no vote: it stops at once)
            stop_votes = interrupt_votes = 0
            if log_now or validate or periodic or (stop.requested and fabric.world_size == 1):
                rows, stop_votes, interrupt_votes = check_losses_and_votes(fabric, unsynced_steps, stop, global_step)
                for loss_value, *extra_values in rows:  # step by step: a resume sums in the same order
                    log_loss_sum += loss_value
                    log_extra_sums = {name: log_extra_sums.get(name, 0.0) + value
                                      for name, value in zip(extra_names, extra_values, strict=True)}
                log_loss_steps += len(rows)
                unsynced_steps.clear()

            # log: the training loss at log steps, validation in the same row
            metrics = {}
            if log_now:
                metrics = {"train_loss": log_loss_sum / log_loss_steps, "lr": optimizer.param_groups[0]["lr"],
                           "grad_norm": grad_norm.item(),
                           **{f"train_{name}": value / log_loss_steps for name, value in log_extra_sums.items()},
                           **speed.rates(window_steps, time.perf_counter() - window_start)}
                progress.set_postfix(loss=f"{metrics['train_loss']:.4f}", refresh=False)  # drawn at the bar's pace
                log_loss_sum, log_loss_steps, log_extra_sums, window_steps = 0.0, 0, {}, 0
                window_start = time.perf_counter()
            paused = time.perf_counter()  # validation and checkpoints do not count as training time

            # validate, and follow the best value
            improved = ranked_in = False
            if validate:
                with ema.swapped_in() if ema else contextlib.nullcontext():  # the average, where there is one
                    val = evaluate(fabric, model, val_loader, cfg)  # all ranks: every rank gets the same values
                check_validation(val, global_step, fabric.loggers)  # a NaN stops every rank before it can be "best"
                metrics |= {f"val_{name}": value for name, value in val.items() if isinstance(value, float)}
                if total_steps >= steps_per_epoch:  # epochs mean something only in a run that covers one
                    metrics["epoch"] = global_step / steps_per_epoch
                where = f" (epoch {metrics['epoch']:.2f})" if "epoch" in metrics else ""
                val_scalars = [name for name in metrics if name.startswith("val_")]
                print0(f"step {global_step}{where}: " + ", ".join(f"{name.replace('_', ' ')} {metrics[name]:.4f}"
                                                                   for name in val_scalars))
                if best_value is None:  # the run's first validation: TensorBoard's table gets its scalar metrics
                    log_hparams_table(fabric.loggers, hyperparams, val_scalars)
                value = val[cfg.monitor.removeprefix("val_")]
                improved, best_value, stop_reference, bad_validations = follow_validation(
                    value, better, best_value, stop_reference, bad_validations, cfg.early_stop_min_delta)
                top_k, dropped = follow_top_k(top_k, global_step, value, better, cfg.save_top_k)
                ranked_in = [global_step, value] in top_k
                pruned = trial.pruned(fabric, value, global_step)  # under sweep.py its pruner may stop the run
                stop_early = pruned or cfg.early_stop_patience > 0 and bad_validations >= cfg.early_stop_patience
                if stop_early:
                    metrics["stopped_early"] = 1
            if metrics:
                fabric.log_dict(metrics, step=global_step)

            # checkpoints: periodic, at the end, when stopping, best.ckpt on each improvement, the k best (all ranks)
            due = periodic or last_step or stop_early or stop_votes
            if due or improved or ranked_in:
                state.update(global_step=global_step, epoch=global_step // steps_per_epoch, rng=gather_rng(fabric),
                             config=settings, world_size=fabric.world_size, log_loss_sum=log_loss_sum,
                             log_loss_steps=log_loss_steps, log_extra_sums=log_extra_sums,
                             finished=last_step or stop_early, best_value=best_value,
                             best_step=global_step if improved else state["best_step"],
                             stop_reference=stop_reference, bad_validations=bad_validations, top_k=top_k)
                try:  # each save copies the state and returns; the file is written and fsynced in the background
                    if improved:
                        save_checkpoint(fabric, ckpt_dir, BEST, state)
                    if ranked_in:  # one of the k best: those it pushed out go
                        save_checkpoint(fabric, ckpt_dir, top_k_name(global_step, cfg.monitor, value), state)
                        if fabric.is_global_zero:
                            remove_top_k(ckpt_dir, dropped, cfg.monitor)
                    if due:
                        path = save_checkpoint(fabric, ckpt_dir, checkpoint_name(state["epoch"], global_step), state,
                                               keep=cfg.num_checkpoint_keep, protect=resumed_from)
                    if last_step or stop_early or stop_votes:
                        finish_saves(fabric)  # the last checkpoint is on disk before the run says it is
                except CheckpointError as err:
                    fail(str(err), status=1, loggers=fabric.loggers)
            if stop_votes:
                progress.close()  # the bar ends its line before the last message
                how = "interrupted (Ctrl-C)" if interrupt_votes else "stop requested"
                print0(f"{how}: saved {path} at step {global_step}; continue with: python train.py --resume {run_dir}",
                       file=sys.stderr)
                exit_run(EXIT_INTERRUPTED if interrupt_votes else EXIT_PREEMPTED, fabric.loggers)
            if stop_early and pruned:
                print0(f"pruned by the sweep at step {global_step} ({cfg.monitor} {value:.4f}); saved {path}")
            elif stop_early:
                print0(f"early stop at step {global_step}: {cfg.monitor} beat {stop_reference:.4f} by no more than "
                       f"{cfg.early_stop_min_delta} in {cfg.early_stop_patience} validation(s) in a row "
                       f"(best {best_value:.4f} at step {state['best_step']}); saved {path}")
            if last_step or stop_early:
                break
            window_start += time.perf_counter() - paused
        if stop_early:
            break
    progress.close()
    close_loggers(fabric.loggers, "success")
    print0(f"done: {run_dir}")


if __name__ == "__main__":
    with peer_failures_reported():  # a process of the run that died or hangs: one line on every other, exit 1
        main(load_config(description=__doc__))
    exit_run(0, teardown=False)  # saves the second that freeing torch and lightning takes (utils/exits.py)
