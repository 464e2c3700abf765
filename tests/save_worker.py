"""Saves a large state again and again with the template's checkpoint code, for kill-mid-save tests.

    python tests/save_worker.py CKPT_DIR SIZE_MB           # prints "saved N" once save N is written and in place
    python tests/save_worker.py CKPT_DIR SIZE_MB SAVES     # SAVES saves, then exits at once, writes still running
"""

import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.checkpoint import AtomicCheckpointIO, checkpoint_name, finish_saves, save_checkpoint  # noqa: E402
from utils.exits import exit_run  # noqa: E402

ckpt_dir, size_mb = Path(sys.argv[1]), int(sys.argv[2])
saves = int(sys.argv[3]) if len(sys.argv) > 3 else None
fabric = Fabric(accelerator="cpu", devices=1, plugins=[AtomicCheckpointIO()])
model = torch.nn.Linear(1024, size_mb * 256, bias=False)  # 4 bytes x 1024 x 256 = 1 MB per size_mb
for step in range(1, saves + 1 if saves else 1000):
    with torch.no_grad():
        model.weight.fill_(step)  # changed right after the save returns, while the write may still run
    save_checkpoint(fabric, ckpt_dir, checkpoint_name(0, step), {"model": model, "global_step": step})
    if not saves:
        finish_saves(fabric)
        print(f"saved {step}", flush=True)
with torch.no_grad():
    model.weight.fill_(-1)
exit_run(0)
