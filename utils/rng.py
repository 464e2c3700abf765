"""Random states of Python, NumPy and torch (and CUDA) as tensors, so that weights_only loading still works."""

import random

import numpy as np
import torch
from lightning.fabric import Fabric


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA device whose generator this process draws from, for fork_rng, which restores only the devices it is
    given (torch.manual_seed inside it reseeds every CUDA generator)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def capture_rng() -> dict[str, torch.Tensor]:
    _, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": torch.tensor([py_gauss is not None, py_gauss or 0.0], dtype=torch.float64),
        "numpy": torch.tensor(np_keys.astype(np.int64)),
        "numpy_pos_gauss": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((3, tuple(state["python"].tolist()), gauss if has_gauss else None))
    pos, np_has_gauss, np_gauss = state["numpy_pos_gauss"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(np_has_gauss), np_gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def gather_rng(fabric: Fabric) -> list[dict[str, torch.Tensor]]:
    """Every rank's random state, as a list indexed by global rank (all ranks must call this)."""
    gathered = {}
    for name, value in capture_rng().items():
        slots = torch.zeros(fabric.world_size, *value.shape, dtype=value.dtype, device=fabric.device)
        slots[fabric.global_rank] = value  # a sum over ranks of one filled slot each is a gather
        gathered[name] = fabric.all_reduce(slots, reduce_op="sum").cpu()
    return [{name: value[rank].clone() for name, value in gathered.items()} for rank in range(fabric.world_size)]
