"""One loud warning when a molf-wrapped model's experts are stepped by an optimizer that does
not route between them (a plain `torch.optim.AdamW`, or a Trainer without `molf.use_molf`).

Such an optimizer trains every expert at every step: the run is neither MoLF nor FFT nor LoRA,
and nothing else would say so. `molf.wrap` marks the expert parameters; a global optimizer
step pre-hook looks at each optimizer once, at its first step."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from molf.errors import MoLFWarning

_MARK = "_molf_expert"
_seen: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
_hook: Any = None


def watch(params: Iterable[nn.Parameter]) -> None:
    """Mark `params` as MoLF experts and make sure the step hook is installed."""
    global _hook
    for p in params:
        setattr(p, _MARK, True)
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check)


def _check(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if optimizer in _seen:
        return
    _seen.add(optimizer)
    if getattr(optimizer, "routes_experts", False):
        return
    experts = sum(
        1 for group in optimizer.param_groups for p in group["params"] if getattr(p, _MARK, False)
    )
    if experts:
        warnings.warn(
            f"{type(optimizer).__name__} is stepping {experts} expert tensors of a molf-wrapped "
            "model: every expert trains at every step and nothing routes between them. Use "
            "molf.MoLFAdamW(model, ...) in your own loop, or "
            "molf.integrations.transformers.use_molf(trainer) with a "
            "transformers or TRL Trainer",
            MoLFWarning,
            stacklevel=3,
        )
