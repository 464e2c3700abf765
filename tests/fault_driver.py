"""Runs train.py in this process with a real fault injected at a chosen training forward pass.

Environment (all optional):
  FAULT_AT_FORWARD=k   the k-th training forward of this rank (1-based)
  FAULT=sigusr1|sigterm|sigkill|nan   send this process that real signal, or make that forward's output NaN
  FAULT_RANKS=0,1      the global ranks that get the fault (default: all)
  BREAK=rng|sampler_epoch|batch_skip  switch off one part of exact resume, for the negative controls

Fabric's launcher re-runs sys.argv (this file) for every extra rank, so each rank injects its own fault.
"""

import os
import signal
import sys
from pathlib import Path

import torch
from torch.nn.modules.module import register_module_forward_hook

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
import utils.rng  # noqa: E402
import utils.samplers  # noqa: E402

forwards = 0


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def inject(module, inputs, output):
    global forwards
    if not (module.training and isinstance(module, torch.nn.Sequential)):
        return None
    forwards += 1
    ranks = os.environ.get("FAULT_RANKS")
    if forwards != int(os.environ.get("FAULT_AT_FORWARD", 0)) or (ranks and str(rank()) not in ranks.split(",")):
        return None
    fault = os.environ["FAULT"]
    if fault == "nan":
        return output * float("nan")
    os.kill(os.getpid(), {"sigusr1": signal.SIGUSR1, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[fault])
    return None


def break_resume(part: str) -> None:
    sampler = utils.samplers.ResumableShuffleSampler
    original = sampler.set_position
    if part == "rng":
        train.restore_rng = lambda state: None
    elif part == "batch_skip":
        sampler.set_position = lambda self, epoch, steps_done=0: original(self, epoch, 0)
    elif part == "sampler_epoch":  # as Fabric's own loader would: epochs counted from 0 in every new process
        first = []
        sampler.set_position = lambda self, epoch, steps_done=0: original(
            self, epoch - (first or first.append(epoch) or first)[0], steps_done)


if os.environ.get("BREAK"):
    break_resume(os.environ["BREAK"])
register_module_forward_hook(inject)
train.main(train.load_config(description=train.__doc__))  # not runpy: it would point sys.argv[0] at train.py
train.exit_run(0)
