"""Leaving a run on purpose: a one-line error on rank 0 and an exit status, with no traceback, and no rank left
hanging or aborting in teardown."""

import atexit
import os
import re
import sys
from collections.abc import Callable
from contextlib import contextmanager
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


def on_rank_zero(fabric, stage: str, function: Callable):
    """All ranks: function() on global rank 0 only; its result there, None elsewhere. Its failure (a folder that
    cannot be written, a logger that cannot start) is one line and exit 1 on every rank, which would otherwise wait
    for rank 0 in their next collective."""
    result = error = None
    if fabric.is_global_zero:
        try:
            result = function()
        except Exception as err:  # whatever it is, every rank must hear of it
            error = f"{stage} failed on rank 0: {type(err).__name__}: {str(err).strip().splitlines()[0]}"
    error = fabric.broadcast(error)  # all ranks
    if error:
        fail(error, status=1)
    return result


LAUNCHED: list = []  # the processes Fabric's launcher started beside this one (utils/launching.py)
PEER_FAILURES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out", "timed out",
                 "NCCL")


@contextmanager
def peer_failures_reported():
    """A collective that fails because another process of the run died (killed, out of memory) or stopped answering
    (hung, past --collective_timeout) ends this process with one line on each surviving rank and exit 1; the
    processes Fabric started beside it are stopped too. The checkpoints are whole: the run resumes."""
    try:
        yield
    except RuntimeError as err:  # gloo's and NCCL's errors (DistBackendError is one)
        if not torch.distributed.is_initialized() or not any(sign in str(err) for sign in PEER_FAILURES):
            raise
        for process in LAUNCHED:
            process.kill()
        reason = re.sub(r"^\[[^\]]*\] ", "", str(err).strip().splitlines()[0]).split(". ")[0]  # gloo's source line
        tqdm.write(f"{Path(sys.argv[0]).name}: error: rank {torch.distributed.get_rank()}: another process of this "
                   f"run died or stopped answering ({reason}); the checkpoints are whole: run the same command with "
                   f"--resume auto to continue", file=sys.stderr)
        exit_run(1)
