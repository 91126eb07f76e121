"""Expert scores for routing. A score has two parts so that it can be computed on shards:

- `partial(exp_avg, exp_avg_sq, eps)`: a sum over one tensor's elements (accumulated in at least
  float32), which adds up across the tensors of an expert and across FSDP shards;
- `finalize(total, numel, lr)`: the expert's score from the summed partials, its global element
  count and its current learning rate (all tensors, batched over modules and experts; a module's
  scores must depend only on its own row).

Both work on the raw (not bias-corrected) moments, as the paper specifies.

A score may also name a `kernel` ("epd" or "pfn"): MoLFAdamW then computes the same partial and
finalize in its fused kernels (one pass with the moment update) and in batched foreach ops.
Scores without a kernel, like any `Score(name, partial, finalize)` a user registers, go through
`partial` tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from molf.errors import MolfError

KERNELS = ("epd", "pfn")


@dataclass(frozen=True)
class Score:
    """A routing score: see the module docstring for the parts."""

    name: str
    partial: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    finalize: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    kernel: str | None = None

    def __post_init__(self) -> None:
        if self.kernel is not None and self.kernel not in KERNELS:
            raise MolfError(
                f"Score.kernel: unknown kernel {self.kernel!r} (known: {', '.join(KERNELS)})"
            )


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
EPD = register_score(Score("epd", _epd_partial, _epd_finalize, kernel="epd"))
# Preconditioned Frobenius Norm: ||m / (sqrt(v) + eps)||_F / sqrt(N_e). The paper's ablation.
PFN = register_score(Score("pfn", _pfn_partial, _pfn_finalize, kernel="pfn"))

# Elements per foreach batch in `batched_partials`: bounds its temporaries (two per batch).
_BATCH_ELEMENTS = 1 << 24


def batched_partials(
    score: Score, exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], eps: float
) -> torch.Tensor:
    """`score.partial` of every tensor, as one 1-d tensor on their device.

    A kernel score runs as a few foreach ops per batch of tensors (the partial is a squared norm:
    EPD sums (m / sqrt(sqrt(v) + eps))^2, PFN (m / (sqrt(v) + eps))^2) instead of several small
    ops per tensor, which matters on an accelerator with hundreds of tensors.
    """
    if score.kernel is None or not exp_avgs:
        return torch.stack([score.partial(m, v, eps) for m, v in zip(exp_avgs, exp_avg_sqs)])
    out: list[torch.Tensor] = []
    start = 0
    while start < len(exp_avgs):
        stop, size = start, 0
        while stop < len(exp_avgs) and (stop == start or size < _BATCH_ELEMENTS):
            size += exp_avgs[stop].numel()
            stop += 1
        ms, vs = list(exp_avgs[start:stop]), list(exp_avg_sqs[start:stop])
        acc = [_acc_dtype(m) for m in ms]
        denom = torch._foreach_sqrt([v.to(dt) for v, dt in zip(vs, acc)])
        torch._foreach_add_(denom, eps)
        if score.kernel == "epd":
            torch._foreach_sqrt_(denom)
        ratio = torch._foreach_div([m.to(dt) for m, dt in zip(ms, acc)], denom)
        norms = torch._foreach_norm(ratio)
        out.append(torch.stack(norms).square())
        start = stop
    return torch.cat(out)
