"""The maths of one MoLFAdamW step (docs/method.md section 3), as stateless functions over lists
of tensors. This is the only Python copy of it: every backend in `molf.optim.backends` calls
these functions (the native backend's C++ kernel, `kernels/molf_step_cpu.cpp`, is the one other
copy, checked against these by the tests). They update the tensors they are given in place and
keep nothing between calls.

The five parts of a step, in order:
  1. `advance_moments`: m and v of every expert advance with its gradient;
  2. `kernel_partials` (or a registered score's own `partial`): each tensor's score partial;
  3. `finalize_scores`: an expert's score from its summed partials, size and learning rate;
  4. `top_k_mask`: the winners, ties to the lower expert index;
  5. `adam_update`: decoupled decay and the bias-corrected Adam step of the winners, in the
     moments' precision (float32 for low-precision parameters), rounded into the parameter
     once; with a device mask of the winners, so that the host never reads them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# The scores that have built-in batched (and compiled) implementations. `molf.optim.scores.Score`
# validates its `kernel` against this tuple: the one list of kernel names.
SCORE_KERNELS = ("epd", "pfn")

# Elements per foreach batch in `kernel_partials`: bounds its temporaries (two per batch).
PARTIAL_BATCH_ELEMENTS = 1 << 24

Tensors = Sequence[torch.Tensor]


@dataclass(frozen=True, eq=False)
class Scratch:
    """Working memory for one chunk of tensors, so that a step makes a fixed number of foreach
    calls however many tensors the chunk holds: two flat buffers `a` and `b` in the
    accumulation dtype (float32, or float64), views of them shaped like each tensor
    (`a_views`, `b_views`), and, on the buffers' device, the indices of the non-empty tensors
    (`nonempty`) and their first elements in the buffers (`starts`), which expand a per-tensor
    mask to the elements without the host reading it (`element_mask`)."""

    a: torch.Tensor
    b: torch.Tensor
    a_views: list[torch.Tensor]
    b_views: list[torch.Tensor]
    nonempty: torch.Tensor
    starts: torch.Tensor

    def element_mask(self, per_tensor: torch.Tensor) -> torch.Tensor:
        """A bool [elements] mask, True on the elements of the tensors where `per_tensor` (bool,
        one per tensor) is: the changes of the mask placed at each non-empty tensor's first
        element (distinct positions) and summed in place, in bytes (repeat_interleave would
        index with eight bytes an element)."""
        marks = per_tensor[self.nonempty].to(torch.int8)
        changes = torch.diff(marks, prepend=marks.new_zeros(1))
        mask = torch.zeros(self.a.numel(), dtype=torch.int8, device=self.a.device)
        mask.scatter_(0, self.starts, changes)
        return mask.cumsum_(0).bool()


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a tensor's score partials and scratch are computed in."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def advance_moments(
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    beta1: float,
    beta2: float,
    scratch: Scratch | None = None,
) -> None:
    """Step 1, in place: m <- m + (1 - b1)(g - m), v <- b2 v + (1 - b2) g^2. Gradients in
    another dtype than their moments are cast first (into `scratch.a_views` when given and of
    the moments' dtype: one foreach copy instead of one cast per tensor)."""
    if not exp_avgs:
        return
    if any(g.dtype != m.dtype for g, m in zip(grads, exp_avgs)):
        if scratch is not None and all(
            a.dtype == m.dtype for a, m in zip(scratch.a_views, exp_avgs)
        ):
            torch._foreach_copy_(scratch.a_views, grads)
            grads = scratch.a_views
        else:
            grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)


def kernel_partials(
    kernel: str,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    eps: float,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """Step 2 for a built-in score: each tensor's partial sum on the raw moments, as one 1-d
    tensor on their device (accumulated in float32, float64 for float64 moments):
      epd: sum m^2 / (sqrt(v) + eps)       pfn: sum (m / (sqrt(v) + eps))^2
    Both are squared norms (EPD of m / sqrt(sqrt(v) + eps)), so a batch of tensors costs a few
    foreach ops instead of several small ops per tensor. Without `scratch` the temporaries are
    allocated per batch of about PARTIAL_BATCH_ELEMENTS elements; with it, the tensors are one
    batch computed in `scratch` (the same operations, so the same numbers)."""
    if kernel not in SCORE_KERNELS:
        raise ValueError(f"unknown score kernel {kernel!r}")
    if scratch is not None:
        return _partials(kernel, exp_avgs, exp_avg_sqs, eps, scratch)
    out: list[torch.Tensor] = []
    start = 0
    while start < len(exp_avgs):
        stop, size = start, 0
        while stop < len(exp_avgs) and (stop == start or size < PARTIAL_BATCH_ELEMENTS):
            size += exp_avgs[stop].numel()
            stop += 1
        out.append(_partials(kernel, exp_avgs[start:stop], exp_avg_sqs[start:stop], eps))
        start = stop
    if not out:
        return torch.zeros(0)
    return torch.cat(out)


def _partials(
    kernel: str, exp_avgs: Tensors, exp_avg_sqs: Tensors, eps: float, scratch: Scratch | None = None
) -> torch.Tensor:
    if scratch is None:
        acc = [accumulation_dtype(m) for m in exp_avgs]
        denom = torch._foreach_sqrt([v.to(dt) for v, dt in zip(exp_avg_sqs, acc)])
        ratio = [m.to(dt) for m, dt in zip(exp_avgs, acc)]
    else:  # the same values, computed in place in the scratch buffers
        denom, ratio = scratch.a_views, scratch.b_views
        torch._foreach_copy_(denom, exp_avg_sqs)
        torch._foreach_sqrt_(denom)
        torch._foreach_copy_(ratio, exp_avgs)
    torch._foreach_add_(denom, eps)
    if kernel == "epd":
        torch._foreach_sqrt_(denom)
    if scratch is None:
        ratio = torch._foreach_div(ratio, denom)
    else:
        torch._foreach_div_(ratio, denom)
    return torch.stack(torch._foreach_norm(ratio)).square()


def finalize_scores(
    kernel: str, totals: torch.Tensor, numel: torch.Tensor, lrs: torch.Tensor
) -> torch.Tensor:
    """Step 3 for a built-in score, batched over [modules, experts]: the scores from the summed
    partials `totals`, the experts' global element counts and their current learning rates:
      epd: lr * total / numel (the expected loss decrease per parameter of an Adam step)
      pfn: sqrt(total) / sqrt(numel) (a preconditioned Frobenius norm per sqrt(parameter))"""
    if kernel == "epd":
        return lrs * totals / numel
    if kernel == "pfn":
        return totals.sqrt() / numel.sqrt()
    raise ValueError(f"unknown score kernel {kernel!r}")


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Step 4: boolean [modules, experts] mask of each row's top-k experts; ties go to the lower
    expert index (NaN ranks above everything, as in torch.argmax)."""
    if k == scores.shape[1]:
        return torch.ones_like(scores, dtype=torch.bool)
    if k == 1:
        idx = scores.argmax(dim=1, keepdim=True)  # the first maximum on ties
    else:
        idx = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def _step_scalars(
    steps: Sequence[float],
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    beta1: float,
    beta2: float,
) -> tuple[list[float], list[float], list[float]]:
    """Per tensor: the decay factor 1 - lr wd, the step -lr / (1 - b1^t) and sqrt(1 - b2^t)."""
    decays = [1.0 - lr * wd for lr, wd in zip(lrs, weight_decays)]
    step_sizes = [-lr / (1.0 - beta1**t) for lr, t in zip(lrs, steps)]
    bc2_sqrt = [math.sqrt(1.0 - beta2**t) for t in steps]
    return decays, step_sizes, bc2_sqrt


def _updated(
    targets: list[torch.Tensor],
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    decays: list[float],
    step_sizes: list[float],
    bc2_sqrt: list[float],
    eps: float,
    denom: list[torch.Tensor] | None = None,
) -> None:
    """targets <- targets * decay + step * m / (sqrt(v) / sqrt(1 - b2^t) + eps), in place: the
    one formula of step 5, applied to parameters or to copies of them in the moments' dtype.
    `denom` is working memory for sqrt(v) (allocated when not given)."""
    if denom is None:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    else:
        torch._foreach_copy_(denom, exp_avg_sqs)
        torch._foreach_sqrt_(denom)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    if any(d != 1.0 for d in decays):
        torch._foreach_mul_(targets, decays)
    torch._foreach_addcdiv_(targets, exp_avgs, denom, step_sizes)


def adam_update(
    params: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    steps: Sequence[float],
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    beta1: float,
    beta2: float,
    eps: float,
    won: torch.Tensor | None = None,
    scratch: Scratch | None = None,
) -> None:
    """Step 5, in place, on already advanced moments: decoupled weight decay, then
    p -= lr * m_hat / (sqrt(v_hat) + eps). `steps`, `lrs` and `weight_decays` hold one value per
    tensor. Parameters in another dtype than their moments (bfloat16 with float32 moments) are
    computed in the moments' dtype and rounded once.

    Without `won` every given tensor is updated (the caller passes the winners). With `won`, a
    bool tensor with one entry per tensor on their device, every tensor's update is computed
    in `scratch` (required then) and kept only where `won` is set, by one `torch.where` over the
    flat buffers: the winners are applied without the host reading them, and losers keep their
    exact bits. With `scratch` the update is computed in its buffers (in the accumulation dtype),
    a fixed number of foreach calls for any number of tensors."""
    if not params:
        return
    decays, step_sizes, bc2_sqrt = _step_scalars(steps, lrs, weight_decays, beta1, beta2)
    if scratch is not None:
        new = scratch.b_views
        torch._foreach_copy_(new, params)
        _updated(new, exp_avgs, exp_avg_sqs, decays, step_sizes, bc2_sqrt, eps, scratch.a_views)
        if won is not None:
            # a <- the parameters as they are; b <- where each element's tensor won, b, else a
            torch._foreach_copy_(scratch.a_views, params)
            torch.where(scratch.element_mask(won), scratch.b, scratch.a, out=scratch.b)
        torch._foreach_copy_(list(params), new)
        return
    if won is not None:
        raise ValueError("adam_update: a mask of winners needs scratch memory to select in")
    if all(p.dtype == m.dtype for p, m in zip(params, exp_avgs)):
        _updated(list(params), exp_avgs, exp_avg_sqs, decays, step_sizes, bc2_sqrt, eps)
        return
    new = [p.to(m.dtype, copy=True) for p, m in zip(params, exp_avgs)]
    _updated(new, exp_avgs, exp_avg_sqs, decays, step_sizes, bc2_sqrt, eps)
    torch._foreach_copy_(list(params), new)
