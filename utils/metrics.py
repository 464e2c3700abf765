"""Validation metrics that never make the host wait for the device until compute(), and that keep a NaN.

torchmetrics' aggregations check every update for NaN (reading the answer back: on a GPU a wait per batch) and by
default drop what they find, so weights gone NaN could validate as the best ever. Its classification metrics cut
ignored targets out with a boolean mask and count with bincount, both of which wait for a GPU. These sum on the
device instead; train.py stops a run whose validation comes out NaN or infinite (utils/loss_check.py)."""

import torch
from torchmetrics import Metric


class Mean(Metric):
    """A weighted mean, update(values, weight=1), that keeps NaN. It does not say which way is better. (torchmetrics'
    MeanMetric with its NaN check off, nan_strategy="disable", ignores the weights.)"""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, values, weight=1.0) -> None:
        values = torch.as_tensor(values, device=self.device).float()
        weight = torch.broadcast_to(torch.as_tensor(weight, device=self.device).float(), values.shape)
        self.total += (values * weight).sum()
        self.weight += weight.sum()

    def compute(self) -> torch.Tensor:
        return self.total / self.weight


class MeanLoss(Mean):
    higher_is_better = False  # tells --monitor val_loss which way is better


class Accuracy(Mean):
    """The share of right predictions: update(predictions == targets, weight)."""

    higher_is_better = True


class ConfusionMatrix(Metric):
    """Counts of (target, prediction) pairs: row = target class, column = predicted class."""

    full_state_update = False

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes
        self.add_state("counts", torch.zeros(classes * classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        self.counts.index_add_(0, targets * self.classes + predictions, torch.ones_like(targets))

    def compute(self) -> torch.Tensor:
        return self.counts.reshape(self.classes, self.classes)
