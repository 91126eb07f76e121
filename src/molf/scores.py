"""Expert scores for routing. A score has two parts so that it can be computed on shards:

- `partial(exp_avg, exp_avg_sq, eps)`: a sum over one tensor's elements (accumulated in at least
  float32), which adds up across the tensors of an expert and across FSDP shards;
- `finalize(total, numel, lr)`: the expert's score from the summed partials, its global element
  count and its current learning rate (all tensors, batched over modules and experts).

Both work on the raw (not bias-corrected) moments, as the paper specifies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from molf.errors import MolfError


@dataclass(frozen=True)
class Score:
    """A routing score: see the module docstring for the two parts."""

    name: str
    partial: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    finalize: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


SCORES: dict[str, Score] = {}


def register_score(score: Score) -> Score:
    """Add a score to the registry so that `MoLFAdamW(score=name)` can use it."""
    SCORES[score.name] = score
    return score


def get_score(name: str) -> Score:
    """The registered score called `name`; MolfError (a ValueError) names the field otherwise."""
    if name not in SCORES:
        raise MolfError(f"score: unknown score '{name}' (registered: {', '.join(sorted(SCORES))})")
    return SCORES[name]


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _epd_partial(m: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    dt = _acc_dtype(m)
    m = m.to(dt)
    return (m * m / (v.to(dt).sqrt() + eps)).sum()


def _epd_finalize(total: torch.Tensor, numel: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    return lr * total / numel


def _pfn_partial(m: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    dt = _acc_dtype(m)
    u = m.to(dt) / (v.to(dt).sqrt() + eps)
    return (u * u).sum()


def _pfn_finalize(total: torch.Tensor, numel: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    return total.sqrt() / numel.sqrt()


# Expected Preconditioned Descent: lr_e / N_e * sum m^2 / (sqrt(v) + eps), the expected decrease
# of the loss per parameter if expert e took an Adam step. The paper's default.
EPD = register_score(Score("epd", _epd_partial, _epd_finalize))
# Preconditioned Frobenius Norm: ||m / (sqrt(v) + eps)||_F / sqrt(N_e). The paper's ablation.
PFN = register_score(Score("pfn", _pfn_partial, _pfn_finalize))
