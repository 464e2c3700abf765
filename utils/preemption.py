"""Stopping cleanly. SIGTERM and SIGUSR1 (what SLURM sends before a time limit or preemption) and the first Ctrl-C
(SIGINT) only set a flag: the training loop saves a checkpoint and exits with EXIT_PREEMPTED, or EXIT_INTERRUPTED
after Ctrl-C. One process does so after the current optimizer step; several processes at the next log, validation
or checkpoint step, where they vote (a vote every step would make the host wait for the device every step). A second
Ctrl-C stops at once; the checkpoints already written stay intact (saves are atomic)."""

import os
import signal
import sys
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a job killed by SIGTERM reports, so schedulers treat it the same way
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a program stopped by Ctrl-C


class StopRequest:
    def __init__(self):
        self.requested = self.interrupted = False
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.interrupted:  # the second Ctrl-C
            if rank_zero_only.rank == 0:
                os.write(2, f"\n{Path(sys.argv[0]).name}: second Ctrl-C: stopped at once, without saving; the "
                            f"checkpoints written before are intact\n".encode())
            os._exit(EXIT_INTERRUPTED)
        self.interrupted = self.interrupted or signum == signal.SIGINT
        self.requested = True
