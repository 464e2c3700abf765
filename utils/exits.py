"""Leaving a run on purpose: a one-line error on rank 0 and an exit status, with no traceback and no rank left
aborting in teardown."""

import sys
from pathlib import Path
from typing import NoReturn

import torch.distributed
from lightning.fabric.utilities.rank_zero import rank_zero_only


def exit_run(status: int) -> NoReturn:
    """Exits this rank with `status`. Every rank gets here at the same step, so the process group is closed first:
    exiting with it open can abort in teardown ('terminate called without an active exception')."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(status)


def fail(message: str, status: int = 2) -> NoReturn:
    """Bad input (status 2) or a run that cannot go on: one line naming what is wrong, then exit."""
    if rank_zero_only.rank == 0:  # after launch every rank fails alike; one of them says so
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    exit_run(status)
