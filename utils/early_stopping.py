"""Following the monitored validation metric: best.ckpt takes every strict improvement; early stopping counts the
validations in a row that make no real progress."""

import math


def follow_validation(value: float, better: str, best: float | None, reference: float | None, bad_validations: int,
                      min_delta: float) -> tuple[bool, float | None, float | None, int]:
    """(improved, best, reference, bad_validations) after a validation scored `value` (better: min or max).

    `improved` is a strict gain over the best (best.ckpt follows it). Early stopping compares with `reference`, which
    moves only when a validation beats it by more than min_delta, as Lightning's and Keras' EarlyStopping do: slow
    steady progress adds up against a fixed reference instead of being measured one small step at a time."""
    def gain(over: float | None) -> float:
        return math.inf if over is None else over - value if better == "min" else value - over

    improved = gain(best) > 0
    if gain(reference) > min_delta:
        reference, bad_validations = value, 0
    else:
        bad_validations += 1
    return improved, value if improved else best, reference, bad_validations
