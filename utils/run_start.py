"""What rank 0 alone does when a run starts or resumes: a branch's newer checkpoints moved aside, the run's record
(config.yaml at the first start, what each resume changed in resumes.yaml) and its code, and the loggers."""

from pathlib import Path

from lightning.fabric import Fabric

from utils.base_model import base_record
from utils.checkpoint import move_newer_aside
from utils.console import print0
from utils.loggers import log_hyperparams, make_loggers
from utils.provenance import record_provenance
from utils.resume import resume_changes
from utils.run_dir import record_resume, record_start


def start_records(fabric: Fabric, cfg, run_dir: Path, settings: dict, derived: dict, start_step: int,
                  resumed_from: Path | None, named: Path | None) -> list:
    """Rank 0 (see utils/exits.on_rank_zero): returns the loggers. `resumed_from`: the checkpoint a resume
    restored; `named`: the one --resume named, which starts a branch if newer ones exist."""
    abandoned = move_newer_aside(run_dir / "checkpoints", resumed_from) if named else None
    if abandoned:
        print0(f"resuming from an earlier checkpoint starts a branch: the newer checkpoints were moved to {abandoned}")
    code_copy = record_provenance(run_dir, fabric.world_size, cfg.num_nodes, fabric.device)  # see provenance.py
    if cfg.resume is not None:  # a resumed run (its checkpoint: resumed_from, None if it had none yet)
        for change in resume_changes(run_dir, settings, derived, start_step):  # one line each
            print0(change)
        record_resume(run_dir, settings, derived, start_step, resumed_from, abandoned, code_copy)
    else:
        record_start(run_dir, settings, {**derived, **base_record(cfg)})  # and the base a fine-tuning starts from
    loggers = make_loggers(cfg.logger_name, run_dir, start_step, cfg.wandb_project)  # they need the run folder
    if start_step == 0:  # once per run
        log_hyperparams(loggers, {**settings, **derived})
    return loggers
