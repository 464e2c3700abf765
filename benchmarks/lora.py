"""Full fine-tuning against LoRA on the local Hugging Face model, through train.py itself: trainable parameters,
checkpoint size, time per step, peak memory and the validation loss after the same number of steps.

    python benchmarks/lora.py [--steps 300] [--layers 4 --width 128] [--accelerator cpu]

A random model learns little from adapters, so the base is first trained in full for --steps steps and exported
(export.py: what a pretrained checkpoint is); both variants then start from it with the preset's settings. Each
run is a fresh process; its peak memory is the process's peak resident memory (its GPU's peak with --accelerator
cuda is not measured here). Prints a markdown table.
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def train(root: Path, base: Path, steps: int, accelerator: str, *flags: str) -> tuple[Path, int]:
    """A run of configs/shakespeare_hf.yaml; returns its folder and the process's peak resident memory in KiB."""
    command = [sys.executable, str(REPO / "train.py"), "--config_path", str(REPO / "configs" / "shakespeare_hf.yaml"),
               "--hf_path", str(base), "--root_dir", str(root), "--max_steps", str(steps), "--val_every_n_steps",
               str(steps), "--checkpoint_every_n_steps", str(steps), "--warmup_steps", str(steps // 10),
               "--accelerator", accelerator, "--logger_name", "csv", *flags]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(command)} failed ({status})")
    return next(p for p in root.iterdir() if p.is_dir()), usage.ru_maxrss


def summary(run: Path, peak_kb: int) -> dict:
    derived = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rates = [float(row["samples_per_sec"]) for row in rows if row.get("samples_per_sec")][1:]  # past compilation
    checkpoint = next((run / "checkpoints").glob("epoch-*.ckpt"))
    return {"trainable": sum(group["params"] for group in derived["param_groups"].values()),
            "checkpoint_mb": checkpoint.stat().st_size / 2**20,
            "ms_per_step": 1000 * derived["per_device_batch_size"] / statistics.median(rates),
            "peak_mb": peak_kb / 1024,
            "val_loss": float([row for row in rows if row.get("val_loss")][-1]["val_loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_local_model.py"), tmp / "random",
                        "--layers", str(args.layers), "--width", str(args.width)], check=True, capture_output=True)
        pretraining, _ = train(tmp / "pretraining", tmp / "random", args.steps, args.accelerator, "--lora_r", "0")
        subprocess.run([sys.executable, str(REPO / "export.py"), "--out_dir", pretraining, "--to", tmp / "base"],
                       check=True, capture_output=True)
        base_mb = sum(f.stat().st_size for f in (tmp / "base").glob("*.safetensors")) / 2**20
        base_loss = summary(pretraining, 0)["val_loss"]
        print(f"base: {args.layers} x {args.width} GPT-2, {base_mb:.2f} MB of weights, val loss {base_loss:.4f} "
              f"after {args.steps} steps of full training from random weights; then {args.steps} steps each:\n")
        print("| variant | trainable parameters | checkpoint (MB) | time per step (ms) | peak memory (MB) | val loss |")
        print("|---|---|---|---|---|---|")
        for name, flags in (("full fine-tuning", ["--lora_r", "0"]), ("LoRA r=8 (c_attn)", [])):
            result = summary(*train(tmp / name.split()[0], tmp / "base", args.steps, args.accelerator, *flags))
            print(f"| {name} | {result['trainable']:,} | {result['checkpoint_mb']:.2f} | {result['ms_per_step']:.1f} "
                  f"| {result['peak_mb']:.0f} | {result['val_loss']:.4f} |")


if __name__ == "__main__":
    main()
