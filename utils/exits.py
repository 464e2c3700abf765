"""Leaving a run on purpose: a one-line error on rank 0 and an exit status, with no traceback, and no rank left
hanging or aborting in teardown."""

import atexit
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch.distributed
from lightning.fabric.utilities.rank_zero import rank_zero_only
from tqdm import tqdm

from utils.checkpoint import wait_for_writes
from utils.loggers import close_loggers
from utils.preemption import EXIT_PREEMPTED


def exit_run(status: int, loggers=(), teardown: bool = True) -> NoReturn:
    """Finishes checkpoint writes, closes the loggers and exits this rank with `status`.

    Without `teardown` (at the end of a script), or under DDP, the process leaves without interpreter teardown:
    freeing everything torch, lightning and dynamo imported takes about a second after every run, and under DDP
    torch's gloo process-group destructor can deadlock in it (it joins its worker thread while holding the GIL, or
    aborts with 'terminate called without an active exception'). One process still runs its atexit handlers.
    """
    for failure in wait_for_writes():  # a checkpoint still being written in the background is finished first
        if rank_zero_only.rank == 0:
            tqdm.write(f"{Path(sys.argv[0]).name}: error: {failure}", file=sys.stderr)
        status = status or 1
    close_loggers(loggers, "success" if status in (0, EXIT_PREEMPTED) else "failed")
    if not torch.distributed.is_initialized():
        if teardown:
            sys.exit(status)
        atexit._run_exitfuncs()  # what sys.exit would run before the teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def fail(message: str, status: int = 2, loggers=()) -> NoReturn:
    """Bad input (status 2) or a run that cannot go on: one line naming what is wrong, then exit."""
    if rank_zero_only.rank == 0:  # after launch every rank fails alike; one of them says so
        tqdm.write(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)  # below an open progress bar
    exit_run(status, loggers)
