"""The MoLF layer: a linear layer with an FFT expert {W, b} and any number of LoRA experts.

    y = x W^T + b + sum_i s_i * B_i A_i dropout(x)

All experts are trainable in one dense forward pass; the optimizer (molf.optimizer) decides per
step which of them is updated.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from molf.config import MoLFConfig
from molf.errors import MolfError


class MoLFLinear(nn.Module):
    """Wraps an `nn.Linear` (kept as `base_layer`) and adds LoRA experts `lora_A[i]`, `lora_B[i]`."""

    def __init__(self, base_layer: nn.Linear, config: MoLFConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ranks = tuple(config.lora_ranks)
        self.scalings = tuple(config.scalings)
        self.train_base = config.train_base
        self.expert_names = config.expert_names
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        w = base_layer.weight
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.empty(r, base_layer.in_features, device=w.device, dtype=w.dtype))
            for r in self.ranks
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(base_layer.out_features, r, device=w.device, dtype=w.dtype))
            for r in self.ranks
        )
        self.reset_lora_parameters()
        if not config.train_base:
            for p in base_layer.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's init: A kaiming-uniform(a=sqrt(5)), B = 0, so the wrapped layer equals the base."""
        for a, b in zip(self.lora_A, self.lora_B):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b.zero_()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads `module.weight` (e.g. dtype checks) keeps working."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def fft_expert(self) -> list[nn.Parameter]:
        """Parameters of expert 0, the full fine-tuning expert: W and b."""
        return [p for p in (self.base_layer.weight, self.base_layer.bias) if p is not None]

    def lora_experts(self) -> list[list[nn.Parameter]]:
        """[A_i, B_i] for each LoRA expert."""
        return [[a, b] for a, b in zip(self.lora_A, self.lora_B)]

    def experts(self) -> list[list[nn.Parameter]]:
        """The routed experts, in routing order: FFT first (when trained), then the LoRA experts."""
        return ([self.fft_expert()] if self.train_base else []) + self.lora_experts()

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """sum_i s_i B_i A_i computed in `dtype`."""
        delta = torch.zeros(
            self.out_features, self.in_features, dtype=dtype, device=self.weight.device
        )
        for s, a, b in zip(self.scalings, self.lora_A, self.lora_B):
            delta += s * (b.to(dtype) @ a.to(dtype))
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.ranks:
            return y
        xd = self.dropout(x).to(self.lora_A[0].dtype)
        for s, a, b in zip(self.scalings, self.lora_A, self.lora_B):
            y = y + (xd @ a.t() @ b.t()).to(y.dtype) * s
        return y

    def extra_repr(self) -> str:
        return f"experts={list(self.expert_names)}, scalings={[round(s, 4) for s in self.scalings]}"


def _name_matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_target(name: str, config: MoLFConfig) -> bool:
    if _name_matches(name, tuple(config.exclude_modules)):
        return False
    target = config.target_modules
    if target == "all-linear":
        return True
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return _name_matches(name, tuple(target))


def wrap(model: nn.Module, config: MoLFConfig | None = None) -> nn.Module:
    """Replace every target `nn.Linear` of `model` by a `MoLFLinear`, in place; returns `model`.

    Raises MolfError when no module matches `config.target_modules` or the model is wrapped twice.
    """
    config = config or MoLFConfig()
    if molf_modules(model):
        raise MolfError("wrap: the model is already wrapped by molf")
    targets = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name and _is_target(name, config)
    ]
    if not targets:
        raise MolfError(
            f"MoLFConfig.target_modules: no nn.Linear of {type(model).__name__} matches "
            f"{config.target_modules!r} (excluding {list(config.exclude_modules)})"
        )
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoLFLinear(getattr(parent, child), config))
    if config.freezes_non_wrapped:
        wrapped_params = {
            id(p) for m in molf_modules(model).values() for e in m.lora_experts() for p in e
        }
        if config.train_base:
            wrapped_params |= {id(p) for m in molf_modules(model).values() for p in m.fft_expert()}
        for p in model.parameters():
            if id(p) not in wrapped_params:
                p.requires_grad_(False)
    model.molf_config = config
    from molf.saving import guard_save_pretrained  # molf.saving imports this module

    guard_save_pretrained(model)
    return model


def molf_modules(model: nn.Module) -> dict[str, MoLFLinear]:
    """The wrapped modules of `model` by dotted name, in `named_modules` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoLFLinear)}
