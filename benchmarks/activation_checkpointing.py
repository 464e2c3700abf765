"""--activation_checkpointing: peak memory and time per training step with and without it, on the GPT preset made
wide enough for activations to dominate (6 blocks of width 768, 256-token context, 16 sequences per step).

    python benchmarks/activation_checkpointing.py [--accelerator cuda] [--steps 5] [--batch 16]

Each variant runs in a fresh process: the template's model.py and training_step, AdamW, the steps timed after a
first one. Peak memory is the growth of the process's resident memory over the steps (VmHWM after resetting it) on
a CPU, torch.cuda.max_memory_allocated on a GPU. Prints a markdown table.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = ["--config_path", str(REPO / "configs" / "shakespeare_char.yaml"), "--n_layer", "6", "--n_head", "12",
         "--n_embd", "768", "--block_size", "256", "--dropout", "0.1"]


def resident_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(recompute: bool, accelerator: str, steps: int, batch: int) -> dict:
    import torch
    from torch.utils.data import default_collate

    sys.path.insert(0, str(REPO))
    from config import parse_config
    from data import make_datasets
    from model import make_model, sharding_units
    from train import step_loss
    from utils.model_setup import recompute_in_backward

    cfg = parse_config(SHAPE)
    device = torch.device(accelerator)
    torch.manual_seed(0)
    model = make_model(cfg).to(device)
    if recompute:
        for unit in sharding_units(model):
            recompute_in_backward(unit)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_set = make_datasets(cfg)[0]
    batches = [tuple(t.to(device) for t in default_collate([train_set[i + 1000 * s] for i in range(batch)]))
               for s in range(steps + 1)]

    def step(data) -> None:
        step_loss(model, data, cfg).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(batches[0])  # the optimizer's state and the allocator's pools exist from here on
    Path("/proc/self/clear_refs").write_text("5")
    before = resident_kb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for data in batches[1:]:
        start = time.perf_counter()
        step(data)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else \
        (resident_kb("VmHWM") - before) / 1024
    return {"seconds": statistics.median(times), "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--child", choices=["with", "without"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child == "with", args.accelerator, args.steps, args.batch)))
        return
    results = {}
    for variant in ("without", "with"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--accelerator", args.accelerator,
                              "--steps", str(args.steps), "--batch", str(args.batch)], capture_output=True, text=True,
                             check=True, cwd=REPO).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    base = results["without"]
    print(f"{time.strftime('%Y-%m-%d')}, {args.accelerator}: GPT of 6 blocks, width 768, {args.batch} x 256 tokens per "
          f"step, median of {args.steps} steps\n")
    print("| activation checkpointing | s/step | x | peak memory MB (over the steps) | x |")
    print("|---|---|---|---|---|")
    for variant, r in results.items():
        print(f"| {variant} | {r['seconds']:.3f} | {r['seconds'] / base['seconds']:.2f} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / base['peak_mb']:.2f} |")


if __name__ == "__main__":
    main()
