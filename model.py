"""The model: edit make_model to train your own. It returns logits: (batch, classes) or (batch, time, vocabulary).

Three models, chosen by --arch: a small CNN for the digits (default), a GPT for character-level text, and a Hugging
Face causal language model (--hf_path: a folder or hub name) fine-tuned whole or with LoRA adapters (--lora_r).
"""

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from simple_parsing.helpers import list_field
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from data import num_classes
from utils.console import print0
from utils.exits import fail
from utils.frozen import leave_frozen_out_of_checkpoints


@dataclass
class ModelConfig:
    """The model's settings (model.py); in a YAML file under `model:`."""

    arch: Literal["cnn", "gpt", "hf"] = "cnn"
    """Model: cnn (for digits), gpt (a decoder-only transformer, for text) or hf (a Hugging Face causal LM)."""
    n_layer: int = 4
    """GPT: transformer blocks."""
    n_head: int = 4
    """GPT: attention heads per block (must divide N_EMBD)."""
    n_embd: int = 128
    """GPT: width of the residual stream."""
    block_size: int = 64
    """GPT and hf: context length in tokens (the length of a training sample)."""
    bias: bool = False
    """GPT: biases in the linear layers and LayerNorms."""
    hf_path: str = ""
    """hf: the model to fine-tune, a folder that save_pretrained wrote or a hub name (AutoModelForCausalLM), with
    its tokenizer. Its own config sets its dropout."""
    lora_r: int = 0
    """hf: rank of the LoRA adapters (peft). Only they train; the base's weights stay frozen and out of the
    checkpoints. 0: full fine-tuning."""
    lora_alpha: float = 16.0
    """hf: LoRA's scale, alpha / r times the adapters' output."""
    lora_dropout: float = 0.0
    """hf: dropout on the adapters' input."""
    lora_targets: list[str] = list_field()
    """hf: names of the modules that get adapters (c_attn, or q_proj v_proj, ...). Empty: peft's choice for the
    architecture."""

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected positive")
        if self.lora_r < 0:
            raise ValueError(f"lora_r={self.lora_r!r} is invalid: expected at least 0 (0 is full fine-tuning)")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} is invalid: expected in [0, 1)")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is invalid: expected a multiple of n_head={self.n_head}")


def check_settings(cfg) -> None:
    """Checks of settings that span groups, run on every parse: raise ValueError naming the field and value. Here:
    the model that fits the data (edit it with your own data and models)."""
    fitting_arch = {"shakespeare_char": "gpt", "shakespeare_speeches": "hf"}.get(cfg.data.dataset, "cnn")
    if cfg.model.arch != fitting_arch:
        raise ValueError(f"arch={cfg.model.arch!r} is invalid: expected {fitting_arch} for "
                         f"dataset={cfg.data.dataset!r}")
    if cfg.model.arch == "hf" and not cfg.model.hf_path:
        raise ValueError("hf_path='' is invalid: expected a model folder or a hub name for arch='hf'")


def make_model(cfg) -> nn.Module:
    """The model that cfg.model.arch names, sized for cfg.data's dataset, with dropout cfg.dropout."""
    if cfg.model.arch == "hf":
        return CausalLM(cfg.model)
    if cfg.model.arch == "gpt":
        return GPT(cfg.model, num_classes(cfg), cfg.dropout)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(), nn.Dropout(cfg.dropout),
        nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(cfg.dropout),
        nn.Linear(128, num_classes(cfg)),
    )


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units of --strategy fsdp2. Each unit's weights are gathered just before its forward and backward and
    freed after, so a unit is the most memory a rank holds unsharded at once: for the GPT each transformer block, for
    a Sequential each layer with weights, for a Hugging Face model the blocks it names as not to be split. Any other
    model is one unit, the root (name its blocks here to save memory)."""
    if isinstance(model, GPT):
        return list(model.blocks)
    if isinstance(model, CausalLM):
        return model.blocks()
    if isinstance(model, nn.Sequential):
        return [module for module in model if next(module.parameters(), None) is not None]
    print0(f"fsdp2: {type(model).__name__} is sharded as one unit, the root (name its blocks in model.sharding_units "
           f"to gather one at a time)")
    return []


def compile_units(model: nn.Module) -> None:
    """--compile under fsdp2: each unit compiled in its place, before sharding (torch.compile skips the forward of an
    FSDP2 module, so a sharded model cannot be compiled whole)."""
    units = sharding_units(model)
    for parent in [model] + [module for module in model.modules() if units and module is not model]:
        for name, child in parent.named_children():
            if any(child is unit for unit in units):
                setattr(parent, name, torch.compile(child))


def shard_model(model: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> nn.Module:
    """--strategy fsdp2 (Fabric calls it in setup_module): each unit sharded over every process, then the root,
    which takes what is left (the GPT's embeddings and tied head); in the dtypes of the run's precision."""
    for unit in sharding_units(model):
        fully_shard(unit, mesh=mesh["data_parallel"], mp_policy=policy)
    fully_shard(model, mesh=mesh["data_parallel"], mp_policy=policy)
    return model


class SelfAttention(nn.Module):
    """Causal multi-head self-attention through F.scaled_dot_product_attention (fused kernels where there are)."""

    def __init__(self, s: ModelConfig, dropout: float):
        super().__init__()
        self.n_head, self.dropout = s.n_head, dropout
        self.qkv = nn.Linear(s.n_embd, 3 * s.n_embd, bias=s.bias)
        self.out = nn.Linear(s.n_embd, s.n_embd, bias=s.bias)
        self.out_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        # (batch, time, 3 * width) -> 3 x (batch, heads, time, head width)
        q, k, v = self.qkv(x).view(batch, time, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.out_dropout(self.out(y.transpose(1, 2).reshape(batch, time, width)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attention(norm(x)), then x + MLP(norm(x)) with a 4x GELU MLP."""

    def __init__(self, s: ModelConfig, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(s.n_embd, bias=s.bias)
        self.attn = SelfAttention(s, dropout)
        self.mlp_norm = nn.LayerNorm(s.n_embd, bias=s.bias)
        self.mlp = nn.Sequential(nn.Linear(s.n_embd, 4 * s.n_embd, bias=s.bias), nn.GELU(),
                                 nn.Linear(4 * s.n_embd, s.n_embd, bias=s.bias), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """A decoder-only transformer with learned positions and the output layer tied to the token embedding."""

    def __init__(self, s: ModelConfig, vocab_size: int, dropout: float):
        super().__init__()
        self.block_size = s.block_size
        self.token_embedding = nn.Embedding(vocab_size, s.n_embd)
        self.position_embedding = nn.Embedding(s.block_size, s.n_embd)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(s, dropout) for _ in range(s.n_layer))
        self.final_norm = nn.LayerNorm(s.n_embd, bias=s.bias)
        self.head = nn.Linear(s.n_embd, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # tied: one matrix reads and writes tokens
        # GPT-2's init: N(0, 0.02), with each residual branch's last layer scaled down by the depth
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() >= 2:
                depth_scale = math.sqrt(2 * s.n_layer) if name.endswith(("attn.out.weight", "mlp.2.weight")) else 1
                nn.init.normal_(param, mean=0.0, std=0.02 / depth_scale)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


class CausalLM(nn.Module):
    """A Hugging Face causal LM (from_pretrained, in float32: Fabric applies the run's precision), optionally with
    LoRA adapters (peft) of which only the adapters train. Its forward returns the logits, as the GPT's does."""

    def __init__(self, s: ModelConfig):
        super().__init__()
        self.base_path = s.hf_path  # readers of a run check that it holds the base the run recorded
        from transformers import AutoModelForCausalLM  # imported only for this model: it is slow
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()  # of loading the weights: one line per process and run
        try:
            self.lm = AutoModelForCausalLM.from_pretrained(s.hf_path, dtype=torch.float32)
        except OSError as err:
            fail(f"hf_path={s.hf_path!r}: no model there ({str(err).splitlines()[0]})")
        context = getattr(self.lm.config, "max_position_embeddings", None)
        if context is not None and s.block_size > context:
            fail(f"block_size={s.block_size} is invalid: expected at most the {context} positions of {s.hf_path}")
        if s.lora_r:
            from peft import LoraConfig, get_peft_model

            adapters = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                                  target_modules=s.lora_targets or None, task_type="CAUSAL_LM")
            try:
                with warnings.catch_warnings():  # peft's notes on GPT-2's Conv1D layers, which it handles
                    warnings.simplefilter("ignore", UserWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                    self.lm = get_peft_model(self.lm, adapters)  # freezes the base, adds trainable adapters
            except ValueError as err:
                fail(f"lora_targets={s.lora_targets!r} is invalid: {str(err).splitlines()[0]}")
            leave_frozen_out_of_checkpoints(self)  # make_model loads the base again: checkpoints hold the adapters

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=tokens, use_cache=False).logits

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks: the modules of the classes the model names as not to be split."""
        names = set(getattr(self.lm, "_no_split_modules", None) or [])
        return [module for module in self.lm.modules() if type(module).__name__ in names]
