"""Hyperparameter sweeps on Optuna: every trial is an ordinary train.py run in its own run folder, so everything a
run guarantees (records, checkpoints, resume, test.py, report.png) holds for each; the study lives in one journal
file that any number of workers share, on one machine or many (it is safe over NFS).

    python sweep.py --study digits --trials 20 --space sweeps/digits.yaml --epochs 5   # train.py flags after
    python sweep.py --study digits --trials 20 --space sweeps/digits.yaml &            # a second worker, same study
    python sweep.py --study digits --report                                            # the trials, the best run

A trial's objective is its run's best value of --monitor (best.ckpt's; min or max as the metric says). A run that
fails is a failed trial, not retried. The study and its runs are in ROOT_DIR/sweeps/STUDY/.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from config import _all_fields, parse_config
from utils.checkpoint import BEST, open_checkpoint
from utils.exits import exit_run, fail

REPO = Path(__file__).resolve().parent
KINDS = {"float": ("low", "high"), "log_float": ("low", "high"), "int": ("low", "high"), "categorical": ("choices",)}


def load_space(path: Path) -> dict[str, dict]:
    """{setting: its range} from a YAML file of `name: {type: float|log_float|int|categorical, low:, high:}` or
    `{type: categorical, choices: [...]}`; a nested setting may be written model.n_layer. One line on anything else."""
    try:
        space = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        fail(f"space={str(path)!r} cannot be read ({type(err).__name__})")
    if not isinstance(space, dict) or not space:
        fail(f"space={str(path)!r} is invalid: expected a mapping of setting: range")
    settings = {field.name for field in _all_fields()}
    for name, spec in space.items():
        setting = name.split(".")[-1]
        if setting not in settings:
            fail(f"space={str(path)!r}: {name!r} is not a setting of train.py")
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in KINDS or any(key not in spec for key in KINDS[kind]):
            fail(f"space={str(path)!r}: {name!r} is invalid: expected {{type: float|log_float|int, low:, high:}} or "
                 f"{{type: categorical, choices: [...]}}")
    return space


def suggest(trial, space: dict[str, dict]) -> list[str]:
    """The trial's values as train.py flags."""
    flags = []
    for name, spec in space.items():
        kind = spec["type"]
        if kind == "categorical":
            value = trial.suggest_categorical(name, spec["choices"])
        elif kind == "int":
            value = trial.suggest_int(name, int(spec["low"]), int(spec["high"]))
        else:
            value = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=kind == "log_float")
        flags.append(f"--{name.split('.')[-1]}={value}")
    return flags


def open_study(name: str, folder: Path, direction: str | None = None):
    """The study in folder/study.journal (created with `direction` if new; loaded otherwise)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    journal = str(folder / "study.journal")
    storage = JournalStorage(JournalFileBackend(journal, lock_obj=JournalFileOpenLock(journal)))  # NFS-safe lock
    if direction is None:
        return optuna.load_study(study_name=name, storage=storage)
    return optuna.create_study(study_name=name, storage=storage, direction="minimize" if direction == "min" else
                               "maximize", load_if_exists=True)


def run_trial(study, space: dict, train_flags: list[str], folder: Path) -> None:
    """Asks the study for a trial, runs it as train.py in a run folder named by study and trial, and tells the study
    its best monitored value, or that it failed."""
    import optuna

    trial = study.ask()
    out_dir = f"{study.study_name}-trial-{trial.number:04d}"
    command = [sys.executable, str(REPO / "train.py"), *train_flags, *suggest(trial, space),
               "--root_dir", str(folder), "--out_dir", out_dir]
    print(f"trial {trial.number}: {' '.join(command[2:])}", flush=True)
    returncode = subprocess.run(command, stdout=subprocess.DEVNULL).returncode
    runs = sorted(folder.glob(f"*-{out_dir}"))
    if runs:
        trial.set_user_attr("run_dir", str(runs[-1]))
    best = runs[-1] / "checkpoints" / BEST if runs else None
    if returncode != 0 or best is None or not best.exists():
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        print(f"trial {trial.number} failed (train.py exit {returncode})", flush=True)
        return
    value = float(open_checkpoint(best)["best_value"])
    study.tell(trial, value)
    print(f"trial {trial.number}: {value:.4f} ({runs[-1]})", flush=True)


def report(study) -> None:
    """The trials as a table, and the best trial's run folder."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    names = sorted({name for trial in trials for name in trial.params})
    print("| trial | state | value | " + " | ".join(names) + " | run |")
    print("|---" * (len(names) + 4) + "|")
    for trial in trials:
        value = "" if trial.value is None else f"{trial.value:.4f}"
        params = " | ".join(f"{trial.params[name]:.4g}" if isinstance(trial.params.get(name), float)
                            else str(trial.params.get(name, "")) for name in names)
        print(f"| {trial.number} | {trial.state.name.lower()} | {value} | {params} | "
              f"{trial.user_attrs.get('run_dir', '')} |")
    done = [trial for trial in trials if trial.state == optuna.trial.TrialState.COMPLETE]
    if done:
        print(f"best: trial {study.best_trial.number}, {study.best_value:.4f}, "
              f"{study.best_trial.user_attrs.get('run_dir')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="The study's name (its folder: ROOT_DIR/sweeps/STUDY).")
    parser.add_argument("--trials", type=int, default=1, help="Trials this worker runs, one after another.")
    parser.add_argument("--space", type=Path, help="The search space (YAML); needed unless --report.")
    parser.add_argument("--report", action="store_true", help="Print the study's trials and its best run.")
    args, train_flags = parser.parse_known_args()
    cfg = parse_config(train_flags)  # train.py's own checks of the fixed settings, before any trial
    folder = Path(cfg.root_dir) / "sweeps" / args.study
    if args.report:
        if not (folder / "study.journal").is_file():
            fail(f"study={args.study!r}: no study in {folder}")
        report(open_study(args.study, folder))
        return
    if args.space is None:
        fail("space is needed: a YAML file of the settings to search (see sweeps/digits.yaml)")
    if args.trials < 1:
        fail(f"trials={args.trials} is invalid: expected at least 1")
    space = load_space(args.space)
    from train import make_metrics
    from utils.early_stopping import monitor_direction

    study = open_study(args.study, folder, monitor_direction(cfg, make_metrics(cfg)))
    for _ in range(args.trials):
        run_trial(study, space, train_flags, folder)


if __name__ == "__main__":
    main()
    exit_run(0, teardown=False)
