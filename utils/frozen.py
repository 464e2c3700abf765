"""Checkpoints without a frozen base: a model whose frozen weights make_model loads again at every start (the base
model under LoRA adapters) leaves them out of its state_dict, so checkpoints, the moving average and resumes hold
only what training changes."""

import torch


def leave_frozen_out_of_checkpoints(module: torch.nn.Module) -> None:
    """The module's state_dict (and a parent's) omits its parameters that do not require gradients, and its
    load_state_dict, strict or not, does not count them as missing. Call it once requires_grad is final."""
    frozen = {name for name, param in module.named_parameters(remove_duplicate=False) if not param.requires_grad}

    def omit(_, state_dict: dict, prefix: str, __) -> None:
        for name in frozen:
            state_dict.pop(prefix + name, None)

    def is_frozen(key: str) -> bool:  # a key may carry its parents' prefixes (DDP's module., compile's _orig_mod.)
        parts = key.split(".")
        return any(".".join(parts[start:]) in frozen for start in range(len(parts)))

    def not_missing(_, incompatible) -> None:
        incompatible.missing_keys[:] = [key for key in incompatible.missing_keys if not is_frozen(key)]

    module.register_state_dict_post_hook(omit)
    module.register_load_state_dict_post_hook(not_missing)
