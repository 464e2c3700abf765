"""FSDP2 against DDP on 2 CPU processes: time per optimizer step, and the bytes of parameters plus optimizer state
that each rank holds, for the digits CNN and the character-level GPT preset.

    python benchmarks/sharding.py [--rounds 2] [--gpt_steps 150] [--cnn_epochs 10]

Each run is a real `python train.py --accelerator cpu --devices 2 --strategy S` in a fresh process, the strategies
interleaved round by round. Time per step is the median over the run's logged windows (eff_batch_size divided by
the logged samples_per_sec; validation and saves are not in it), the first window dropped. Bytes per rank are read
from the run's last checkpoint: DDP holds the whole file's model and optimizer tensors on every rank; under FSDP2
each rank holds the chunks its shard file stores (torch.distributed.checkpoint's index says which).
"""

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = {
    "digits CNN": ["--log_per_epoch", "4"],
    "GPT preset": ["--config_path", str(REPO / "configs" / "shakespeare_char.yaml"), "--log_every_n_steps", "10",
                   "--val_every_n_steps", "100000", "--checkpoint_every_n_steps", "100000"],
}


def tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else []
    return sum(tensor_bytes(value) for value in values)


def bytes_per_rank(checkpoint: Path) -> list[int]:
    """Model and optimizer tensor bytes held by each rank."""
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        return [tensor_bytes([state["model"], state["optimizer"]])] * 2
    metadata = dcp.FileSystemReader(checkpoint).read_metadata()
    held = {}
    for index, where in metadata.storage_data.items():
        item = metadata.state_dict_metadata[index.fqn]
        if not hasattr(item, "chunks"):  # a scalar or object entry, not a tensor
            continue
        chunk = next(c for c in item.chunks if c.offsets == index.offset)
        size = chunk.sizes.numel() * torch.empty((), dtype=item.properties.dtype).element_size()
        held[where.relative_path] = held.get(where.relative_path, 0) + size
    return [held[name] for name in sorted(held)]


def run(strategy: str, workload: str, args) -> tuple[float, list[int]]:
    length = ["--max_steps", str(args.gpt_steps)] if workload == "GPT preset" else ["--epochs", str(args.cnn_epochs)]
    with tempfile.TemporaryDirectory() as root:
        command = [sys.executable, str(REPO / "train.py"), "--root_dir", root, "--accelerator", "cpu", "--devices", "2",
                   "--strategy", strategy, "--logger_name", "csv", *WORKLOADS[workload], *length]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{workload} under {strategy}: {done.stderr.strip().splitlines()[-1]}")
        folder = next(Path(root).iterdir())
        with open(folder / "logs" / "csv" / "metrics.csv") as file:
            rows = [row for row in csv.DictReader(file) if row.get("samples_per_sec")]
        batch = yaml.safe_load((folder / "config.yaml").read_text())["eff_batch_size"]
        step_ms = statistics.median(1000 * batch / float(row["samples_per_sec"]) for row in rows[1:])
        last = max(folder.glob("checkpoints/epoch-*.ckpt"))
        return step_ms, bytes_per_rank(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gpt_steps", type=int, default=150)
    parser.add_argument("--cnn_epochs", type=int, default=10)
    args = parser.parse_args()
    results = {}
    for _ in range(args.rounds):
        for workload in WORKLOADS:
            for strategy in ("ddp", "fsdp2"):
                step_ms, held = run(strategy, workload, args)
                results.setdefault((workload, strategy), []).append(step_ms)
                results[(workload, strategy, "bytes")] = held
    print(f"torch {torch.__version__}, 2 CPU processes (gloo), {args.rounds} rounds, median of rounds\n")
    print("| workload | strategy | ms per step | vs ddp | bytes per rank (params + AdamW state) | vs ddp |")
    print("|---|---|---|---|---|---|")
    for workload in WORKLOADS:
        ddp_ms = statistics.median(results[(workload, "ddp")])
        ddp_bytes = results[(workload, "ddp", "bytes")][0]
        for strategy in ("ddp", "fsdp2"):
            ms = statistics.median(results[(workload, strategy)])
            held = results[(workload, strategy, "bytes")]
            print(f"| {workload} | {strategy} | {ms:.1f} | {ms / ddp_ms:.2f}x | "
                  f"{' / '.join(f'{b:,}' for b in held)} | {max(held) / ddp_bytes:.2f}x |")


if __name__ == "__main__":
    main()
