"""A guard against miscompiled gradients. torch.compile can return a right forward pass and wrong gradients (torch
2.13.0's inductor zeroes the convolution gradients of the default CNN on CPU), and a run then just trains badly.
Before training with --compile, the model set up by Fabric is compared once with itself in eager mode
(torch.compiler.set_stance): the same first batch, the initial weights and the same random state (inductor's
fallback_random makes dropout draw from torch's generator)."""

import contextlib
import time

import torch
from lightning.fabric import Fabric
from torch.distributed.tensor import DTensor

from utils.checkpoint import COMPILED, SHARDED
from utils.console import print0
from utils.exits import fail
from utils.rng import rng_devices

GRADIENT_FLOOR = 1e-3  # gradients below this fraction of the largest are compared at that scale


def tolerance(precision: str | None) -> float:
    """Largest relative difference of a gradient that still counts as the same: what reordered arithmetic gives."""
    if precision in (None, "32-true", "32", "64-true", "64"):
        return 1e-3
    return 5e-2  # 16- and bf16-bit arithmetic: measured up to about 0.6% on the default CNN


def compiled_gradient_error(fabric: Fabric, model, batch, step_loss, seed: int) -> tuple[str, float]:
    """All ranks: (name, relative difference) of the parameter (or 'loss') whose compiled gradient differs most from
    eager mode's (the same modules with compilation switched off), worst over every rank, so that every rank reaches
    the same verdict. A gradient's difference is relative to its own norm, but never to less than GRADIENT_FLOOR x
    the largest gradient's norm: a gradient that is zero in exact arithmetic (computed as 1e-13 one way and 0 the
    other) does not fail a right compile, while a wrong one of any real size does. No gradient is accumulated and
    no random state is consumed."""
    names, params = zip(*[(name.replace(COMPILED, ""), p) for name, p in model.module.named_parameters()
                          if p.requires_grad], strict=True)  # names as in a checkpoint

    def loss_and_gradients() -> tuple[torch.Tensor, list]:
        with torch.random.fork_rng(devices=rng_devices(fabric.device)):
            torch.manual_seed(seed)
            with fabric.autocast():  # both under the run's precision
                # the module inside Fabric's wrapper (which insists on fabric.backward)
                loss = step_loss(model._forward_module, batch)
            loss.backward()  # FSDP2 hands gradients to its sharded parameters in .grad only, not to autograd.grad
        gradients = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]  # this rank's shard
        for p in params:
            p.grad = None
        return loss.detach().float(), gradients

    # each rank's own gradients (DDP: no all-reduce); FSDP2 can only reduce-scatter them, in both passes alike
    with contextlib.nullcontext() if isinstance(fabric.strategy, SHARDED) else fabric.no_backward_sync(model):
        with torch.compiler.set_stance("force_eager"):
            eager_loss, eager_grads = loss_and_gradients()
        compiled_loss, compiled_grads = loss_and_gradients()
    errors = [(compiled_loss - eager_loss).abs() / eager_loss.abs().clamp_min(1e-12)]
    zero = torch.zeros((), device=fabric.device)
    pairs = [(zero if eager is None else eager.float(), zero if compiled is None else compiled.float())
             for eager, compiled in zip(eager_grads, compiled_grads, strict=True)]  # None: took no part
    norms = torch.stack([eager.norm() for eager, _ in pairs] or [zero])  # a model without parameters has none
    floor = fabric.all_reduce(norms.max(), reduce_op="max") * GRADIENT_FLOOR  # all ranks: the largest gradient's
    errors += [gradient_error(eager_grad, compiled_grad, floor) for eager_grad, compiled_grad in pairs]
    errors = fabric.all_reduce(torch.stack(errors), reduce_op="max")  # all ranks
    worst = int(errors.argmax())
    return ("loss", *names)[worst], float(errors[worst])


def gradient_error(eager: torch.Tensor, compiled: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """How far a compiled gradient is from eager mode's: relative to the eager gradient's norm, or to `floor` where
    that is smaller (an exactly-zero gradient that rounding makes 1e-13 has no scale of its own)."""
    difference = (compiled - eager).norm()
    return difference / torch.maximum(eager.norm(), floor).clamp_min(1e-12) if difference > 0 else difference


def check_compiled_model(fabric: Fabric, model, batch, step_loss, seed: int, precision: str | None) -> None:
    """All ranks: stops the run (exit 2, nothing written) if the compiled model's loss or a gradient differs from
    eager mode's by more than the precision explains; else says how close they are and what the check cost."""
    started = time.perf_counter()
    name, error = compiled_gradient_error(fabric, model, batch, step_loss, seed)
    limit = tolerance(precision)
    what = "loss" if name == "loss" else f"gradient of {name}"
    if error > limit:
        fail(f"compile=True: the compiled model's {what} differs from eager mode's by {error:.3g} (relative; at most "
             f"{limit:g} expected): a compiler bug. Train with --compile false, or skip this check with "
             f"--compile_check false")
    print0(f"compile check passed in {time.perf_counter() - started:.1f} s: the compiled model's loss and gradients "
           f"match eager mode's (largest relative difference {error:.2g}, in the {what})")
