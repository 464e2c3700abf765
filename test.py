"""Evaluate a run on the test split: prints every metric of train.py's make_metrics, writes RUN/test_metrics.json and
RUN/report.png.

    python test.py --out_dir runs/20261122-104500-train_out
    python test.py --out_dir RUN --checkpoint last                # default: best (checkpoints/best.ckpt) if any
    python test.py --out_dir RUN --checkpoint RUN/checkpoints/epoch-0010-step-00000190.ckpt
    python test.py --out_dir RUN --accelerator cpu --devices 2    # any train.py flag overrides the run's config
    python test.py --out_dir RUN --results_dir elsewhere/         # a run folder you cannot write to

It only reads the run (its results aside): safe while the run is still training. A checkpoint from outside the run
writes its results to RUN/evaluations/<its run>-<its name>/, not over the run's own. Every test sample is counted
exactly once on any number of devices (no sampler padding), and each device forwards at most the run's training
micro-batch.
"""

import argparse
import json
from pathlib import Path

from config import load_run_config
from model import make_model
from train import evaluate
from utils.checkpoint import checkpoint_step, holds_average, write_text_atomically
from utils.console import print0
from utils.datasets import evaluation_loader, load_datasets
from utils.exits import exit_run, fail
from utils.launching import launch, make_fabric
from utils.report import write_report
from utils.run_dir import cannot_write, load_weights_for_reading


def main() -> None:
    # -- config: the run's own settings (config.yaml and its resumes), under any flags given here -----------------
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=Path, required=True, help="The run folder to evaluate.")
    parser.add_argument("--checkpoint", default=None,
                        help="best (checkpoints/best.ckpt), last (the newest that opens) or a file; "
                             "default: best if the run has one, else last.")
    parser.add_argument("--results_dir", type=Path, default=None,
                        help="Where test_metrics.json and report.png go; default: the run folder (for a checkpoint "
                             "from outside it, RUN/evaluations/<its run>-<its name>/).")
    args, rest = parser.parse_known_args()
    cfg, derived = load_run_config(args.out_dir, rest, description=__doc__)
    results_dir = args.results_dir or results_folder(args.out_dir, args.checkpoint)
    if unwritable := cannot_write(results_dir):  # said now, not after the evaluation
        fail(f"results_dir={str(results_dir)!r} cannot be written ({unwritable}): pass --results_dir DIR to write "
             f"test_metrics.json and report.png elsewhere")

    # -- setup and data ------------------------------------------------------------------------------------------
    fabric = make_fabric(cfg)
    launch(fabric)
    _, _, test_set = load_datasets(fabric, cfg)
    batch_size = min(filter(None, (derived.get("micro_batch_size"), cfg.micro_batch_size, cfg.eff_batch_size)))
    loader = fabric.setup_dataloaders(evaluation_loader(fabric, cfg, test_set, batch_size),
                                      use_distributed_sampler=False)

    # -- model: the checkpoint named, or the newest that opens; nothing in the run is moved or deleted (all ranks) -
    model = make_model(cfg)
    checkpoint = load_weights_for_reading(fabric, args.out_dir, args.checkpoint, model)  # a file or shards
    model = fabric.setup_module(model)

    # -- evaluate (all ranks) and report (rank 0) ----------------------------------------------------------------
    weights = "moving average" if holds_average(checkpoint) else "weights"  # --ema_decay: the average was validated
    metrics = {"checkpoint": str(checkpoint), "checkpoint_step": checkpoint_step(checkpoint), "weights": weights,
               **evaluate(fabric, model, loader, cfg)}  # make_metrics of train.py, as in validation
    numbers = ", ".join(f"test {name} {value:.4f}" for name, value in metrics.items() if isinstance(value, float))
    print0(f"{numbers} on {metrics['samples']} samples ({checkpoint}{', its moving average' * (weights != 'weights')})")
    if fabric.is_global_zero:
        results_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(results_dir / "test_metrics.json", json.dumps(metrics, indent=2) + "\n")
        print0(f"metrics: {results_dir / 'test_metrics.json'}")
        if (args.out_dir / "logs" / "csv" / "metrics.csv").is_file():
            print0(f"report: {write_report(args.out_dir, results_dir, derived, metrics)}")
        else:
            print0(f"no report: {args.out_dir} has no csv log (it trained without the csv logger)")


def results_folder(run_dir: Path, choice: str | None) -> Path:
    """The run folder, or for a checkpoint from outside it a folder of its own in the run's evaluations/."""
    if choice in (None, "best", "last") or run_dir.resolve() in Path(choice).resolve().parents:
        return run_dir
    checkpoint = Path(choice).resolve()
    owner = checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else checkpoint.parent.name
    return run_dir / "evaluations" / f"{owner}-{checkpoint.stem}"


if __name__ == "__main__":
    main()
    exit_run(0, teardown=False)  # saves the second that freeing torch and lightning takes (utils/exits.py)
