"""Building the datasets of data.py on every rank (local rank 0 first, bad data as one line, map-style only), and
their loaders."""

import os

import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader, Dataset, IterableDataset

import data
from utils.exits import fail
from utils.samplers import ResumableShuffleSampler, ShardSampler


def load_datasets(fabric: Fabric, cfg) -> tuple[Dataset, Dataset, Dataset]:
    """data.py's datasets, built by local rank 0 first so that downloads and caches do not race (all ranks)."""
    with fabric.rank_zero_first(local=True):
        try:
            datasets, error = data.make_datasets(cfg), None
        except data.DataError as err:  # every rank meets it: rank 0 leaves the barrier first
            datasets, error = None, err
    if error:
        fail(str(error))
    for name, dataset in zip(("train", "val", "test"), datasets, strict=True):
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            fail(f"make_datasets returned a {type(dataset).__name__} as the {name} set: datasets must be map-style "
                 f"(with __len__ and __getitem__), so that every rank and every resume sees known samples")
    return datasets


def make_loaders(fabric: Fabric, cfg, train_set: Dataset, val_set: Dataset, sampler: ResumableShuffleSampler,
                 micro_batch: int) -> tuple[DataLoader, DataLoader]:
    """The training loader (this rank's share of each step, from `sampler`) and the validation loader."""
    # the loader's own generator keeps iterator creation from drawing on the global RNG (exact resume)
    train_loader = DataLoader(train_set, batch_size=micro_batch, sampler=sampler, **loader_settings(fabric, cfg),
                              generator=torch.Generator().manual_seed(cfg.seed))
    # validation forwards at most the training micro-batch: a run sized to fit memory in training fits here too
    val_loader = evaluation_loader(fabric, cfg, val_set, micro_batch)
    return fabric.setup_dataloaders(train_loader, val_loader, use_distributed_sampler=False)


def evaluation_loader(fabric: Fabric, cfg, dataset: Dataset, batch_size: int) -> DataLoader:
    """Each sample on exactly one rank, once (validation in train.py, the test split in test.py)."""
    return DataLoader(dataset, batch_size=batch_size, **loader_settings(fabric, cfg),
                      sampler=ShardSampler(len(dataset), fabric.world_size, fabric.global_rank))


def loader_settings(fabric: Fabric, cfg) -> dict:
    """DataLoader settings for this machine: --num_workers as given, else up to 4 per process on CUDA (as many as
    its share of the node's cores allows, one kept for the process itself) and none on a CPU; pinned memory on
    CUDA, so that copies to the device need not wait; workers kept from one epoch to the next."""
    return worker_settings(fabric.device, fabric.world_size // cfg.num_nodes, cfg.num_workers)


def worker_settings(device: torch.device, processes_per_node: int, num_workers: int | None) -> dict:
    cuda = device.type == "cuda"
    if num_workers is None:
        per_process = len(os.sched_getaffinity(0)) // max(1, processes_per_node)
        num_workers = max(0, min(4, per_process - 1)) if cuda else 0
    return {"num_workers": num_workers, "pin_memory": cuda, "persistent_workers": num_workers > 0}
