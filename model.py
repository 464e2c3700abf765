"""The model: edit make_model to train your own. It must return logits."""

from torch import nn

from data import NUM_CLASSES


def make_model(cfg) -> nn.Module:
    """A small CNN for 8x8 digits with dropout (cfg.dropout)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(), nn.Dropout(cfg.dropout),
        nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(cfg.dropout),
        nn.Linear(128, NUM_CLASSES),
    )
