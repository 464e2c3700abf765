"""Starting the processes of a run: Fabric's own launcher, or one that has already started them all."""

import os

from lightning.fabric import Fabric

from utils.batching import planned_world_size
from utils.exits import fail


def launch(fabric: Fabric) -> None:
    """Starts the other processes, unless a launcher (torchrun, fabric run) has started all of them already."""
    world_size = planned_world_size(fabric)
    launched = int(os.environ.get("WORLD_SIZE", world_size))  # set by torchrun and fabric run
    if launched != world_size:
        fail(f"the launcher started {launched} processes but devices x num_nodes = {world_size}: "
             f"set --devices (per node) and --num_nodes to match it")
    if not os.environ.get("LT_CLI_USED"):  # under `fabric run` the processes exist already
        fabric.launch()
