"""csv, tensorboard and wandb loggers, each in RUN/logs/<name>/, continuing cleanly after a resume."""

import csv
from pathlib import Path

from lightning.fabric.loggers import CSVLogger, TensorBoardLogger


def make_loggers(names: list[str], run_dir: Path, start_step: int, wandb_project: str) -> list:
    """Loggers for a run that starts (or resumes) after optimizer step `start_step`."""
    logs = run_dir / "logs"
    loggers = []
    if "csv" in names:
        loggers.append(_resumed_csv_logger(logs, start_step))
    if "tensorboard" in names:
        # purge_step hides events an earlier process logged after its last checkpoint
        loggers.append(TensorBoardLogger(logs, name="tensorboard", version="", purge_step=start_step + 1))
    if "wandb" in names:
        from lightning.pytorch.loggers import WandbLogger  # imported only when asked for: it is slow

        # one W&B run per run folder: a resume continues it under the same id
        loggers.append(WandbLogger(project=wandb_project, save_dir=str(logs), name=run_dir.name, id=run_dir.name,
                                   resume="allow"))
    return loggers


def _resumed_csv_logger(logs: Path, start_step: int) -> CSVLogger:
    """Fabric's CSVLogger starts metrics.csv afresh in a new process: replay the rows up to `start_step`."""
    metrics_file = logs / "csv" / "metrics.csv"
    rows = []
    if start_step and metrics_file.is_file():
        with open(metrics_file, newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["step"]) <= start_step]
    logger = CSVLogger(logs, name="csv", version="", flush_logs_every_n_steps=1)
    for row in rows:
        step = int(row.pop("step"))
        logger.log_metrics({k: v for k, v in row.items() if v != ""}, step=step)  # as written, text
    return logger


def log_hyperparams(loggers: list, params: dict) -> None:
    """Sends the config to every logger that takes hyperparameters (Fabric's CSVLogger does not)."""
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            logger.log_hyperparams(params)
