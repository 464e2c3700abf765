"""Every GPU path of the template in one run, as one table: scripts/gpu_check.sh runs this.

    scripts/gpu_check.sh                                  # on a GPU machine: under 8 minutes on one GPU
    scripts/gpu_check.sh --accelerator cpu                # a dry run of the script itself, on a CPU

Each path is a real train.py run (the GPT's GPU preset cut to a few hundred steps, in its own temporary folder)
and a row: exit status, seconds per step, tokens per second and MFU (as train.py logs them at its last log step),
peak GPU memory, and host syncs per step after the first (torch.cuda.set_sync_debug_mode("warn") counts every
operation that makes the host wait). Paths: 32-true (TF32), bf16-mixed, 16-mixed with and without --grad_clip,
--compile at bf16-mixed, a kill -9 mid-run and --resume auto against a run never stopped (the largest weight
difference), and on 2 or more GPUs DDP and fsdp2 at bf16-mixed. Then benchmarks/checkpoint_save.py on a model of
1.6 GB: how long the template's background save blocks training, and how much it slows the steps meanwhile.
It installs nothing and writes its tables to --out.
"""

import argparse
import csv
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PRESET = ["--config_path", str(REPO / "configs" / "shakespeare_char_gpu.yaml"), "--logger_name", "csv",
          "--val_every_n_steps", "100000"]  # validation and a checkpoint at the last step only
DRY = ["--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--block_size", "64", "--eff_batch_size", "16",
       "--base_batch_size", "16", "--warmup_steps", "2", "--log_every_n_steps", "5"]


def child(out: Path, argv: list[str]) -> None:
    """train.py in this process, with probes written to out/probe.json at exit: peak GPU memory, optimizer steps,
    and the host syncs counted after the first step."""
    import atexit
    import warnings

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps, syncs = [0], [0]

    def probe() -> None:  # at exit, once: no file written in the steps it measures
        memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else None
        counted = syncs[0] if torch.cuda.is_available() else None  # the sync debug mode exists on CUDA only
        (out / "probe.json").write_text(json.dumps({"steps": steps[0], "syncs": counted, "peak_gib": memory}))

    register_optimizer_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    leave = os._exit

    def probed_exit(status: int) -> None:  # under DDP train.py leaves through os._exit, past the exit handlers
        probe()
        leave(status)

    os._exit = probed_exit
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def count(message, category, *args, **kwargs):
            if "synchronizing" in str(message):
                syncs[0] += steps[0] > 0
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = count

    atexit.register(probe)
    sys.path.insert(0, str(REPO))  # as `python train.py` would have it
    sys.argv = [str(REPO / "train.py"), *argv]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")


def run(name: str, argv: list[str], folder: Path, timeout: float, env: dict | None = None) -> dict:
    """One path: train.py through child(); its row of the table."""
    out = folder / name.replace(" ", "_")
    out.mkdir(parents=True)
    command = [sys.executable, __file__, "--child", str(out), "--", "--root_dir", str(out / "runs"), *argv]
    start = time.perf_counter()
    with open(out / "output.log", "w") as log:
        try:
            status = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                    env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
    row = {"path": name, "exit": status, "seconds": time.perf_counter() - start, "out": out}
    run_dir = next(out.glob("runs/*"), None)
    if run_dir and (run_dir / "logs" / "csv" / "metrics.csv").is_file():
        with open(run_dir / "logs" / "csv" / "metrics.csv") as f:
            last = [r for r in csv.DictReader(f) if r.get("samples_per_sec")][-1]  # the last log step's window
        samples_per_step = yaml.safe_load((run_dir / "config.yaml").read_text())["eff_batch_size"]
        row["seconds_per_step"] = samples_per_step / float(last["samples_per_sec"])
        row["tokens_per_sec"] = float(last["tokens_per_sec"]) if last.get("tokens_per_sec") else None
        row["mfu"] = float(last["mfu"]) if last.get("mfu") else None
    if (probe := out / "probe.json").is_file():
        row |= json.loads(probe.read_text())
    return row


def final_weights(root: Path) -> dict:
    import torch

    from utils.checkpoint import list_checkpoints

    (run_dir,) = root.iterdir()
    path = list_checkpoints(run_dir / "checkpoints")[-1]
    path = path / "meta.pt" if path.is_dir() else path
    return torch.load(path, map_location="cpu", weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cuda")
    parser.add_argument("--steps", type=int, default=200, help="Steps of each eager path (compiled: 1.5 x).")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="Where the table is written.")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        return child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
    sys.path.insert(0, str(REPO))
    import torch

    cuda = args.accelerator == "cuda"
    steps = args.steps if cuda else 10
    base = [*PRESET, "--accelerator", args.accelerator, "--devices", "1", "--max_steps", str(steps),
            *([] if cuda else DRY)]
    gpus = torch.cuda.device_count() if cuda else 2  # the dry run tries the multi-process paths on CPU processes
    device = torch.cuda.get_device_name() if cuda else "CPU (dry run)"
    paths = [("32-true (TF32)", ["--precision", "32-true"]),
             ("bf16-mixed", ["--precision", "bf16-mixed"]),
             ("16-mixed, grad_clip 1", ["--precision", "16-mixed"]),
             ("16-mixed, no clipping", ["--precision", "16-mixed", "--grad_clip", "none"]),
             ("bf16-mixed --compile", ["--precision", "bf16-mixed", "--compile", "--max_steps",
                                       str(steps * 3 // 2)])]
    if gpus >= 2:
        paths += [("DDP x2 bf16-mixed", ["--precision", "bf16-mixed", "--devices", "2"]),
                  ("fsdp2 x2 bf16-mixed", ["--precision", "bf16-mixed", "--devices", "2", "--strategy", "fsdp2"])]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        for name, extra in paths:
            rows.append(run(name, [*base, *extra], Path(folder), timeout=240))
            print(f"{name}: exit {rows[-1]['exit']} in {rows[-1]['seconds']:.0f} s", flush=True)
        # kill -9 in the middle, then --resume auto, against the run above that was never stopped
        resume = [*base, "--precision", "32-true"]
        killed = Path(folder) / "killed"
        env = {"FAULT": "sigkill", "FAULT_AT_FORWARD": str(steps // 2 + 3)}
        subprocess.run([sys.executable, str(REPO / "tests" / "fault_driver.py"), "--root_dir", str(killed), *resume,
                        "--checkpoint_every_n_steps", str(steps // 2)], cwd=REPO, env={**os.environ, **env},
                       capture_output=True, timeout=240)
        row = run("kill -9, --resume auto", [*resume, "--checkpoint_every_n_steps", str(steps // 2), "--resume",
                                             str(next(killed.iterdir()))], Path(folder), timeout=240)
        if row["exit"] == 0:
            straight = final_weights(rows[0]["out"] / "runs")["model"]
            resumed = final_weights(killed)["model"]
            row["note"] = "largest weight difference to the run never stopped: " + \
                f"{max((straight[k].double() - resumed[k].double()).abs().max().item() for k in straight):.1e}"
        rows.append(row)
    write_table(rows, device, args.out, f"the GPT GPU preset{'' if cuda else ' shrunk to 2 layers of width 64'}, "
                f"{steps} steps per eager path")
    # the background checkpoint save of a model of 1.6 GB (a small one in the dry run): how long it blocks training
    size = ["--layers", "24", "--width", "4096"] if cuda else ["--layers", "2", "--width", "512"]
    save = subprocess.run([sys.executable, str(REPO / "benchmarks" / "checkpoint_save.py"), "--accelerator",
                           args.accelerator, "--repeats", "1", *size], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    report = save.stdout if save.returncode == 0 else f"checkpoint_save.py failed:\n{save.stderr[-2000:]}"
    with open(args.out, "a") as f:
        f.write(f"\nCheckpoint saves (benchmarks/checkpoint_save.py {' '.join(size)}):\n\n{report}")
    print(report)
    sys.exit(0 if all(row["exit"] == 0 for row in rows) and save.returncode == 0 else 1)


def write_table(rows: list[dict], device: str, out: Path, workload: str) -> None:
    import torch

    def number(value, form):
        return "-" if value is None else format(value, form)

    lines = [f"{time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}; {workload}", "",
             "| path | exit | s/step | tokens/s | MFU | peak GiB | syncs/step | note |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        syncs = row["syncs"] / max(1, row["steps"] - 1) if row.get("syncs") is not None else None
        lines.append(f"| {row['path']} | {row['exit']} | {number(row.get('seconds_per_step'), '.4f')} | "
                     f"{number(row.get('tokens_per_sec'), ',.0f')} | {number(row.get('mfu'), '.1%')} | "
                     f"{number(row.get('peak_gib'), '.2f')} | {number(syncs, '.2f')} | {row.get('note', '')} |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"table written to {out}")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
