"""How many parameters each expert slot trains, like peft's `print_trainable_parameters`.

A slot is one expert across every wrapped module ("fft", "lora_r128", ...): the unit MoLFAdamW
keeps one parameter group for and the routing log reports shares of. "other" counts the trainable
parameters outside the experts (embeddings, norms, lm_head when they are trained).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from molf.errors import MolfError
from molf.layer import molf_modules


def trainable_parameters(model: nn.Module) -> dict[str, Any]:
    """Trainable parameter counts per expert slot and "other", with their share of all parameters.

    Returns `{"slots": {name: {"params": n, "percent": 100 * n / all}}, "trainable": n,
    "all": n, "trainable_percent": p}`; slots in routing order, then "other". Tied parameters
    count once; an expert parameter that was frozen by hand is not counted as trainable.
    """
    modules = molf_modules(model)
    if not modules:
        raise MolfError("trainable_parameters: the model has no MoLF modules; call molf.wrap first")
    counts: dict[str, int] = {}
    in_expert: set[int] = set()
    for m in modules.values():
        for name, params in zip(m.expert_names, m.experts()):
            counts.setdefault(name, 0)
            for p in params:
                if id(p) in in_expert:
                    continue
                in_expert.add(id(p))
                if p.requires_grad:
                    counts[name] += p.numel()
    counts["other"] = 0
    total = 0
    for p in model.parameters():  # each tied parameter once
        total += p.numel()
        if p.requires_grad and id(p) not in in_expert:
            counts["other"] += p.numel()
    trainable = sum(counts.values())

    def pct(n: int) -> float:
        return 100.0 * n / total if total else 0.0

    return {
        "slots": {k: {"params": n, "percent": pct(n)} for k, n in counts.items()},
        "trainable": trainable,
        "all": total,
        "trainable_percent": pct(trainable),
    }


def format_trainable_parameters(model: nn.Module) -> str:
    """The summary of `trainable_parameters` as a few aligned lines."""
    s = trainable_parameters(model)
    width = max(len(k) for k in s["slots"])
    lines = [
        f"{name:<{width}}  {v['params']:>15,d}  {v['percent']:7.3f}%"
        for name, v in s["slots"].items()
    ]
    lines.append(
        f"trainable params: {s['trainable']:,d} || all params: {s['all']:,d} || "
        f"trainable%: {s['trainable_percent']:.4f}"
    )
    return "\n".join(lines)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print trainable parameters per expert slot, then peft's one-line total."""
    print(format_trainable_parameters(model))
