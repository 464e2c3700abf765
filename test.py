"""Evaluate a finished run on the test split: prints loss and accuracy, writes RUN/test_metrics.json.

    python test.py --out_dir runs/20261122-104500-train_out
    python test.py --out_dir RUN --checkpoint RUN/checkpoints/epoch-0010-step-00000190.ckpt
    python test.py --out_dir RUN --accelerator cpu --devices 2    # any train.py flag overrides the run's config

Every test sample is counted exactly once on any number of devices (no sampler padding).
"""

import argparse
import json
from pathlib import Path

from torch.utils.data import DataLoader

from config import parse_config, read_yaml
from data import make_datasets
from model import make_model
from train import evaluate, make_fabric, print0
from utils.checkpoint import CheckpointError, pick_checkpoint
from utils.exits import exit_run, fail
from utils.samplers import ShardSampler


def main() -> None:
    # -- config: the run's own config.yaml, under any flags given here --------------------------------------------
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=Path, required=True, help="The run folder to evaluate.")
    parser.add_argument("--checkpoint", type=Path, default=None, help="Checkpoint file; default: the newest.")
    args, rest = parser.parse_known_args()
    if not (args.out_dir / "config.yaml").is_file():
        fail(f"out_dir={str(args.out_dir)!r} is not a run folder (no config.yaml)")
    try:
        saved = read_yaml(args.out_dir / "config.yaml")
    except ValueError as err:
        fail(f"out_dir={str(args.out_dir)!r}: config.yaml {err}")
    cfg = parse_config(rest, saved=saved, description=__doc__)

    # -- setup, data, model --------------------------------------------------------------------------------------
    fabric = make_fabric(cfg)
    fabric.launch()
    _, _, test_set = make_datasets(cfg)
    loader = DataLoader(test_set, batch_size=cfg.micro_batch_size or cfg.eff_batch_size, num_workers=cfg.num_workers,
                        sampler=ShardSampler(len(test_set), fabric.world_size, fabric.global_rank))
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
    model = fabric.setup_module(make_model(cfg))

    # -- checkpoint: the one named, or the newest that opens (all ranks) -----------------------------------------
    try:
        checkpoint = pick_checkpoint(fabric, args.out_dir / "checkpoints", args.checkpoint)
    except CheckpointError as err:
        fail(f"checkpoint={str(args.checkpoint)!r}: {err}")
    if checkpoint is None:
        fail(f"out_dir={str(args.out_dir)!r} holds no checkpoint that opens")
    fabric.load(checkpoint, {"model": model}, strict=False)

    # -- evaluate (all ranks) and report (rank 0) ----------------------------------------------------------------
    metrics = {"checkpoint": str(checkpoint), **evaluate(fabric, model, loader)}
    print0(f"test loss {metrics['loss']:.4f}, test acc {metrics['acc']:.4f} "
           f"on {metrics['samples']} samples ({checkpoint.name})")
    if fabric.is_global_zero:
        (args.out_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()
    exit_run(0)  # under DDP: without interpreter teardown (see utils/exits.py)
