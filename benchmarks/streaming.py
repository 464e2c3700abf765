"""Streamed training data (litdata chunks) against the memmap path, on the GPT preset: time per step and the part
of it the loop spends waiting for data.

    python benchmarks/streaming.py [--steps 200] [--workers 0 2] [--rounds 2] [--accelerator cpu]

Each variant trains the preset's model (configs/shakespeare_char.yaml) in this process through the template's own
training steps (utils/datasets.py: ShuffledSteps for the memmap, StreamedSteps for litdata) and train.py's
training_step and loss_weight. The wait is the time spent getting a step's micro-batches (next() on the steps);
the step is the rest (forward, backward, AdamW; on a GPU, up to a synchronize). The first 10 steps of each variant
are not timed; the variants run in turn, --rounds times, and the table gives the mean of the rounds. Prints a
markdown table.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WARMUP = 10


def measure(streaming: bool, workers: int, steps: int, accelerator: str) -> dict:
    from lightning.fabric import Fabric

    from config import parse_config
    from data import make_datasets
    from model import make_model
    from train import loss_weight, training_step
    from utils.batching import loss_weights, plan_batches
    from utils.datasets import make_loaders

    cfg = parse_config(["--config_path", str(REPO / "configs" / "shakespeare_char.yaml"), "--streaming",
                        str(streaming).lower(), "--num_workers", str(workers), "--accelerator", accelerator])
    fabric = Fabric(accelerator=accelerator, devices=1)
    torch.manual_seed(cfg.seed)
    train_set, val_set, _ = make_datasets(cfg)
    batches = plan_batches(cfg.eff_batch_size, 1, cfg.micro_batch_size)
    train_steps, _ = make_loaders(fabric, cfg, train_set, val_set, batches)
    model = fabric.setup_module(make_model(cfg))
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-3))
    sync = torch.cuda.synchronize if fabric.device.type == "cuda" else (lambda: None)
    wait = busy = 0.0
    step_iterator = iter(train_steps.epoch(0, 0))
    for step in range(WARMUP + steps):
        start = time.perf_counter()
        micro_batches = next(step_iterator)
        fetched = time.perf_counter()
        weights = loss_weights(fabric, [loss_weight(batch, cfg) for batch in micro_batches])
        for weight, batch in zip(weights, micro_batches, strict=True):
            fabric.backward(training_step(model, batch, cfg) * weight)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= WARMUP:
            wait, busy = wait + fetched - start, busy + time.perf_counter() - fetched
    return {"ms_per_step": 1000 * (wait + busy) / steps, "wait_ms": 1000 * wait / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    variants = [(streaming, workers) for workers in args.workers for streaming in (False, True)]
    results = {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for streaming, workers in variants:
            results[streaming, workers].append(measure(streaming, workers, args.steps, args.accelerator))
    print(f"GPT preset (configs/shakespeare_char.yaml), {args.steps} timed steps, mean of {args.rounds} rounds, "
          f"{args.accelerator}\n")
    print("| data | loader workers | ms per step | waiting for data, ms per step | data-wait fraction | "
          "time per step vs memmap |")
    print("|---|---|---|---|---|---|")
    for streaming, workers in variants:
        rounds = results[streaming, workers]
        ms, wait = (sum(r[key] for r in rounds) / len(rounds) for key in ("ms_per_step", "wait_ms"))
        memmap = sum(r["ms_per_step"] for r in results[False, workers]) / len(rounds)
        print(f"| {'litdata chunks' if streaming else 'memmap'} | {workers} | {ms:.1f} | {wait:.2f} | "
              f"{wait / ms:.1%} | {ms / memmap:.2f}x |")


if __name__ == "__main__":
    main()
