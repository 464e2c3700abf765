"""Starting a run: Fabric for the configured hardware, and the processes (Fabric's own launcher, or one that has
already started them all)."""

import logging
import os
import warnings

from lightning.fabric import Fabric
from lightning.fabric.utilities.exceptions import MisconfigurationException

from utils.batching import planned_world_size
from utils.checkpoint import AtomicCheckpointIO
from utils.exits import fail

# Lightning warns on every run outside srun where SLURM is installed (a login node, a laptop with the local cluster):
# scripts/train.slurm uses srun, and a run outside it is meant to be one
warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")


def make_fabric(cfg) -> Fabric:
    """Fabric with atomic, streamed checkpoint files; a hardware setting it rejects is a one-line error."""
    try:
        return Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                      strategy=cfg.strategy, precision=cfg.precision, plugins=[AtomicCheckpointIO()])
    except (ValueError, RuntimeError, MisconfigurationException) as err:
        fail(str(err).strip().splitlines()[0])


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
