"""Check your copy of the template after editing it: does it still keep the template's promises?

    python check.py                                       # the default workload: about a minute on 2 CPU cores
    python check.py --config_path my.yaml                 # any train.py flags: your data, model and settings
    python check.py --compile                             # also the compile check of your model
    python check.py --only resume                         # some of the checks: resume, splits, compile, test

It trains your copy through short runs in a temporary folder (removed afterwards) and prints a table:

- resume: a run resumed from its checkpoint halfway ends bit-identical to the same run straight through (what a
  preemption or a crash relies on);
- devices and accumulation: at 64-true without dropout, 1 and 2 processes and 1 and 2 accumulation steps end with the
  same weights (what eff_batch_size promises on other hardware; streamed training data: accumulation only);
- compile (with --compile): the compiled model's loss and gradients match eager mode's;
- test.py runs on the result.

Exit status 0 when all hold, 1 when any does not, 2 for bad input.
"""

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from config import parse_config
from utils.checkpoint import list_checkpoints
from utils.exits import fail

PROJECT = Path(__file__).resolve().parent
HALF = 5  # optimizer steps before and after the checkpoint that the resume starts from
SAME = 1e-9  # at 64-true a right split of the batch agrees to about 1e-15; a wrong one differs by about 1e-2


def run(script: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(PROJECT / script), *map(str, args)], cwd=PROJECT, env=env,
                          capture_output=True, text=True)


def last_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "no output")


def final_state(root: Path) -> dict:
    (run_dir,) = [path for path in root.iterdir() if path.is_dir()]
    return torch.load(list_checkpoints(run_dir / "checkpoints")[-1], map_location="cpu", weights_only=True)


def first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    """The first tensor (or value) that differs between two checkpoints, by its place in them."""
    for key in a:
        if key in ("rng", "config", "world_size"):
            continue
        left, right, name = a[key], b.get(key), f"{prefix}{key}"
        if isinstance(left, dict) and isinstance(right, dict):
            if found := first_difference(left, right, f"{name}."):
                return found
        elif isinstance(left, torch.Tensor):
            if not isinstance(right, torch.Tensor) or not torch.equal(left, right):
                return name
        elif left != right:
            return name
    return None


def largest_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def check_resume(flags: list[str], tmp: Path) -> tuple[bool, str]:
    steps = ["--max_steps", 2 * HALF, "--checkpoint_every_n_steps", HALF, "--val_every_n_steps", HALF,
             "--num_checkpoint_keep", 10]
    straight = run("train.py", *flags, *steps, "--root_dir", tmp / "straight")
    if straight.returncode:
        return False, f"train.py failed: {last_error(straight)}"
    (run_dir,) = list((tmp / "straight").iterdir())
    branch = tmp / "branch" / run_dir.name
    shutil.copytree(run_dir, branch)
    halfway = list_checkpoints(branch / "checkpoints")[0]  # a new process continues from it, as after a preemption
    resumed = run("train.py", *flags, *steps, "--root_dir", tmp / "branch", "--resume", halfway)
    if resumed.returncode:
        return False, f"the resume failed: {last_error(resumed)}"
    difference = first_difference(final_state(tmp / "straight"), final_state(tmp / "branch"))
    if difference is None:
        return True, f"bit-identical after a resume at step {HALF} of {2 * HALF}"
    return False, (f"{difference} differs after a resume at step {HALF} of {2 * HALF}. Likely causes: state kept "
                   f"outside the checkpoint (a counter or a cache in training_step: put it in `state`), randomness "
                   f"outside torch's, Python's and NumPy's global generators (a generator of your own), or data that "
                   f"changes between runs")


def splits_to_compare(eff_batch_size: int, on_cpu: bool, streamed: bool) -> dict[str, list]:
    """The ways of splitting a step that must end with the same weights, by name, as train.py flags. Not 2
    processes for streamed training data: litdata deals chunks to ranks, so a step holds other samples there."""
    splits = {"1 process": ["--devices", 1], "accumulation 2": ["--devices", 1, "--micro_batch_size",
                                                               eff_batch_size // 2]}
    if (on_cpu or torch.cuda.device_count() >= 2) and not streamed:
        splits["2 processes"] = ["--devices", 2]
    return splits


def streams(cfg) -> bool:
    """Whether the copy's make_datasets streams its training set (litdata)."""
    import data
    from utils.streaming import is_streaming

    try:
        return is_streaming(data.make_datasets(cfg)[0])
    except data.DataError as err:
        fail(str(err))


def check_splits(flags: list[str], tmp: Path, eff_batch_size: int, on_cpu: bool,
                 streamed: bool) -> tuple[bool | None, str]:
    if eff_batch_size % 2:
        return None, f"skipped: eff_batch_size={eff_batch_size} does not split in two"
    exact = ["--precision", "64-true", "--dropout", "0", "--max_steps", HALF]
    splits = splits_to_compare(eff_batch_size, on_cpu, streamed)
    weights = {}
    for name, split in splits.items():
        result = run("train.py", *flags, *exact, *split, "--root_dir", tmp / name.replace(" ", "-"))
        if result.returncode:
            return False, f"{name} failed: {last_error(result)}"
        weights[name] = final_state(tmp / name.replace(" ", "-"))["model"]
    differences = {name: largest_difference(weights["1 process"], weights[name]) for name in splits}
    worst = max(differences, key=differences.get)
    if differences[worst] <= SAME:
        unsplit = " (streamed data: not over processes)" if streamed else ""
        return True, (f"the same weights for {', '.join(splits)}{unsplit} (largest difference "
                      f"{differences[worst]:.1g}, at 64-true)")
    return False, (f"{worst} ends {differences[worst]:.2g} away from 1 process at 64-true: the loss is not a mean over "
                   f"samples (a loss over pairs of samples, batch statistics such as batch norm), so eff_batch_size "
                   f"does not mean the same on other hardware or with another micro_batch_size")


def check_compile(flags: list[str], tmp: Path) -> tuple[bool, str]:
    result = run("train.py", *flags, "--compile", "--compile_check", "true", "--max_steps", 1, "--root_dir",
                 tmp / "compiled")
    if result.returncode:
        return False, last_error(result)
    return True, next((line for line in result.stdout.splitlines() if "compile check passed" in line), "passed")


def check_test(tmp: Path) -> tuple[bool, str]:
    (run_dir,) = list((tmp / "straight").iterdir())
    result = run("test.py", "--out_dir", run_dir)
    if result.returncode:
        return False, f"test.py failed: {last_error(result)}"
    return True, next((line for line in result.stdout.splitlines() if line.startswith("test ")), "ran")


CHECKS = ("resume", "splits", "compile", "test")


def main() -> None:
    argv = sys.argv[1:]
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        sys.exit(0)
    only = set(CHECKS)
    if "--only" in argv:  # the names after it, up to the next flag
        at = argv.index("--only")
        names = list(itertools.takewhile(lambda arg: not arg.startswith("--"), argv[at + 1:]))
        argv = argv[:at] + argv[at + 1 + len(names):]
        if not names or not set(names) <= set(CHECKS):
            fail(f"only={names!r} is invalid: expected one or more of {', '.join(CHECKS)}")
        only = set(names)
    cfg = parse_config(argv)  # bad flags: one line, exit 2
    for name in ("resume", "init_from"):
        if getattr(cfg, name) is not None:
            fail(f"{name}={getattr(cfg, name)!r} is invalid here: check.py starts its own runs")
    flags = [*argv, "--logger_name", "csv"]
    tmp = Path(tempfile.mkdtemp(prefix="check-"))
    try:
        on_cpu = cfg.accelerator == "cpu" or (cfg.accelerator == "auto" and not torch.cuda.is_available())
        skipped = (None, "skipped (--only)")
        rows = [("resume", *(check_resume(flags, tmp) if "resume" in only else skipped)),
                ("devices and accumulation", *(check_splits(flags, tmp, cfg.eff_batch_size, on_cpu, streams(cfg))
                                               if "splits" in only else skipped)),
                ("compile", *(check_compile(flags, tmp) if cfg.compile and "compile" in only else
                              (None, "skipped: no --compile") if "compile" in only else skipped))]
        straight_ran = (tmp / "straight").is_dir() and any((tmp / "straight").iterdir())
        tested = check_test(tmp) if straight_ran else (None, "skipped: no run to test")
        rows.append(("test.py", *(tested if "test" in only else skipped)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    width = max(len(name) for name, _, _ in rows)
    for name, holds, detail in rows:
        print(f"{name:<{width}}  {'holds' if holds else 'FAILS' if holds is False else '-':<5}  {detail}")
    sys.exit(1 if any(holds is False for _, holds, _ in rows) else 0)


if __name__ == "__main__":
    main()
