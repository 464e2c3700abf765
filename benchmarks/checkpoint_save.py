"""Checkpoint save: how long a save blocks training, and its peak memory, for the template's background save
against plain torch.save (with and without fsync) and Fabric's own fabric.save, on a state of about 300 MB
(a 25M-parameter model plus its AdamW moments).

    python benchmarks/checkpoint_save.py [--folder DIR] [--repeats 3]
    python benchmarks/checkpoint_save.py --accelerator cuda --layers 24 --width 4096   # 1.6 GB of weights on a GPU

The template's save_checkpoint returns once the state is copied; the file is written, fsynced and renamed in a
background thread. Its row shows how long the loop is blocked, how long until the file is in place, and how much
slower a training-like step (1-thread matrix multiplications) runs while the write goes on than without it. Each
method runs in a fresh process (so peaks do not mix); the folder should be on the disk checkpoints go to (fsync on
tmpfs costs nothing). Prints a markdown table with ratios to plain torch.save. On a GPU the state lives on the
device (the copy to host memory is part of what blocks) and the training-like step runs there.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["torch.save", "torch.save + fsync", "template save_checkpoint (background)",
           "fabric.save (Fabric 2.6.6 default)"]


def memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(method: str, folder: Path, repeats: int, accelerator: str, layers: int, width: int) -> dict:
    """Runs in the child process: builds the state, saves it `repeats` times, reports time and peak growth."""
    import torch
    from lightning.fabric import Fabric

    sys.path.insert(0, str(REPO))
    from utils.checkpoint import AtomicCheckpointIO, finish_saves, save_checkpoint

    torch.manual_seed(0)
    plugins = [AtomicCheckpointIO()] if method.startswith("template") else []
    fabric = Fabric(accelerator=accelerator, devices=1, plugins=plugins)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])  # default: 25.2M parameters
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters()))
    model(torch.randn(2, width, device=fabric.device)).sum().backward()
    optimizer.step()  # creates the AdamW moments: the state is 3 x the weights
    state = {"model": model, "optimizer": optimizer, "global_step": 1}
    plain = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "global_step": 1}
    seconds, growth, in_place, slowdown = [], [], [], []

    def work() -> float:  # a training-like step: matrix multiplications launched from Python (1 thread on a CPU)
        start = time.perf_counter()
        for _ in range(20):
            torch.mm(a, a)
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    torch.set_num_threads(1)
    a = torch.randn(256 if fabric.device.type == "cpu" else 4096, 256 if fabric.device.type == "cpu" else 4096,
                    device=fabric.device)
    alone = statistics.median(work() for _ in range(50))
    for i in range(repeats):
        path = folder / f"{method.split()[0]}-{i}.ckpt"
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        before = memory_kb("VmRSS")
        start = time.perf_counter()
        if method == "torch.save":
            torch.save(plain, path)
        elif method == "torch.save + fsync":
            with open(path, "wb") as f:
                torch.save(plain, f)
                f.flush()
                os.fsync(f.fileno())
        elif method.startswith("template"):
            save_checkpoint(fabric, folder, path.name, state)
        else:
            fabric.save(path, state)
        seconds.append(time.perf_counter() - start)
        if method.startswith("template"):  # train on while the write runs, then wait for it
            writer, meanwhile = fabric.strategy.checkpoint_io._writer, []
            while writer.is_alive():
                meanwhile.append(work())
            finish_saves(fabric)
            in_place.append(time.perf_counter() - start)
            slowdown.append(statistics.median(meanwhile) / alone if meanwhile else math.nan)
        growth.append((memory_kb("VmHWM") - before) / 1024)
        size = path.stat().st_size / 2**20
        path.unlink()
    return {"seconds": statistics.median(seconds), "peak_growth_mb": max(growth), "size_mb": size,
            "in_place": statistics.median(in_place) if in_place else math.nan,
            "slowdown": statistics.median(slowdown) if slowdown else math.nan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=None, help="Where to write (default: a temp folder here).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--layers", type=int, default=6, help="Linear layers of the model, each width x width.")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = ["--accelerator", args.accelerator, "--layers", str(args.layers), "--width", str(args.width)]
    if args.child:
        print(json.dumps(measure(args.child, args.folder, args.repeats, args.accelerator, args.layers, args.width)))
        return
    with tempfile.TemporaryDirectory(dir=args.folder or REPO) as folder:
        results = {}
        for method in METHODS:
            out = subprocess.run([sys.executable, __file__, "--child", method, "--folder", folder, "--repeats",
                                  str(args.repeats), *shape], capture_output=True, text=True, check=True).stdout
            results[method] = json.loads(out.strip().splitlines()[-1])
    base = results["torch.save"]
    print(f"checkpoint size {base['size_mb']:.0f} MB, median of {args.repeats} saves each\n")
    print("| method | training blocked s | x torch.save | file in place s | steps meanwhile x | peak memory growth MB "
          "| % of checkpoint |")
    print("|---|---|---|---|---|---|---|")
    for method, r in results.items():
        in_place = r["seconds"] if math.isnan(r["in_place"]) else r["in_place"]
        meanwhile = "" if math.isnan(r["slowdown"]) else f"{r['slowdown']:.2f}"
        print(f"| {method} | {r['seconds']:.3f} | {r['seconds'] / base['seconds']:.2f} | {in_place:.3f} | {meanwhile} "
              f"| {r['peak_growth_mb']:.0f} | {100 * r['peak_growth_mb'] / r['size_mb']:.1f} |")


if __name__ == "__main__":
    main()
