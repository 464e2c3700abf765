"""Following the monitored validation metric: best.ckpt takes every strict improvement; early stopping counts the
validations in a row that make no real progress."""

import math

from utils.exits import fail


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


def follow_top_k(top: list, step: int, value: float, better: str, k: int) -> tuple[list, list]:
    """The k best [step, value] pairs after a validation, best first (of equal values the earlier), and those that
    dropped out of them. With k = 1 the list stays empty: best.ckpt alone is kept."""
    if k == 1 or not math.isfinite(value):
        return top, []
    ranked = sorted([*top, [step, value]], key=lambda pair: (pair[1] if better == "min" else -pair[1], pair[0]))
    return ranked[:k], ranked[k:]


def monitor_direction(cfg, metrics) -> str:
    """min or max: which way cfg.monitor improves, from its metric's higher_is_better unless --monitor_mode says. A
    monitor that names no metric of make_metrics, a metric that does not say without --monitor_mode, and a mode
    against the metric are each one line (exit 2)."""
    name = cfg.monitor.removeprefix("val_")
    if not cfg.monitor.startswith("val_") or name not in metrics:
        fail(f"monitor={cfg.monitor!r} is invalid: expected one of {', '.join(f'val_{n}' for n in metrics)} (the "
             f"metrics of make_metrics in train.py)")
    says = {True: "max", False: "min"}.get(getattr(metrics[name], "higher_is_better", None))
    if says is None and cfg.monitor_mode is None:
        fail(f"monitor_mode is needed for monitor={cfg.monitor!r}: its metric does not say whether higher is "
             f"better (higher_is_better); give --monitor_mode min or max")
    if says is not None and cfg.monitor_mode not in (None, says):
        fail(f"monitor_mode={cfg.monitor_mode!r} is invalid: expected {says}: a higher {cfg.monitor} is "
             f"{'better' if says == 'max' else 'worse'}")
    return cfg.monitor_mode or says
