"""Building the datasets of data.py on every rank (local rank 0 first, bad data as one line; map-style, or a streamed
training set), and their loaders."""

import os

import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader, Dataset, IterableDataset

import data
from utils.batching import BatchPlan, optimizer_steps
from utils.exits import fail
from utils.samplers import ResumableShuffleSampler, ShardSampler
from utils.streaming import StreamedSteps, is_streaming


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
        if name == "train" and is_streaming(dataset):
            continue
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            fail(f"make_datasets returned a {type(dataset).__name__} as the {name} set: datasets must be map-style "
                 f"(with __len__ and __getitem__), or for training litdata's StreamingDataset, so that every rank "
                 f"and every resume sees known samples")
    return datasets


class ShuffledSteps:
    """The optimizer steps of a map-style dataset: this rank's share of each step from a seeded shuffle
    (ResumableShuffleSampler), accum_steps micro-batches each. Its position is the global step alone: not stateful."""

    def __init__(self, fabric: Fabric, cfg, dataset: Dataset, batches: BatchPlan):
        self.sampler = ResumableShuffleSampler(len(dataset), batches.per_device, fabric.world_size,
                                               fabric.global_rank, cfg.seed)
        self.steps_per_epoch, self.dataset_size = self.sampler.steps_per_epoch, len(dataset)
        self.accum_steps = batches.accum_steps
        # the loader's own generator keeps iterator creation from drawing on the global RNG (exact resume)
        loader = DataLoader(dataset, batch_size=batches.micro, sampler=self.sampler, **loader_settings(fabric, cfg),
                            generator=torch.Generator().manual_seed(cfg.seed))
        self.loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)

    def epoch(self, epoch: int, steps_done: int):
        """The micro-batches of each step of `epoch` after its first `steps_done` (a resumed epoch skips them)."""
        self.sampler.set_position(epoch, steps_done)
        return optimizer_steps(self.loader, self.accum_steps)


def make_loaders(fabric: Fabric, cfg, train_set: Dataset, val_set: Dataset,
                 batches: BatchPlan) -> tuple[ShuffledSteps | StreamedSteps, DataLoader]:
    """The training steps (all ranks: a streamed set's epoch is agreed on) and the validation loader."""
    if is_streaming(train_set):
        train_steps = StreamedSteps(fabric, train_set, batches, loader_settings(fabric, cfg), cfg.seed)
    else:
        train_steps = ShuffledSteps(fabric, cfg, train_set, batches)
    # validation forwards at most the training micro-batch: a run sized to fit memory in training fits here too
    val_loader = fabric.setup_dataloaders(evaluation_loader(fabric, cfg, val_set, batches.micro),
                                          use_distributed_sampler=False)
    return train_steps, val_loader


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
