"""Building the datasets of data.py on every rank: local rank 0 first, bad data as one line, map-style only."""

from lightning.fabric import Fabric
from torch.utils.data import Dataset, IterableDataset

import data
from utils.exits import fail


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
