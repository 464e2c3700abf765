"""What a run prints: only global rank 0 prints, and every message goes through tqdm, so that an open progress bar
keeps its own line. Where standard error is not a terminal (a SLURM log, nohup, CI), the bar redraws at most every
FILE_REFRESH_SECONDS instead of ten times a second."""

import sys

from lightning.fabric.utilities.rank_zero import rank_zero_only
from tqdm import tqdm

FILE_REFRESH_SECONDS = 30


@rank_zero_only
def print0(*values, file=None) -> None:
    """print() on global rank 0, written through tqdm: the bar is cleared, the line printed, the bar redrawn."""
    tqdm.write(" ".join(str(value) for value in values), file=file)


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    refresh = 0.1 if sys.stderr.isatty() else FILE_REFRESH_SECONDS
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, mininterval=refresh,
                maxinterval=max(refresh, 10))
