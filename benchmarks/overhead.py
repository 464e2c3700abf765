"""What the template costs: its own train.py against a hand-written PyTorch loop, Lightning's Trainer and Hugging Face
accelerate, on the same model, data, batch, optimizer, LR schedule and seed.

    pip install -r benchmarks/requirements.txt        # accelerate, for its row
    python benchmarks/overhead.py                      # both workloads, 5 rounds, 1 thread
    python benchmarks/overhead.py --workloads gpt --gpt_steps 2000 --threads 2 --rounds 3   # nanoGPT's recipe

Workloads: `digits`, the default run (`python train.py`: 10 epochs of the CNN); `gpt`, the character-level preset
(configs/shakespeare_char.yaml) cut to --gpt_steps steps. Every variant validates, logs and saves a checkpoint at the
template's steps and keeps a best checkpoint; the template runs unmodified, with its default loggers, progress bar
and checkpoints. Each run is a fresh process pinned to one core with --threads threads, the rounds interleave the
variants, and every optimizer step is stamped by a global optimizer hook, the same in every variant. Per variant it
prints the median and minimum over rounds of the run's median step time (the first 10 steps dropped), the ratio to
the plain loop, the time from process start to the first optimizer step, the whole process and its peak resident
memory. The figures count only if the template and the plain loop end with bit-identical weights (checked).
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
VARIANTS = ("plain", "template", "lightning", "accelerate")
WARMUP_STEPS = 10  # dropped from the step times: first calls, allocator growth


# -- the parent: what each workload is, the rounds, the table --------------------------------------------------------

def template_args(workload: str, gpt_steps: int) -> list[str]:
    if workload == "digits":
        return []
    return ["--config_path", "configs/shakespeare_char.yaml", "--max_steps", str(gpt_steps)]


def make_spec(workload: str, gpt_steps: int) -> dict:
    """The run the template makes of its flags, spelled out for the other variants: settings, and the steps that
    log, validate and save (the template's own rules, read from its code)."""
    sys.path.insert(0, str(REPO))
    from config import parse_config
    from utils.batching import plan_batches, scaled_lr
    from utils.loggers import is_log_step
    from utils.lr_schedule import lr_at

    cfg = parse_config(template_args(workload, gpt_steps))
    batches = plan_batches(cfg.eff_batch_size, 1, cfg.micro_batch_size)
    assert batches.accum_steps == 1, "the hand-written loops do not accumulate gradients"
    from data import make_datasets

    train_size = len(make_datasets(cfg)[0])
    steps_per_epoch = train_size // cfg.eff_batch_size
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    peak = scaled_lr(cfg.base_lr, cfg.eff_batch_size, cfg.base_batch_size, cfg.lr_scaling_rule)
    steps = range(1, total + 1)
    return {
        "workload": workload, "seed": cfg.seed, "batch": cfg.eff_batch_size, "steps_per_epoch": steps_per_epoch,
        "total_steps": total, "grad_clip": cfg.grad_clip, "weight_decay": cfg.weight_decay,
        "betas": [cfg.beta1, cfg.beta2], "dropout": cfg.dropout, "data": vars(cfg.data), "model": vars(cfg.model),
        "lr": [lr_at(s, peak, cfg.warmup_steps, total, cfg.lr_schedule, cfg.min_lr_ratio) for s in steps],
        "log_steps": [s for s in steps if is_log_step(cfg, s, steps_per_epoch, total)],
        "val_steps": [s for s in steps if s == total or (s % cfg.val_every_n_steps == 0 if cfg.val_every_n_steps
                                                          else s % steps_per_epoch == 0)],
        "ckpt_steps": [s for s in steps if s == total or (
            s % cfg.checkpoint_every_n_steps == 0 if cfg.checkpoint_every_n_steps
            else s % steps_per_epoch == 0 and (s // steps_per_epoch) % cfg.checkpoint_frequency == 0)],
        "template_args": template_args(workload, gpt_steps),
    }


def run_once(variant: str, spec_file: Path, out: Path, threads: int, cores: set[int]) -> dict:
    """One run in a fresh process: its step stamps, time to first step, whole time and peak memory."""
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0"}
    command = [sys.executable, __file__, "--child", variant, "--spec", str(spec_file), "--out", str(out),
               "--threads", str(threads)]
    with open(out / "output.log", "w") as log:
        start = time.time()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: os.sched_setaffinity(0, cores))
        _, status, usage = os.wait4(proc.pid, 0)
        whole = time.time() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{variant} failed (exit {os.waitstatus_to_exitcode(status)}):\n"
                 f"{(out / 'output.log').read_text()[-3000:]}")
    stamps = json.loads((out / "stamps.json").read_text())
    gaps = [b - a for a, b in zip(stamps["perf"], stamps["perf"][1:], strict=False)][WARMUP_STEPS:]
    return {"median_step": statistics.median(gaps), "first_step": stamps["first_wall"] - start, "whole": whole,
            "peak_rss_mb": usage.ru_maxrss / 1024, "steps": len(stamps["perf"])}


def final_weights(variant: str, out: Path) -> dict:
    import torch

    if variant == "template":
        path = max((out / "runs").glob("*/checkpoints/epoch-*.ckpt"))
        return torch.load(path, map_location="cpu", weights_only=True)["model"]
    return torch.load(out / "final.pt", map_location="cpu", weights_only=True)


def bench(workload: str, args, folder: Path) -> None:
    spec = make_spec(workload, args.gpt_steps)
    spec_file = folder / f"{workload}.json"
    spec_file.write_text(json.dumps(spec))
    variants = [v for v in VARIANTS if v in args.variants]
    results = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants[round_ % len(variants):] + variants[:round_ % len(variants)]:  # rotate the order
            results[variant].append(run_once(variant, spec_file, folder / f"{workload}-{variant}-{round_}",
                                              args.threads, args.cores))
            print(f"  {workload} round {round_ + 1} {variant}: {results[variant][-1]['median_step'] * 1e3:.2f} ms "
                  f"per step, {results[variant][-1]['whole']:.2f} s", file=sys.stderr)
    identical = None
    if {"plain", "template"} <= set(variants):
        import torch

        plain, template = (final_weights(v, folder / f"{workload}-{v}-0") for v in ("plain", "template"))
        identical = plain.keys() == template.keys() and all(torch.equal(plain[k], template[k]) for k in plain)
    print(f"\n### {workload}: {spec['total_steps']} steps of {spec['batch']} samples, {args.rounds} rounds, "
          f"{args.threads} thread(s)\n")
    if identical is not None:
        print(f"template and plain loop end with bit-identical weights: {'yes' if identical else 'NO (invalid)'}\n")
    base = statistics.median(r["median_step"] for r in results.get("plain", results[variants[0]]))
    base_first = statistics.median(r["first_step"] for r in results.get("plain", results[variants[0]]))
    base_whole = statistics.median(r["whole"] for r in results.get("plain", results[variants[0]]))
    print("| variant | step ms (median) | step ms (min) | x plain | first step s | vs plain s | whole s | x plain "
          "| peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, runs in results.items():
        step = statistics.median(r["median_step"] for r in runs)
        first = statistics.median(r["first_step"] for r in runs)
        whole = statistics.median(r["whole"] for r in runs)
        print(f"| {variant} | {step * 1e3:.2f} | {min(r['median_step'] for r in runs) * 1e3:.2f} | "
              f"{step / base:.3f} | {first:.2f} | {first - base_first:+.2f} | {whole:.2f} | {whole / base_whole:.3f} "
              f"| {statistics.median(r['peak_rss_mb'] for r in runs):.0f} |")
    if identical is False:
        sys.exit("the template and the plain loop did not end with the same weights: the comparison is invalid")


# -- the children: one variant each, stamping every optimizer step ---------------------------------------------------

def stamp_optimizer_steps(out: Path) -> None:
    """Records the time of every optimizer step of any optimizer (a global hook), written out at exit."""
    import atexit

    from torch.optim.optimizer import register_optimizer_step_post_hook

    perf, first = [], []

    def after_step(optimizer, args, kwargs):
        perf.append(time.perf_counter())
        if not first:
            first.append(time.time())

    register_optimizer_step_post_hook(after_step)
    atexit.register(lambda: (out / "stamps.json").write_text(json.dumps({"perf": perf, "first_wall": first[0]})))


def workload_parts(spec: dict):
    """The template's own data and model (data.py, model.py import no lightning), built as the template builds
    them: the model from the seed, then the seed again for dropout."""
    from types import SimpleNamespace

    import torch

    from data import make_datasets
    from model import make_model

    cfg = SimpleNamespace(data=SimpleNamespace(**spec["data"]), model=SimpleNamespace(**spec["model"]),
                          dropout=spec["dropout"])
    train_set, val_set, _ = make_datasets(cfg)
    torch.manual_seed(spec["seed"])
    model = make_model(cfg)
    torch.manual_seed(spec["seed"])
    return model, train_set, val_set


def param_groups(model, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def validation_loss(model, val_loader) -> float:
    """Cross-entropy per scored target over the validation set, as the template's evaluate() computes it."""
    import torch
    import torch.nn.functional as F

    from data import IGNORE_INDEX

    model.eval()
    with torch.no_grad():
        loss_sum, count = 0.0, 0
        for inputs, targets in val_loader:
            loss_sum += F.cross_entropy(model(inputs).flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX,
                                        reduction="sum").item()
            count += (targets != IGNORE_INDEX).sum().item()
    model.train()
    return loss_sum / count


def plain(spec: dict, out: Path) -> None:
    """The loop a researcher would write by hand: no lightning imported."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader


    model, train_set, val_set = workload_parts(spec)
    optimizer = torch.optim.AdamW(param_groups(model, spec["weight_decay"]), lr=spec["lr"][0],
                                  betas=tuple(spec["betas"]))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    val_loader = DataLoader(val_set, batch_size=spec["batch"])
    log_steps, val_steps, ckpt_steps = (set(spec[k]) for k in ("log_steps", "val_steps", "ckpt_steps"))
    step, logged, loss_sum, best = 0, 0, torch.zeros(()), math.inf
    while step < spec["total_steps"]:
        # the template's shuffle (a generator seeded per epoch), so the weights compare bit for bit
        epoch = step // spec["steps_per_epoch"]
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(spec["seed"] + epoch))
        order = order[: spec["steps_per_epoch"] * spec["batch"]].tolist()
        loader = DataLoader(train_set, batch_size=spec["batch"], sampler=order, generator=torch.Generator())
        for inputs, targets in loader:
            for group in optimizer.param_groups:
                group["lr"] = spec["lr"][step]
            loss = F.cross_entropy(model(inputs).flatten(0, -2), targets.flatten())
            loss.backward()
            step += 1
            if spec["grad_clip"] or step in log_steps:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, spec["grad_clip"] or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            if step in log_steps:
                print(f"step {step}: loss {loss_sum.item() / (step - logged):.4f}, grad norm {grad_norm.item():.3f}")
                loss_sum.zero_()
                logged = step
            if step in val_steps:
                val = validation_loss(model, val_loader)
                print(f"step {step}: val loss {val:.4f}")
                if val < best:
                    best = val
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out / "best.pt")
            if step in ckpt_steps:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                           out / f"step-{step}.pt")
            if step == spec["total_steps"]:
                break
    torch.save(model.state_dict(), out / "final.pt")


def lightning_trainer(spec: dict, out: Path) -> None:
    """Lightning's Trainer with its defaults (progress bar, TensorBoard logger, checkpoints) at the same steps."""
    import lightning as L
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from data import IGNORE_INDEX

    model, train_set, val_set = workload_parts(spec)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            for group in self.optimizers().param_groups:
                group["lr"] = spec["lr"][self.global_step]
            inputs, targets = batch
            loss = F.cross_entropy(self.model(inputs).flatten(0, -2), targets.flatten())
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):
            inputs, targets = batch
            loss = F.cross_entropy(self.model(inputs).flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)
            self.log("val_loss", loss)

        def configure_optimizers(self):
            return torch.optim.AdamW(param_groups(self.model, spec["weight_decay"]), lr=spec["lr"][0],
                                     betas=tuple(spec["betas"]))

    loader = DataLoader(train_set, batch_size=spec["batch"], shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(spec["seed"]))
    by_steps = spec["workload"] != "digits"
    val_every = spec["val_steps"][0]
    checkpoints = [ModelCheckpoint(out / "checkpoints", every_n_train_steps=spec["ckpt_steps"][0], save_top_k=-1),
                   ModelCheckpoint(out / "checkpoints", filename="best", monitor="val_loss")]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=spec["total_steps"], default_root_dir=out,
                        log_every_n_steps=spec["log_steps"][0], callbacks=checkpoints,
                        val_check_interval=val_every if by_steps else 1.0, num_sanity_val_steps=0,
                        gradient_clip_val=spec["grad_clip"], enable_model_summary=False)
    trainer.fit(Module(), loader, DataLoader(val_set, batch_size=spec["batch"]))
    torch.save(model.state_dict(), out / "final.pt")


def accelerate_loop(spec: dict, out: Path) -> None:
    """Hugging Face accelerate: the plain loop with its Accelerator."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from torch.utils.data import DataLoader


    accelerator = Accelerator(cpu=True)
    model, train_set, val_set = workload_parts(spec)
    optimizer = torch.optim.AdamW(param_groups(model, spec["weight_decay"]), lr=spec["lr"][0],
                                  betas=tuple(spec["betas"]))
    loader = DataLoader(train_set, batch_size=spec["batch"], shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(spec["seed"]))
    val_loader = DataLoader(val_set, batch_size=spec["batch"])
    model, optimizer, loader, val_loader = accelerator.prepare(model, optimizer, loader, val_loader)
    log_steps, val_steps, ckpt_steps = (set(spec[k]) for k in ("log_steps", "val_steps", "ckpt_steps"))
    step, logged, loss_sum, best = 0, 0, torch.zeros(()), math.inf
    while step < spec["total_steps"]:
        for inputs, targets in loader:
            for group in optimizer.param_groups:
                group["lr"] = spec["lr"][step]
            loss = F.cross_entropy(model(inputs).flatten(0, -2), targets.flatten())
            accelerator.backward(loss)
            step += 1
            if spec["grad_clip"] or step in log_steps:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), spec["grad_clip"] or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            if step in log_steps:
                accelerator.print(f"step {step}: loss {loss_sum.item() / (step - logged):.4f}, "
                                  f"grad norm {grad_norm.item():.3f}")
                loss_sum.zero_()
                logged = step
            if step in val_steps:
                val = validation_loss(model, val_loader)
                accelerator.print(f"step {step}: val loss {val:.4f}")
                if val < best:
                    best = val
                    accelerator.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                                     out / "best.pt")
            if step in ckpt_steps:
                accelerator.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                                 out / f"step-{step}.pt")
            if step == spec["total_steps"]:
                break
    accelerator.save(accelerator.unwrap_model(model).state_dict(), out / "final.pt")


def child(variant: str, spec: dict, out: Path, threads: int) -> None:
    sys.path.insert(0, str(REPO))
    stamp_optimizer_steps(out)
    import torch

    torch.set_num_threads(threads)
    if variant == "template":  # the real train.py, as `python train.py ...` runs it
        import runpy

        sys.argv = ["train.py", *spec["template_args"], "--root_dir", str(out / "runs")]
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    else:
        {"plain": plain, "lightning": lightning_trainer, "accelerate": accelerate_loop}[variant](spec, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["digits", "gpt"], choices=["digits", "gpt"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gpt_steps", type=int, default=300, help="Optimizer steps of the GPT workload.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run.")
    parser.add_argument("--core", type=int, default=1, help="The CPU core every 1-thread run is pinned to.")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cores = {args.core} if args.threads == 1 else set(range(os.cpu_count()))
    if args.child:
        child(args.child, json.loads(args.spec.read_text()), args.out, args.threads)
        return
    import platform

    import lightning
    import torch

    print(f"{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}; "
          f"each run pinned to core(s) {sorted(args.cores)}")
    with tempfile.TemporaryDirectory() as folder:
        for workload in args.workloads:
            bench(workload, args, Path(folder))


if __name__ == "__main__":
    main()
