"""Saves a large state again and again with the template's checkpoint code, for kill-mid-save tests.

    python tests/save_worker.py CKPT_DIR SIZE_MB
Prints "saved N" after each complete save.
"""

import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.checkpoint import AtomicCheckpointIO, checkpoint_name, save_checkpoint  # noqa: E402

ckpt_dir, size_mb = Path(sys.argv[1]), int(sys.argv[2])
fabric = Fabric(accelerator="cpu", devices=1, plugins=[AtomicCheckpointIO()])
model = torch.nn.Linear(1024, size_mb * 256, bias=False)  # 4 bytes x 1024 x 256 = 1 MB per size_mb
for step in range(1, 1000):
    with torch.no_grad():
        model.weight.fill_(step)
    save_checkpoint(fabric, ckpt_dir, checkpoint_name(0, step), {"model": model, "global_step": step})
    print(f"saved {step}", flush=True)
