"""--ema_decay: an exponential moving average of the weights, which validation, best.ckpt, test.py, sample.py and
--init_from use. It costs one copy of the weights and one fused update after each optimizer step."""

import contextlib

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from utils.checkpoint import COMPILED


class EMA:
    """average = decay x average + (1 - decay) x weights, for every floating-point tensor of the module's state_dict
    (parameters and buffers; other buffers, such as counters, are copied). Under fsdp2 each rank averages its own
    shard. Saved in a checkpoint beside `model` as a state_dict of the same keys and full shapes."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        state = module.state_dict(keep_vars=True)  # the live tensors: updated in place, read in place
        self.names = [name.replace(COMPILED, "") for name in state]  # as the model's own entry in a checkpoint
        self.sharded = [tensor if isinstance(tensor, DTensor) else None for tensor in state.values()]
        self.live = [(tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach() for tensor in
                     state.values()]  # this rank's shard of a sharded tensor
        self.average = [tensor.clone() for tensor in self.live]

    @torch.no_grad()
    def update(self) -> None:
        floating = [i for i, tensor in enumerate(self.average) if tensor.is_floating_point()]
        torch._foreach_lerp_([self.average[i] for i in floating], [self.live[i] for i in floating], 1 - self.decay)
        for i in set(range(len(self.average))) - set(floating):
            self.average[i].copy_(self.live[i])

    @torch.no_grad()
    def restart(self) -> None:
        """The average starts again from the weights as they are."""
        torch._foreach_copy_(self.average, self.live)

    @contextlib.contextmanager
    def swapped_in(self):
        """The module holds the average inside the block, its own weights again after it."""
        own = [tensor.clone() for tensor in self.live]
        torch._foreach_copy_(self.live, self.average)
        try:
            yield
        finally:
            torch._foreach_copy_(self.live, own)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors (all ranks under fsdp2: the shards are gathered)."""
        return {name: average if like is None else
                DTensor.from_local(average, like.device_mesh, like.placements, shape=like.shape,
                                   stride=like.stride()).full_tensor()
                for name, average, like in zip(self.names, self.average, self.sharded, strict=True)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """From full tensors (all ranks under fsdp2: each keeps its shard)."""
        for name, average, like in zip(self.names, self.average, self.sharded, strict=True):
            full = state[name].to(average.device)
            average.copy_(full if like is None else
                          distribute_tensor(full, like.device_mesh, like.placements).to_local())
