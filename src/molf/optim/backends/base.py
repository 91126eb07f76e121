"""What every MoLFAdamW backend shares: the step's settings, the backend interface, and the
routing decision on the packed score totals (docs/method.md sections 3-4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from molf.optim import functional as F
from molf.optim.layout import RoutedLayout

if TYPE_CHECKING:
    from molf.optim.scores import Score
    from molf.routing import RoutingLog


@dataclass(frozen=True)
class StepSettings:
    """What one step uses besides the tensors: hyperparameters as the parameter groups hold them
    now (after any LR scheduler), the score, the cross-rank reducer and the routing log."""

    beta1: float
    beta2: float
    eps: float
    score_eps: float  # the eps inside the score (docs/method.md section 3), not Adam's
    top_k: int
    score: Score
    slot_lrs: tuple[float, ...]  # per expert slot
    slot_weight_decays: tuple[float, ...]
    group_lrs: tuple[float, ...]  # per parameter group (the other parameters name their group)
    group_weight_decays: tuple[float, ...]
    score_reducer: Callable[[torch.Tensor], torch.Tensor] | None
    routing_log: RoutingLog | None


class Backend(Protocol):
    """The interface every backend implements (see the module docstring)."""

    name: ClassVar[str]

    @staticmethod
    def preferred_on(device: torch.device) -> bool:
        """Whether `backend="auto"` should try this backend for parameters on `device`."""
        ...

    @staticmethod
    def unavailable(layout: RoutedLayout, score: Score) -> str | None:
        """Why this backend cannot step this optimizer at all, or None."""
        ...

    def __init__(self, layout: RoutedLayout) -> None: ...

    def step(self, settings: StepSettings) -> str | None:
        """One whole step; None, or why this step could not be taken (nothing changed)."""
        ...


def on_device(
    values: Sequence[float | int | bool] | torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Host values (a list or a CPU tensor) as a tensor on `device`, copied without making the
    host wait: through pinned memory, asynchronously, on CUDA."""
    t = values.to(dtype) if torch.is_tensor(values) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def decide(
    settings: StepSettings, totals: torch.Tensor, numel: torch.Tensor, active: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-4 on the packed [modules, experts] score totals: the reducer (so that every rank
    decides on the same sums, docs/method.md section 4), the scores and the top-k winners of the
    active modules. `numel` (of the tensors with a gradient, in the totals' dtype) and `active`
    (bool [modules]) are on the totals' device. An expert with no such tensor (N = 0) scores
    -inf and never wins, even when top_k is larger than the number of experts with a
    gradient (as in the reference, which drops such winners)."""
    if settings.score_reducer is not None:
        totals = settings.score_reducer(totals)
    lrs = on_device(settings.slot_lrs, totals.dtype, totals.device)
    scores = settings.score.finalize(totals, numel, lrs[None, :])
    has_grad = numel > 0
    scores = scores.masked_fill(~has_grad, float("-inf"))
    # an expert without a gradient never wins, even when top_k leaves room for it
    winners = F.top_k_mask(scores, settings.top_k) & active[:, None] & has_grad
    return scores, winners
