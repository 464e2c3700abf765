"""A run started by sweep.py is a trial of an Optuna study: each validation's monitored value is reported to it, and
its pruner may stop the run there, as early stopping does (a checkpoint, RUN/pruned.yaml, exit 0). Outside a sweep
this does nothing and costs nothing."""

import os
from pathlib import Path

from lightning.fabric import Fabric

from utils.checkpoint import write_yaml_atomically

# set by sweep.py for its train.py
JOURNAL, STUDY, TRIAL, PRUNER = "SWEEP_JOURNAL", "SWEEP_STUDY", "SWEEP_TRIAL_ID", "SWEEP_PRUNER"
PRUNED = "pruned.yaml"


def make_pruner(name: str):
    """median: stop a trial whose value at a step is worse than the median of earlier trials' at that step (after 3
    trials have finished); none: never. Optuna keeps no pruner in the study: both sweep.py and train.py make it."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=3) if name == "median" else optuna.pruners.NopPruner()


def open_study(name: str, folder: Path, direction: str | None = None, pruner: str = "none"):
    """The study in folder/study.journal: created with `direction` (min or max) if it is new, else loaded, with the
    pruner named. A journal file under a lock file: safe for many workers, also over NFS."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    journal = str(folder / "study.journal")
    storage = JournalStorage(JournalFileBackend(journal, lock_obj=JournalFileOpenLock(journal)))
    if direction is None:
        return optuna.load_study(study_name=name, storage=storage, pruner=make_pruner(pruner))
    return optuna.create_study(study_name=name, storage=storage, pruner=make_pruner(pruner), load_if_exists=True,
                               direction="minimize" if direction == "min" else "maximize")


class SweepTrial:
    def __init__(self, fabric: Fabric, run_dir: Path):
        self.run_dir, self.trial = run_dir, None
        if fabric.is_global_zero and os.environ.get(TRIAL):  # rank 0 speaks to the study
            import optuna

            from sweep import open_study

            study = open_study(os.environ[STUDY], Path(os.environ[JOURNAL]).parent, pruner=os.environ[PRUNER])
            self.trial = optuna.trial.Trial(study, int(os.environ[TRIAL]))
        self.active = bool(os.environ.get(TRIAL))

    def pruned(self, fabric: Fabric, value: float, step: int) -> bool:
        """All ranks, at each validation: reports `value` at `step`; whether the study's pruner stops the trial."""
        if not self.active:
            return False
        verdict = False
        if self.trial is not None:
            self.trial.report(value, step)
            verdict = self.trial.should_prune()
            if verdict:
                write_yaml_atomically(self.run_dir / PRUNED, {"step": step, "value": value})
        return fabric.broadcast(verdict)  # all ranks
