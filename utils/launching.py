"""Starting a run: Fabric for the configured hardware, and the processes (Fabric's own launcher, or one that has
already started them all)."""

import functools
import logging
import os
import warnings
from datetime import timedelta

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import DoublePrecision
from lightning.fabric.strategies import ModelParallelStrategy
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch.distributed.fsdp import MixedPrecisionPolicy

from model import shard_model
from utils import exits
from utils.batching import planned_world_size
from utils.checkpoint import AtomicCheckpointIO
from utils.exits import fail

# Lightning warns on every run outside srun where SLURM is installed (a login node, a laptop with the local cluster):
# scripts/train.slurm uses srun, and a run outside it is meant to be one
warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")


def launcher_hardware() -> dict:
    """The hardware settings that the launcher which started this process has fixed, to take the place of a run's
    recorded ones: under `fabric run` Fabric's defaults for what it sets (it passes its own values through the
    environment and refuses others given in code); under torchrun or a SLURM batch job the process counts."""
    env = os.environ
    if env.get("LT_CLI_USED"):
        defaults = {"accelerator": "auto", "strategy": "auto", "devices": "auto", "num_nodes": 1, "precision": None}
        return {name: value for name, value in defaults.items() if f"LT_{name.upper()}" in env}
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:  # torchrun
        local = int(env["LOCAL_WORLD_SIZE"])
        return {"devices": local, "num_nodes": int(env["WORLD_SIZE"]) // local}
    # under srun, as Lightning decides (an interactive job name turns it off); SLURM writes "2(x3)" for 3 nodes of 2
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive") \
            and "SLURM_NTASKS_PER_NODE" in env:
        return {"devices": int(env["SLURM_NTASKS_PER_NODE"].split("(")[0]), "num_nodes": int(env["SLURM_NNODES"])}
    return {}


def make_fabric(cfg) -> Fabric:
    """Fabric with atomic, streamed checkpoint files (folders of shards under fsdp2, see utils/checkpoint.py), and
    TF32 on CUDA unless --tf32 false; a hardware setting it rejects is a one-line error."""
    hardware = {"accelerator": cfg.accelerator, "devices": cfg.devices, "num_nodes": cfg.num_nodes}
    try:
        if cfg.strategy != "fsdp2":
            fabric = Fabric(**hardware, strategy=cfg.strategy, precision=cfg.precision, plugins=[AtomicCheckpointIO()])
        else:
            # FSDP2 (model.shard_model) over every process. ModelParallelStrategy takes the data-parallel size up
            # front ("auto" would be the number of nodes), so a first Fabric resolves devices x num_nodes; it refuses
            # a CheckpointIO plugin and the "64-true" string (its plugin works)
            world_size = planned_world_size(Fabric(**hardware, strategy="ddp"))
            shard = functools.partial(shard_model, policy=mixed_precision_policy(cfg.precision))
            strategy = ModelParallelStrategy(shard, data_parallel_size=world_size, tensor_parallel_size=1)
            double = cfg.precision in ("64-true", "64")
            fabric = Fabric(**hardware, strategy=strategy, precision=None if double else cfg.precision,
                            plugins=[DoublePrecision()] if double else None)
    except TypeError as err:  # Fabric's word for devices its accelerator does not take ("-1" or "0,1" on a CPU)
        fail(f"devices={cfg.devices!r} is invalid for accelerator={cfg.accelerator!r}: "
             f"{str(err).strip().splitlines()[0]}")
    except (ValueError, RuntimeError, MisconfigurationException) as err:
        fail(str(err).strip().splitlines()[0])
    if hasattr(fabric.strategy, "_timeout"):  # the process group's, until the first step (see collective_timeout)
        fabric.strategy._timeout = timedelta(minutes=max(60.0, cfg.collective_timeout))
    torch.set_float32_matmul_precision(matmul_precision(cfg.tf32, fabric.device))
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    return fabric


def matmul_precision(tf32: bool, device: torch.device) -> str:
    """torch's float32 matmul precision: "high" (TF32) on CUDA when tf32 is on, else "highest" (full float32)."""
    return "high" if tf32 and device.type == "cuda" else "highest"


def mixed_precision_policy(precision: str | None) -> MixedPrecisionPolicy:
    """FSDP2's dtypes: under bf16- and 16-mixed the weights are gathered in the autocast dtype (half the bytes of
    float32 over the network) and gradients reduced in float32; otherwise as they are."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)


def launch(fabric: Fabric) -> None:
    """Starts the other processes, unless a launcher (torchrun, fabric run) has started all of them already."""
    world_size = planned_world_size(fabric)
    launched = int(os.environ.get("WORLD_SIZE", world_size))  # set by torchrun and fabric run
    if launched != world_size:
        fail(f"the launcher started {launched} processes but devices x num_nodes = {world_size}: "
             f"set --devices (per node) and --num_nodes to match it")
    if fabric.global_rank > 0:  # only global rank 0 prints: not "Initializing distributed: GLOBAL_RANK: 1"
        logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    if not os.environ.get("LT_CLI_USED"):  # under `fabric run` the processes exist already
        fabric.launch()
        exits.LAUNCHED[:] = getattr(fabric.strategy.launcher, "procs", [])  # stopped when a peer fails


def shorten_collective_timeout(minutes: float) -> None:
    """After the first step, a collective waits `minutes` for a process that died or hangs, not the hour allowed
    for compilation and data preparation before it (gloo notices a dead peer at once; NCCL waits)."""
    if torch.distributed.is_initialized():
        torch.distributed.distributed_c10d._set_pg_timeout(timedelta(minutes=minutes))
