"""GPU throughput: a GPT of about 124M parameters (GPT-2 small: 12 layers, 12 heads, width 768, 1,024-token context,
vocabulary 50,304, tied head) on random tokens with bf16-mixed, with and without --compile: the template's own
train.py against a plain PyTorch loop.

    python benchmarks/gpu.py                               # 3 rounds of 100 steps, batch 16, on cuda
    python benchmarks/gpu.py --tiny --accelerator cpu      # a small smoke test of this script, on a CPU

The template runs unmodified; only its data module is swapped for random tokens, as a user would swap data.py.
Each run is a fresh process; rounds interleave the variants. Tokens per second are taken over the steps after the
first 10 (both loops read a value back at their log steps, every 10 steps, which bounds the queued work). MFU is
against the device's dense bf16 peak from utils/throughput.py, left out for a device the table does not list. Peak GPU
memory is torch.cuda.max_memory_allocated.
"""

import argparse
import atexit
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import REPO, WARMUP_STEPS, param_groups, stamp_optimizer_steps  # noqa: E402

VARIANTS = ("plain", "template", "plain --compile", "template --compile")
GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab": 50304}
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "vocab": 512}


def random_tokens(shape: dict, windows: int, seed: int):
    """`windows` windows of random tokens and the same shifted by one, as (inputs, targets) samples."""
    import torch
    from torch.utils.data import TensorDataset

    tokens = torch.randint(shape["vocab"], (windows, shape["block_size"] + 1),
                           generator=torch.Generator().manual_seed(seed))
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def template(spec: dict, out: Path) -> None:
    """train.py as `python train.py ...` runs it, with data.py's datasets swapped for random tokens."""
    import runpy

    import data
    import model

    shape, windows = spec["shape"], spec["batch"] * (spec["steps"] + 1)
    data.make_datasets = lambda cfg: (random_tokens(shape, windows, 0), random_tokens(shape, spec["batch"], 1),
                                      random_tokens(shape, spec["batch"], 2))
    data.num_classes = model.num_classes = lambda cfg: shape["vocab"]
    sys.argv = ["train.py", "--dataset", "shakespeare_char", "--arch", "gpt", "--dropout", "0",
                *(f"--{k}={shape[k]}" for k in ("n_layer", "n_head", "n_embd", "block_size")),
                "--eff_batch_size", str(spec["batch"]), "--base_batch_size", str(spec["batch"]), "--base_lr", "6e-4",
                "--max_steps", str(spec["steps"]), "--warmup_steps", "10", "--grad_clip", "1.0",
                "--weight_decay", "0.1", "--beta2", "0.95", "--log_every_n_steps", "10",
                "--val_every_n_steps", str(spec["steps"]), "--checkpoint_every_n_steps", str(spec["steps"]),
                "--accelerator", spec["accelerator"], "--devices", "1", "--precision", "bf16-mixed",
                "--root_dir", str(out / "runs"), *(["--compile"] if spec["compile"] else [])]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")


def plain(spec: dict, out: Path) -> None:
    """The loop written by hand: bf16 autocast, fused AdamW, clipping, a readback at log steps, no lightning."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from model import GPT

    shape, device = spec["shape"], torch.device(spec["accelerator"])
    torch.manual_seed(0)
    config = argparse.Namespace(**{k: shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}, bias=False)
    model = GPT(config, shape["vocab"], 0.0).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    forward = torch.compile(model) if spec["compile"] else model
    loader = DataLoader(random_tokens(shape, spec["batch"] * (spec["steps"] + 1), 0), batch_size=spec["batch"],
                        shuffle=True)
    for step, (inputs, targets) in enumerate(loader, start=1):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = 6e-4 * min(1.0, step / 10) * (0.55 + 0.45 * math.cos(math.pi * step / spec["steps"]))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = forward(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
        if step == spec["steps"]:
            break
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out / "final.pt")


def child(variant: str, spec: dict, out: Path) -> None:
    sys.path.insert(0, str(REPO))
    stamp_optimizer_steps(out)
    import torch

    spec["compile"] = variant.endswith("--compile")

    def write_memory() -> None:  # at exit: train.py leaves through os._exit after running the exit handlers
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            (out / "memory.json").write_text(json.dumps({"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}))

    atexit.register(write_memory)
    (template if variant.startswith("template") else plain)(spec, out)


def run_once(variant: str, spec_file: Path, out: Path) -> dict:
    out.mkdir(parents=True)
    command = [sys.executable, __file__, "--child", variant, "--spec", str(spec_file), "--out", str(out)]
    with open(out / "output.log", "w") as log:
        start = time.time()
        status = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if status != 0:
        sys.exit(f"{variant} failed (exit {status}):\n{(out / 'output.log').read_text()[-3000:]}")
    perf = json.loads((out / "stamps.json").read_text())["perf"]
    memory = out / "memory.json"
    return {"seconds_per_step": (perf[-1] - perf[WARMUP_STEPS]) / (len(perf) - 1 - WARMUP_STEPS),
            "whole": time.time() - start,
            "peak_gpu_mb": json.loads(memory.read_text())["peak_gpu_mb"] if memory.is_file() else math.nan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16, help="Sequences per step.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accelerator", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="A tiny GPT and 30 steps: a smoke test of the script.")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, json.loads(args.spec.read_text()), args.out)
        return
    import lightning
    import torch

    sys.path.insert(0, str(REPO))
    from model import GPT
    from train import step_loss
    from utils.throughput import count_flops, peak_flops

    shape = TINY if args.tiny else GPT2_SMALL
    steps = 30 if args.tiny else args.steps
    spec = {"shape": shape, "batch": args.batch, "steps": steps, "accelerator": args.accelerator}
    config = argparse.Namespace(**{k: shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}, bias=False)
    sample = (torch.zeros(shape["block_size"], dtype=torch.long),) * 2
    flops_per_step = count_flops(lambda: GPT(config, shape["vocab"], 0.0), sample, args.batch,
                                 lambda model, batch: step_loss(model, batch, None))
    params = sum(p.numel() for p in GPT(config, shape["vocab"], 0.0).parameters())
    device = torch.device(args.accelerator)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_flops(name, "bf16") if device.type == "cuda" else None
    peak_text = f"{peak / 1e12:.0f} TFLOPS" if peak else "unknown (not a GPU, or not in utils/throughput.py): no MFU"
    print(f"{time.strftime('%Y-%m-%d')}, {name}, torch {torch.__version__}, lightning {lightning.__version__}; "
          f"GPT of {params / 1e6:.1f}M parameters, {args.batch} x {shape['block_size']} tokens per step, {steps} "
          f"steps, {args.rounds} rounds, bf16-mixed; dense bf16 peak {peak_text}")
    results = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as folder:
        spec_file = Path(folder) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        for round_ in range(args.rounds):
            for variant in args.variants:
                results[variant].append(run_once(variant, spec_file, Path(folder) / f"{variant}-{round_}"))
                print(f"  round {round_ + 1} {variant}: {results[variant][-1]['seconds_per_step'] * 1e3:.1f} ms per "
                      f"step", file=sys.stderr)
    tokens_per_step = args.batch * shape["block_size"]
    print("\n| variant | ms per step | tokens/s | x plain (same compile) | MFU | peak GPU memory MB |")
    print("|---|---|---|---|---|---|")
    for variant, runs in results.items():
        seconds = statistics.median(r["seconds_per_step"] for r in runs)
        base = variant.replace("template", "plain")
        base_seconds = statistics.median(r["seconds_per_step"] for r in results[base]) if base in results else math.nan
        ratio = seconds / base_seconds
        mfu = f"{flops_per_step / seconds / peak:.1%}" if peak else "n/a"
        print(f"| {variant} | {seconds * 1e3:.1f} | {tokens_per_step / seconds:,.0f} | {ratio:.3f} | {mfu} | "
              f"{statistics.median(r['peak_gpu_mb'] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
