"""csv, tensorboard and wandb loggers, each in RUN/logs/<name>/, continuing cleanly after a resume and closed on
every way out of a run."""

import csv
import io
import os
import secrets
from pathlib import Path

from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from lightning.fabric.loggers.csv_logs import _ExperimentWriter

from utils.checkpoint import write_text_atomically


def make_loggers(names: list[str], run_dir: Path, start_step: int, wandb_project: str) -> list:
    """Loggers for a run that starts (or resumes) after optimizer step `start_step`."""
    logs = run_dir / "logs"
    loggers = []
    if "csv" in names:
        loggers.append(ContinuedCSVLogger(logs, start_step))
    if "tensorboard" in names:
        # purge_step hides events an earlier process logged after its checkpoint
        loggers.append(TensorBoardLogger(logs, name="tensorboard", version="", purge_step=start_step + 1,
                                         default_hp_metric=False))
    if "wandb" in names:
        from lightning.pytorch.loggers import WandbLogger  # imported only when asked for: it is slow

        # one W&B run per run folder, under an id kept in the folder: a resume continues it
        loggers.append(WandbLogger(project=wandb_project, save_dir=str(logs), name=run_dir.name,
                                   id=_wandb_run_id(logs / "wandb"), resume="allow"))
    return loggers


def _wandb_run_id(folder: Path) -> str:
    """A random id, made once per run folder (the folder name alone repeats across root_dirs)."""
    path = folder / "run_id"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, secrets.token_hex(8) + "\n")
    return path.read_text().strip()


class _ContinuingWriter(_ExperimentWriter):
    """Fabric's CSV writer deletes an existing metrics.csv (and warns that it will); this one appends to it."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])  # the header: new rows append under it


class ContinuedCSVLogger(CSVLogger):
    """RUN/logs/csv/metrics.csv, one row per logged step. On a resume after step `start_step`, the rows an earlier
    process logged past that step (after its checkpoint) are dropped first, atomically, and new rows append."""

    def __init__(self, logs: Path, start_step: int):
        super().__init__(logs, name="csv", version="", flush_logs_every_n_steps=1)
        metrics_file = Path(self.log_dir) / _ExperimentWriter.NAME_METRICS_FILE
        if metrics_file.is_file():
            with open(metrics_file, newline="") as f:
                reader = csv.DictReader(f)
                kept = [row for row in reader if int(row["step"]) <= start_step]
                header = reader.fieldnames or []
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=header, lineterminator="\r\n")
            writer.writeheader()
            writer.writerows(kept)
            write_text_atomically(metrics_file, text.getvalue())  # a kill leaves the old rows or the kept ones

    @property
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


def log_hyperparams(loggers: list, params: dict) -> None:
    """Sends the config to every logger that takes hyperparameters at the run's start (Fabric's CSVLogger does not;
    TensorBoard's table waits for the first validation, in log_hparams_table)."""
    for logger in loggers:
        if not isinstance(logger, (CSVLogger, TensorBoardLogger)):
            logger.log_hyperparams(params)


def log_hparams_table(loggers: list, params: dict, metric_names: list[str]) -> None:
    """TensorBoard's hparams table, tied to the run's scalar validation metrics (known once a validation has
    computed them: a confusion matrix logs no scalar). Fabric's own call would log a placeholder `hp_metric = -1`."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            from torch.utils.tensorboard.summary import hparams

            values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
            writer = logger.experiment._get_file_writer()
            for summary in hparams(values, dict.fromkeys(metric_names, 0.0)):  # the values are not written
                writer.add_summary(summary)


def close_loggers(loggers: list, status: str) -> None:
    """Flushes and closes every logger (status: success or failed). wandb's own finish() must run too: a rank that
    leaves through os._exit (see utils/exits.py) skips the atexit hook that would call it."""
    for logger in loggers:
        logger.finalize(status)
        if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
            logger.experiment.finish(exit_code=0 if status == "success" else 1)


def is_log_step(cfg, step: int, steps_per_epoch: int, total_steps: int) -> bool:
    """Whether optimizer step `step` ends a logging window: every log_every_n_steps steps, or log_per_epoch times
    per epoch in windows that end by the epoch's end; and the run's last step."""
    if cfg.log_every_n_steps:
        return step % cfg.log_every_n_steps == 0 or step == total_steps
    in_epoch = (step - 1) % steps_per_epoch + 1
    window = in_epoch * cfg.log_per_epoch // steps_per_epoch  # 1 .. log_per_epoch
    return window > (in_epoch - 1) * cfg.log_per_epoch // steps_per_epoch or step == total_steps
