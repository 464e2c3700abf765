"""The learning rate as a pure function of the optimizer step: linear warmup, then decay to min_lr_ratio x peak.

Nothing is stored: a resume, or another number of devices at the same eff_batch_size, gives the same LR at the same
step.
"""

import math

SCHEDULES = ("cosine", "linear", "exponential", "constant")


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """LR of optimizer step `step` (counting from 1). Warmup step s uses peak x s / warmup_steps, so the peak is
    reached at step warmup_steps; the decay then ends at min_lr_ratio x peak on step total_steps."""
    if step <= warmup_steps:
        return peak * step / warmup_steps
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))  # (0, 1]
    if schedule == "cosine":
        return peak * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if schedule == "linear":
        return peak * (1 - (1 - min_lr_ratio) * progress)
    return peak * min_lr_ratio ** progress  # exponential
