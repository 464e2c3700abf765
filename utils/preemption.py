"""SIGTERM and SIGUSR1 (what SLURM sends before a time limit or preemption) only set a flag; the training loop
saves a checkpoint at the next optimizer-step boundary and exits with EXIT_PREEMPTED."""

import signal

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a job killed by SIGTERM reports, so schedulers treat it the same way


class StopRequest:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        for signum in signals:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
