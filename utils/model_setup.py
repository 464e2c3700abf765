"""The model and its optimizer: the same initial weights on every rank, fine-tuning weights, compilation and its
check, and AdamW with weight decay on matrices only, all set up by Fabric."""

import torch
from lightning.fabric import Fabric
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset, default_collate

import model as model_py
from utils.checkpoint import CheckpointError, load_model_weights
from utils.compile_check import check_compiled_model
from utils.console import print0
from utils.exits import fail
from utils.rng import rng_devices


def setup_model(fabric: Fabric, cfg, lr: float, train_set: Dataset, micro_batch: int, step_loss):
    """The model of model.py (with init_from's weights in a new run), compiled and checked if asked (step_loss(module,
    batch): training_step's loss), and its optimizer, both set up by Fabric. Returns them and the optimizer's group
    sizes."""
    # every rank builds the same initial weights (FSDP2 does not copy rank 0's as DDP does), outside its own stream:
    # manual_seed reseeds the CUDA generators too, so this rank's is restored with the CPU's (its dropout masks)
    with torch.random.fork_rng(devices=rng_devices(fabric.device)):
        torch.manual_seed(cfg.seed)
        model = model_py.make_model(cfg)  # looked up at the call: a test's probe can wrap it
    if cfg.init_from and cfg.resume is None:  # a resumed run continues from its own checkpoint instead
        try:
            print0(load_model_weights(model, cfg.init_from))
        except CheckpointError as err:
            fail(f"init_from={cfg.init_from!r}{err}")
    if cfg.activation_checkpointing:  # before compiling and sharding
        for unit in model_py.sharding_units(model) or [model]:
            recompute_in_backward(unit)
    if cfg.compile:
        torch._inductor.config.fallback_random = True  # dropout draws from torch's generator: checked and resumed alike
        if cfg.strategy == "fsdp2":
            model_py.compile_units(model)  # torch.compile skips an FSDP2 module's forward: each unit compiled instead
        else:
            model = torch.compile(model)
    model = fabric.setup_module(model)  # DDP wraps it, FSDP2 shards it in place
    optimizer, param_groups = make_optimizer(fabric, model, cfg, lr)  # from the (sharded) parameters to train
    optimizer = fabric.setup_optimizers(optimizer)
    if cfg.compile and cfg.compile_check:  # a compiler bug must not train silently (all ranks)
        first_batch = fabric.to_device(default_collate([train_set[i] for i in range(micro_batch)]))
        first_batch = fabric.strategy.precision.convert_input(first_batch)  # as Fabric's forward does (64-true)
        check_compiled_model(fabric, model, first_batch, step_loss, cfg.seed, cfg.precision)
    return model, optimizer, param_groups


def recompute_in_backward(unit: torch.nn.Module) -> None:
    """--activation_checkpointing: the unit's forward keeps only its inputs, and runs again in the backward (torch's
    non-reentrant checkpoint, which restores the random state: the same dropout masks). The module stays in its
    place, so parameter names, and checkpoints, do not change; torch.compile traces through it."""
    forward = unit.forward
    unit.forward = lambda *args, **kwargs: checkpoint(forward, *args, use_reentrant=False, **kwargs)


def make_optimizer(fabric: Fabric, model: torch.nn.Module, cfg, lr: float):
    """AdamW, with weight decay on tensors of 2 or more dimensions only (matrices, kernels, embeddings), not on
    biases and normalization weights. Returns it and the size of each group, for config.yaml."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=fabric.device.type == "cuda")
    sizes = {name: {"tensors": len(group), "params": sum(p.numel() for p in group)}
             for name, group in (("decay", decay), ("no_decay", no_decay))}
    return optimizer, sizes


def clip_gradients(fabric: Fabric, model, optimizer, max_norm: float) -> torch.Tensor:
    """Clips the gradients to max_norm and returns their norm before clipping, on the device (all ranks). Under
    16-mixed the loss scaler unscales them first: Fabric refuses to for an optimizer that unscales in its own step
    (fused AdamW, on CUDA), yet the scaler's step then uses the gradients as they are unscaled here and still skips
    a step with an inf or NaN, without waiting for the device."""
    scaler = getattr(fabric.strategy.precision, "scaler", None)
    if scaler is None:
        return fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)
    scaler.unscale_(optimizer.optimizer)  # the torch optimizer inside Fabric's wrapper
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, error_if_nonfinite=False)
