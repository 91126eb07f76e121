"""Expert scores for routing. A score has two parts so that it can be computed on shards:

- `partial(exp_avg, exp_avg_sq, eps)`: a sum over one tensor's elements (accumulated in at least
  float32), which adds up across the tensors of an expert and across FSDP shards;
- `finalize(total, numel, lr)`: the expert's score from the summed partials, its global element
  count and its current learning rate (all tensors, batched over modules and experts; a module's
  scores must depend only on its own row).

Both work on the raw (not bias-corrected) moments, as the paper specifies (docs/method.md
section 3).

A score may name a `kernel`, one of `molf.optim.functional.SCORE_KERNELS` ("epd", "pfn"): its
maths is then the built-in one (`molf.optim.functional`), which the optimizer's backends batch
over all tensors or run in their own kernels. Scores without a kernel, like any
`Score(name, partial, finalize)` a user registers, go through `partial` tensor by tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from molf.errors import MolfError
from molf.optim import functional as F


@dataclass(frozen=True)
class Score:
    """A routing score: see the module docstring for the parts."""

    name: str
    partial: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    finalize: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    kernel: str | None = None

    def __post_init__(self) -> None:
        if self.kernel is not None and self.kernel not in F.SCORE_KERNELS:
            raise MolfError(
                f"Score.kernel: unknown kernel {self.kernel!r} "
                f"(known: {', '.join(F.SCORE_KERNELS)})"
            )

    def partials(
        self, exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], eps: float
    ) -> torch.Tensor:
        """`partial` of every tensor, as one 1-d tensor on their device: a few batched ops for
        a kernel score, one `partial` call per tensor otherwise."""
        if self.kernel is not None:
            return F.kernel_partials(self.kernel, exp_avgs, exp_avg_sqs, eps)
        return torch.stack([self.partial(m, v, eps) for m, v in zip(exp_avgs, exp_avg_sqs)])


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


def _one_partial(kernel: str, m: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    return F.kernel_partials(kernel, [m], [v], eps)[0]


def kernel_score(kernel: str, name: str | None = None) -> Score:
    """A Score whose partial and finalize are the built-in `kernel`'s (see the module docstring)."""
    return Score(
        name or kernel,
        functools.partial(_one_partial, kernel),
        functools.partial(F.finalize_scores, kernel),
        kernel=kernel,
    )


# Expected Preconditioned Descent: lr_e / N_e * sum m^2 / (sqrt(v) + eps), the expected decrease
# of the loss per parameter if expert e took an Adam step. The paper's default.
EPD = register_score(kernel_score("epd"))
# Preconditioned Frobenius Norm: ||m / (sqrt(v) + eps)||_F / sqrt(N_e). The paper's ablation.
PFN = register_score(kernel_score("pfn"))
