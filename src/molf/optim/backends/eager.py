"""The eager backend: the step as plain torch ops on any device, for any registered score; the
reference the other backends are compared with, and the fallback for a step they cannot take.

Moments advance with foreach ops, the score partials of all tensors are batched
(`Score.partials`), summed into one [modules, experts] tensor and the winners are picked with one
batched op on the device (`decide`). The host then reads that small tensor, once per step, and
updates only the winners. On an accelerator that read waits for the device, and the Python work
per tensor (step counts, lists of winners) grows with the model: the device backend avoids both.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from molf.optim import functional as F
from molf.optim.backends.base import StepSettings, decide, on_device
from molf.optim.layout import RoutedLayout, local
from molf.optim.scores import Score


class EagerBackend:
    name: ClassVar[str] = "eager"

    @staticmethod
    def preferred_on(device: torch.device) -> bool:
        return True

    @staticmethod
    def unavailable(layout: RoutedLayout, score: Score) -> str | None:
        return None

    def __init__(self, layout: RoutedLayout) -> None:
        self.layout = layout
        n_exp = layout.n_experts
        # index of each routed tensor's [module, expert] cell in the flattened totals
        self.bucket_of = [m * n_exp + e for m, e in zip(layout.module_of, layout.expert_of)]
        self.bucket = torch.tensor(self.bucket_of, device=layout.device)
        self.numel: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def step(self, settings: StepSettings) -> str | None:
        self.step_routed(settings)
        self.step_others(settings)
        return None

    def numel_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The layout's [modules, experts] element counts on `device`, copied there once."""
        key = (device, dtype)
        if key not in self.numel:
            self.numel[key] = self.layout.numel.to(device, dtype)
        return self.numel[key]

    def step_routed(self, s: StepSettings) -> None:
        L = self.layout
        has_grad = [p.grad is not None for p in L.params]
        active = L.active_modules(has_grad)
        if not any(active):
            return
        # a tensor without a gradient is skipped, as torch's AdamW skips it (method.md section 3)
        index = [t for t in L.tensors_of(active) if has_grad[t]]
        params = [L.params[t] for t in index]
        states = [L.state(p) for p in params]
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        F.advance_moments([p.grad for p in params], exp_avgs, exp_avg_sqs, s.beta1, s.beta2)
        torch._foreach_add_([st["step"] for st in states], 1.0)

        # float32 partial sums over this rank's shards; the score reducer adds up the ranks'
        partials = s.score.partials(
            [local(m) for m in exp_avgs], [local(v) for v in exp_avg_sqs], s.score_eps
        )
        device = partials.device
        bucket = self.bucket
        if len(index) != len(L.params):
            bucket = on_device([self.bucket_of[t] for t in index], torch.int64, device)
        totals = torch.zeros(L.n_modules * L.n_experts, dtype=partials.dtype, device=device)
        totals = totals.index_add_(0, bucket, partials).view(L.n_modules, L.n_experts)
        active_host = torch.tensor(active)
        if all(has_grad):
            numel = self.numel_on(device, totals.dtype)
        else:
            numel = on_device(L.numel_with_grad(has_grad), totals.dtype, device)
        scores, winners = decide(s, totals, numel, on_device(active, torch.bool, device))
        step_no = int(states[0]["step"])

        win_host = None
        if s.routing_log is not None:
            # The one host transfer of the step: winners and scores of every module.
            packed = torch.cat([winners.to(scores.dtype), scores], dim=1).cpu()
            win_host = packed[:, : L.n_experts].bool()
            s.routing_log.append(step_no, win_host, packed[:, L.n_experts :].float(), active_host)
        if win_host is None:
            win_host = winners.cpu()
        chosen = [i for i, t in enumerate(index) if win_host[L.module_of[t], L.expert_of[t]]]
        F.adam_update(
            [params[i] for i in chosen],
            [exp_avgs[i] for i in chosen],
            [exp_avg_sqs[i] for i in chosen],
            [float(states[i]["step"]) for i in chosen],
            [s.slot_lrs[L.expert_of[index[i]]] for i in chosen],
            [
                s.slot_weight_decays[L.expert_of[index[i]]] if L.decays[index[i]] else 0.0
                for i in chosen
            ],
            s.beta1,
            s.beta2,
            s.eps,
        )
        rows = [m for m, a in enumerate(active) if a]
        host = torch.device("cpu")
        torch._foreach_add_([L.wins(m, host) for m in rows], list(win_host[rows].to(torch.int64)))

    def step_others(self, s: StepSettings) -> None:
        """Plain AdamW for the parameters outside the wrapped modules that have a gradient."""
        plain = [(p, g) for p, g in self.layout.plain if p.grad is not None]
        if not plain:
            return
        states = [self.layout.state(p) for p, _ in plain]
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        F.advance_moments([p.grad for p, _ in plain], exp_avgs, exp_avg_sqs, s.beta1, s.beta2)
        torch._foreach_add_([st["step"] for st in states], 1.0)
        F.adam_update(
            [p for p, _ in plain],
            exp_avgs,
            exp_avg_sqs,
            [float(st["step"]) for st in states],
            [s.group_lrs[g] for _, g in plain],
            [s.group_weight_decays[g] for _, g in plain],
            s.beta1,
            s.beta2,
            s.eps,
        )
