"""One pass of validation or test: train.py's validation_step over a loader on every rank, then the metrics of
make_metrics computed across ranks."""

import copy

import torch
from lightning.fabric import Fabric
from torchmetrics import MetricCollection

from utils.checkpoint import SHARDED


@torch.no_grad()
def run_evaluation(fabric: Fabric, model, loader, cfg, metrics, validation_step) -> dict:
    """{metric name: value} of `metrics` (a MetricCollection or a dict of metrics) over `loader` once (a number, or a
    nested list for a matrix), and the number of samples. All ranks: the metrics sync across processes in
    compute()."""
    model.eval()
    for metric in metrics.values():
        metric.to(fabric.device)
    # FSDP gathers weights inside forward, so all ranks must forward equally often: agreed before the first (all ranks)
    forwards = len(loader)
    if isinstance(fabric.strategy, SHARDED):
        forwards = int(fabric.all_reduce(torch.tensor(forwards, device=fabric.device), reduce_op="max"))
    batch = None
    for batch in loader:
        validation_step(model, batch, metrics, cfg)
    for _ in range(forwards - len(loader)):
        validation_step(model, batch, copy.deepcopy(metrics), cfg)  # a shorter shard repeats its last batch, uncounted
    model.train()
    computed = metrics.compute() if isinstance(metrics, MetricCollection) else \
        {name: metric.compute() for name, metric in metrics.items()}  # all ranks
    values = {name: value.item() if value.numel() == 1 else value.tolist()  # the loss first, as it is printed
              for name, value in sorted(computed.items(), key=lambda item: item[0] != "loss")}
    return {**values, "samples": len(loader.dataset)}
