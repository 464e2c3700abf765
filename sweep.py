"""Hyperparameter sweeps on Optuna: every trial is an ordinary train.py run in its own run folder, so everything a
run guarantees (records, checkpoints, resume, test.py, report.png) holds for each; the study lives in one journal
file that any number of workers share, on one machine or many (it is safe over NFS).

    python sweep.py --study digits --trials 20 --space sweeps/digits.yaml --epochs 5   # train.py flags after
    python sweep.py --study digits --trials 20 --space sweeps/digits.yaml &            # a second worker, same study
    python sweep.py --study digits --report                       # the trials as a table, sweep.png, the best run
    sbatch --array=0-31%8 scripts/sweep.slurm --study digits --trials 1 --space sweeps/digits.yaml

A trial's objective is its run's best value of --monitor (best.ckpt's; min or max as the metric says), reported to
the study at each validation, where --pruner median may stop it (a checkpoint, RUN/pruned.yaml, exit 0). A run that
fails is a failed trial, not retried. SIGUSR1 and SIGTERM reach the trial's train.py, which saves and exits 143: in a
SLURM job the worker exits 143 too, the job is requeued, and its next attempt resumes the same trial's run; the
trial is reported once, when it finishes. A worker that died (killed, its node lost) leaves its trial to the next
worker, which marks it failed. The study, its workers' records and the trials' runs are in ROOT_DIR/sweeps/STUDY/.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from config import _all_fields, _group_named, parse_config
from utils.checkpoint import BEST, open_checkpoint, read_yaml_file, write_yaml_atomically
from utils.exits import exit_run, fail
from utils.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED
from utils.sweep_trial import JOURNAL, PRUNED, PRUNER, STUDY, TRIAL, open_study

REPO = Path(__file__).resolve().parent
KINDS = {"float": ("low", "high"), "log_float": ("low", "high"), "int": ("low", "high"), "categorical": ("choices",)}


def load_space(path: Path) -> dict[str, dict]:
    """{setting: its range} from a YAML file of `name: {type: float|log_float|int, low:, high:}` or
    `{type: categorical, choices: [...]}`; a nested setting may be written model.n_layer. One line on anything else."""
    try:
        space = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        fail(f"space={str(path)!r} cannot be read ({type(err).__name__})")
    if not isinstance(space, dict) or not space:
        fail(f"space={str(path)!r} is invalid: expected a mapping of setting: range")
    settings = {field.name for field in _all_fields()}
    for name, spec in space.items():
        if _group_named(f"--{name}").removeprefix("--") not in settings:  # model.n_layer as train.py's flags take it
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
        flags.append(f"--{name}={value}")
    return flags


def worker_key() -> str:
    """This worker's name among the study's workers: its SLURM job (the same in every attempt of a requeued job, and
    one per array task), else host and process."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else f"{socket.gethostname()}-{os.getpid()}"


def worker_alive(record: dict) -> bool:
    """Whether the worker of a record may still finish its trial: its SLURM job is still queued or running (a
    requeued one is), or its process still runs on this host. A worker on another host outside SLURM is presumed
    alive."""
    if record.get("slurm_job"):
        queued = subprocess.run(["squeue", "-h", "-j", record["slurm_job"], "-o", "%T"], capture_output=True,
                                text=True)
        return queued.returncode == 0 and bool(queued.stdout.strip())
    if record["host"] != socket.gethostname():
        return True
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def fail_dead_workers_trials(study, folder: Path) -> None:
    """The trials of workers that died without reporting them (killed, their node lost) are marked failed."""
    import optuna

    for path in sorted((folder / "workers").glob("*.yaml")):
        record = read_yaml_file(path)
        if path.stem == worker_key() or worker_alive(record):
            continue
        try:
            study.tell(record["trial"], state=optuna.trial.TrialState.FAIL)
            print(f"trial {record['trial']}: its worker {path.stem} is gone; failed", flush=True)
        except (RuntimeError, ValueError):
            pass  # another worker marked it first, or it finished after all
        path.unlink(missing_ok=True)


def train_trial(study, number: int, trial_id: int, command: list[str], folder: Path, pruner: str) -> int:
    """Runs train.py for the trial, passing on SIGUSR1 and SIGTERM (a scheduler's notice) so that it saves and exits
    143; Ctrl-C reaches it from the terminal itself. Returns its exit status."""
    env = {**os.environ, JOURNAL: str(folder / "study.journal"), STUDY: study.study_name, TRIAL: str(trial_id),
           PRUNER: pruner}
    print(f"trial {number}: {' '.join(command[2:])}", flush=True)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)

    def forward(signum, frame):
        process.send_signal(signum)

    handlers = {signum: signal.signal(signum, forward) for signum in (signal.SIGUSR1, signal.SIGTERM)}
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trial's train.py decides what Ctrl-C does
    try:
        return process.wait()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        signal.signal(signal.SIGINT, previous_int)


def run_trial(study, space: dict, train_flags: list[str], folder: Path, pruner: str) -> int:
    """One trial: the one this worker was running when it was stopped (a requeued SLURM job), resumed, else a new one
    from the study. Reports it once it ends; returns train.py's exit status."""
    import optuna

    record_path = folder / "workers" / f"{worker_key()}.yaml"
    record = read_yaml_file(record_path) if record_path.is_file() else None
    if record is not None and study.get_trials(deepcopy=False)[record["trial"]].state.is_finished():
        record = None  # reported already (the attempt was stopped after its trial ended)
    if record is None:
        trial = study.ask()
        try:
            flags = suggest(trial, space)
        except ValueError as err:  # a range or choices other than the study's first trials had
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            fail(f"space does not fit study {study.study_name!r}: {err}")
        out_dir = f"{study.study_name}-trial-{trial.number:04d}"
        record = {"trial": trial.number, "trial_id": trial._trial_id, "out_dir": out_dir, "host": socket.gethostname(),
                  "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                  "command": [sys.executable, str(REPO / "train.py"), *train_flags, *flags, "--root_dir",
                              str(folder), "--out_dir", out_dir]}
        record_path.parent.mkdir(parents=True, exist_ok=True)
    else:
        run = sorted(folder.glob(f"*-{record['out_dir']}"))
        print(f"trial {record['trial']}: resuming {run[-1] if run else 'its run'}", flush=True)
        record["command"] = [*record["command"], "--resume", str(run[-1]) if run else "auto"]
        record["pid"] = os.getpid()
    write_yaml_atomically(record_path, record)  # before the run: a successor finds the trial of a dead worker
    number = record["trial"]
    returncode = train_trial(study, number, record["trial_id"], record["command"], folder, pruner)
    if returncode in (EXIT_PREEMPTED, EXIT_INTERRUPTED):  # saved: a requeued attempt (same worker) resumes it
        after = "the requeued job resumes it" if os.environ.get("SLURM_JOB_ID") else \
            "the next worker counts it failed; its run resumes with train.py --resume"
        print(f"trial {number}: stopped (train.py exit {returncode}); {after}", flush=True)
        return returncode
    runs = sorted(folder.glob(f"*-{record['out_dir']}"))
    best = runs[-1] / "checkpoints" / BEST if runs else None
    if returncode != 0 or best is None or not best.exists():
        study.tell(number, state=optuna.trial.TrialState.FAIL)
        print(f"trial {number} failed (train.py exit {returncode})", flush=True)
    elif (runs[-1] / PRUNED).is_file():
        study.tell(number, state=optuna.trial.TrialState.PRUNED)
        print(f"trial {number}: pruned ({runs[-1]})", flush=True)
    else:
        value = float(open_checkpoint(best)["best_value"])
        study.tell(number, value)
        print(f"trial {number}: {value:.4f} ({runs[-1]})", flush=True)
    record_path.unlink(missing_ok=True)
    return returncode


def trial_run(folder: Path, study_name: str, number: int) -> Path | None:
    runs = sorted(folder.glob(f"*-{study_name}-trial-{number:04d}"))
    return runs[-1] if runs else None


def report(study, folder: Path) -> None:
    """The trials as a table, sweep.png (the value of each trial in order, and the settings' importance), and the
    best trial's run folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
              f"{trial_run(folder, study.study_name, trial.number) or ''} |")
    done = [trial for trial in trials if trial.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        print("no trial has finished yet")
        return
    figure, (values, importance) = plt.subplots(1, 2, figsize=(12, 4.5))
    values.plot([t.number for t in done], [t.value for t in done], "o", label="complete")
    best = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
    running = [best(t.value for t in done if t.number <= trial.number) for trial in done]
    values.step([t.number for t in done], running, where="post", label="best so far")
    values.set(xlabel="trial", ylabel=f"best {study.user_attrs.get('monitor', 'value')} of the run",
               title=f"{study.study_name}: {len(done)} complete of {len(trials)} trials")
    values.legend()
    if len(done) >= 2:
        weights = optuna.importance.get_param_importances(study)
        importance.barh(list(weights)[::-1], list(weights.values())[::-1])
        importance.set(title="importance of each setting (fANOVA)", xlabel="importance")
    figure.tight_layout()
    figure.savefig(folder / "sweep.png", dpi=120)
    print(f"best: trial {study.best_trial.number}, {study.best_value:.4f}, "
          f"{trial_run(folder, study.study_name, study.best_trial.number)}")
    print(f"picture: {folder / 'sweep.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="The study's name (its folder: ROOT_DIR/sweeps/STUDY).")
    parser.add_argument("--trials", type=int, default=1, help="Trials this worker runs, one after another.")
    parser.add_argument("--space", type=Path, help="The search space (YAML); needed unless --report.")
    parser.add_argument("--pruner", choices=("median", "none"), default="median",
                        help="median: stop a trial worse than the median of earlier trials at a validation.")
    parser.add_argument("--report", action="store_true", help="Print the trials, draw sweep.png, name the best.")
    args, train_flags = parser.parse_known_args()
    cfg = parse_config(train_flags)  # train.py's own checks of the fixed settings, before any trial
    folder = Path(cfg.root_dir) / "sweeps" / args.study
    if args.report:
        if not (folder / "study.journal").is_file():
            fail(f"study={args.study!r}: no study in {folder}")
        report(open_study(args.study, folder), folder)
        return
    if args.space is None:
        fail("space is needed: a YAML file of the settings to search (see sweeps/digits.yaml)")
    if args.trials < 1:
        fail(f"trials={args.trials} is invalid: expected at least 1")
    space = load_space(args.space)
    from train import make_metrics
    from utils.early_stopping import monitor_direction

    study = open_study(args.study, folder, monitor_direction(cfg, make_metrics(cfg)), args.pruner)
    study.set_user_attr("monitor", cfg.monitor)
    fail_dead_workers_trials(study, folder)
    for _ in range(args.trials):
        returncode = run_trial(study, space, train_flags, folder, args.pruner)
        if returncode in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
            exit_run(returncode)  # sweep.slurm requeues on 143


if __name__ == "__main__":
    main()
    exit_run(0, teardown=False)
