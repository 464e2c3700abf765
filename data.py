"""The data: edit make_datasets to train on your own.

Default: the 1,797 handwritten 8x8 digits that ship inside scikit-learn, so nothing is downloaded.
"""

import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, TensorDataset

NUM_CLASSES = 10


def make_datasets(cfg) -> tuple[Dataset, Dataset, Dataset]:
    """(train, val, test): fixed splits of 1,257 / 270 / 270 images, independent of cfg.seed."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    splits = order[:1257], order[1257:1527], order[1527:]
    return tuple(TensorDataset(images[idx], labels[idx]) for idx in splits)
