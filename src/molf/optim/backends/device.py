"""The device backend, the default on accelerators: a step whose number of torch calls does not
grow with the number of tensors, and which never waits for the device.

The routed tensors of the active modules are cut into chunks (in layout order) of at most
CHUNK_ELEMENTS elements, and each chunk owns scratch memory: two flat buffers in the accumulation
dtype with views shaped like its tensors (`functional.Scratch`), built once and reused every step.
Per chunk, the moments advance with three foreach calls (plus one copy when the gradients are
in another dtype), the score partials are a few foreach calls in the scratch, and after the
decision every tensor's Adam update is computed in the scratch and kept only where its expert won,
by one `torch.where` over the flat buffers with a mask expanded on the device (a cumulative sum
of its changes at each tensor's first element, so no host read). The decision itself is a
handful of batched ops on the [modules, experts] totals (`decide`).

So a step costs a fixed number of calls per chunk plus a fixed number per step: it grows with
the element count in steps of CHUNK_ELEMENTS (which bounds the scratch memory, about 10 bytes per
element of the largest chunk), never with the tensor count. The host reads nothing from the
device: step counts live on the CPU (as in torch's AdamW), learning rates reach the device by a
pinned non-blocking copy, and the winners stay on the device. With the routing log on, the
scores and winners are copied to pinned host memory without blocking and the log completes the
record when it is next touched (`RoutingLog`), so the step still does not wait.

Everything here is torch ops, so it runs (and is tested) on CPU too; FSDP2 shards are stepped
through their local tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from molf.optim import functional as F
from molf.optim.backends.base import StepSettings, decide, on_device
from molf.optim.layout import RoutedLayout, local
from molf.optim.scores import Score

# Elements per chunk: bounds the scratch memory (two float32 buffers and the mask, about 10 bytes
# an element: 640 MiB at 2^26) while keeping the calls per step few.
CHUNK_ELEMENTS = 1 << 26


@dataclass(eq=False)
class Chunk:
    """Tensors stepped together: their parameters (`params`, local shards for FSDP2) and
    optimizer states, their scratch (None when they need none) and, for routed tensors, the
    [module, expert] cell of each in the flattened totals (`bucket`, on the device) and its
    expert slot; for the other parameters, the index of each one's group."""

    params: list[torch.Tensor]
    states: list[dict[str, torch.Tensor]]
    scratch: F.Scratch | None
    bucket: torch.Tensor | None = None
    experts: list[int] | None = None
    decays: list[bool] | None = None
    groups: list[int] | None = None


def chunked(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive positions grouped so that each group holds at most `limit` elements (a tensor
    larger than that is a group alone)."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if not groups or (total + n > limit and groups[-1]):
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


def scratch_for(
    tensors: list[torch.Tensor], workspace: tuple[torch.Tensor, torch.Tensor]
) -> F.Scratch:
    """Scratch for `tensors` at the start of the two `workspace` buffers."""
    size = sum(t.numel() for t in tensors)
    a, b = (w[:size] for w in workspace)
    a_views, b_views, starts, start = [], [], [], 0
    for t in tensors:
        a_views.append(a[start : start + t.numel()].view(t.shape))
        b_views.append(b[start : start + t.numel()].view(t.shape))
        starts.append(start)
        start += t.numel()
    nonempty = [i for i, t in enumerate(tensors) if t.numel() > 0]
    return F.Scratch(
        a,
        b,
        a_views,
        b_views,
        on_device(nonempty, torch.int64, a.device),
        on_device([starts[i] for i in nonempty], torch.int64, a.device),
    )


def _chunks(
    params: list[torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    device: torch.device,
    always_scratch: bool,
) -> list[tuple[list[int], F.Scratch | None]]:
    """The positions of each chunk of these tensors, grouped by the dtype of their scratch, with
    the chunk's scratch: always for routed tensors (the masked update selects in it), only for a
    dtype cast otherwise (the update is in place)."""
    moments = [local(st["exp_avg"]) for st in states]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for pos, m in enumerate(moments):
        by_dtype.setdefault(F.accumulation_dtype(m), []).append(pos)
    out = []
    for dtype, positions in by_dtype.items():
        groups = [
            [positions[i] for i in g]
            for g in chunked([moments[p].numel() for p in positions], CHUNK_ELEMENTS)
        ]
        need = [
            always_scratch or any(local(params[p]).dtype != moments[p].dtype for p in g)
            for g in groups
        ]
        biggest = max(
            (sum(moments[p].numel() for p in g) for g, n in zip(groups, need) if n), default=0
        )
        workspace = (
            torch.empty(biggest, dtype=dtype, device=device),
            torch.empty(biggest, dtype=dtype, device=device),
        )
        for g, n in zip(groups, need):
            out.append((g, scratch_for([moments[p] for p in g], workspace) if n else None))
    return out


class Plan:
    """The chunks, scratch and state references of one set of routed tensors with gradients
    (a tensor without one is skipped, as torch's AdamW skips it, and does not count in its
    expert's size) and of other parameters with gradients. Built once, checked every step (the
    same state tensors and win counters), rebuilt when anything changes (another set of
    gradients, `load_state_dict`...)."""

    def __init__(
        self, layout: RoutedLayout, key: tuple[tuple[bool, ...], tuple[bool, ...]]
    ) -> None:
        self.key = key
        self.layout = layout
        has_grad, plain_has = key
        active = layout.active_modules(has_grad)
        device = layout.device
        routed = [t for t, has in enumerate(has_grad) if has]
        self.numel_host = layout.numel_with_grad(has_grad)
        self.numel: torch.Tensor | None = None  # on the device, in the totals' dtype
        plain = [i for i, has in enumerate(plain_has) if has]
        all_params = [layout.params[t] for t in routed] + [layout.plain[i][0] for i in plain]
        for p in all_params:  # the host reads step counts: keep them there
            st = layout.state(p)
            if not (st["step"].is_cpu and st["step"].dtype == torch.float32):
                st["step"] = st["step"].to("cpu", torch.float32)
        self.entries = [
            (p, st, st["exp_avg"], st["exp_avg_sq"], st["step"])
            for p, st in ((p, layout.state(p)) for p in all_params)
        ]
        self.rows = [m for m, a in enumerate(active) if a]
        self.wins = [layout.wins(m, device) for m in self.rows]
        self.active = on_device(active, torch.bool, device)
        n_exp = layout.n_experts

        params = [layout.params[t] for t in routed]
        states = [layout.state(p) for p in params]
        self.routed: list[Chunk] = []
        chunks = _chunks(params, states, device, always_scratch=True)
        for g, scratch in chunks:
            ts = [routed[p] for p in g]
            cells = [layout.module_of[t] * n_exp + layout.expert_of[t] for t in ts]
            self.routed.append(
                Chunk(
                    [params[p] for p in g],
                    [states[p] for p in g],
                    scratch,
                    bucket=on_device(cells, torch.int64, device),
                    experts=[layout.expert_of[t] for t in ts],
                    decays=[layout.decays[t] for t in ts],
                )
            )
        self.bucket = torch.cat([c.bucket for c in self.routed]) if self.routed else None
        # where, in the chunks' order, the first routed tensor is: its step count is the step
        # number the routing log records
        order = [routed[p] for g, _ in chunks for p in g]
        self.anchor = order.index(routed[0]) if routed else 0
        params = [layout.plain[i][0] for i in plain]
        states = [layout.state(p) for p in params]
        self.plain: list[Chunk] = [
            Chunk(
                [params[p] for p in g],
                [states[p] for p in g],
                scratch,
                groups=[layout.plain[plain[p]][1] for p in g],
            )
            for g, scratch in _chunks(params, states, device, always_scratch=False)
        ]

    def is_current(self) -> bool:
        """Whether the states, moments, step counts and win counters are the planned ones."""
        state = self.layout.states()
        start = self.layout.module_start
        return all(
            state.get(p) is st
            and st.get("exp_avg") is m
            and st.get("exp_avg_sq") is v
            and st.get("step") is s
            for p, st, m, v, s in self.entries
        ) and all(
            state[self.layout.params[start[m]]].get("wins") is w
            for m, w in zip(self.rows, self.wins)
        )


def _step_all(s: StepSettings, chunks: list[Chunk]) -> tuple[list, list[float]]:
    """Steps 1-2 for every chunk: moments advanced (with the chunk's scratch), step counts
    advanced; returns per chunk (params, grads, moments, moment squares) as local tensors and
    the new step counts, read on the host where they live."""
    tensors = []
    for c in chunks:
        params = [local(p) for p in c.params]
        grads = [
            local(p.grad) if p.grad is not None else torch.zeros_like(q)
            for p, q in zip(c.params, params)
        ]
        ms = [local(st["exp_avg"]) for st in c.states]
        vs = [local(st["exp_avg_sq"]) for st in c.states]
        F.advance_moments(grads, ms, vs, s.beta1, s.beta2, c.scratch)
        tensors.append((params, ms, vs))
    step_tensors = [st["step"] for c in chunks for st in c.states]
    torch._foreach_add_(step_tensors, 1.0)
    return tensors, torch.stack(step_tensors).tolist()


def _update_all(
    s: StepSettings,
    chunks: list[Chunk],
    tensors: list,
    steps: list[float],
    won: torch.Tensor | None,
) -> None:
    """Step 5 for every chunk: routed chunks (`won`, the flattened winners) keep their winners'
    updates only, the other parameters' chunks are all updated."""
    start = 0
    for c, (params, ms, vs) in zip(chunks, tensors):
        n = len(params)
        if c.experts is not None:
            lrs = [s.slot_lrs[e] for e in c.experts]
            wds = [s.slot_weight_decays[e] if d else 0.0 for e, d in zip(c.experts, c.decays)]
        else:
            lrs = [s.group_lrs[g] for g in c.groups]
            wds = [s.group_weight_decays[g] for g in c.groups]
        F.adam_update(
            params,
            ms,
            vs,
            steps[start : start + n],
            lrs,
            wds,
            s.beta1,
            s.beta2,
            s.eps,
            won=None if won is None else won[c.bucket],
            scratch=c.scratch,
        )
        start += n


class DeviceBackend:
    name: ClassVar[str] = "device"

    @staticmethod
    def preferred_on(device: torch.device) -> bool:
        return device.type not in ("cpu", "meta")

    @staticmethod
    def unavailable(layout: RoutedLayout, score: Score) -> str | None:
        return None

    def __init__(self, layout: RoutedLayout) -> None:
        self.layout = layout
        self.plan: Plan | None = None

    def step(self, s: StepSettings) -> str | None:
        L = self.layout
        key = (
            tuple(p.grad is not None for p in L.params),
            tuple(p.grad is not None for p, _ in L.plain),
        )
        if not any(key[0]) and not any(key[1]):
            return None
        if self.plan is None or self.plan.key != key or not self.plan.is_current():
            self.plan = Plan(L, key)
        if self.plan.routed:
            self.step_routed(s, self.plan)
        if self.plan.plain:
            self.step_plain(s, self.plan)
        return None

    def step_routed(self, s: StepSettings, plan: Plan) -> None:
        L = self.layout
        tensors, steps = _step_all(s, plan.routed)
        partials = []
        for c, (_, ms, vs) in zip(plan.routed, tensors):
            if s.score.kernel is not None:
                partials.append(F.kernel_partials(s.score.kernel, ms, vs, s.score_eps, c.scratch))
            else:  # a registered score's own partial, tensor by tensor
                partials.append(s.score.partials(ms, vs, s.score_eps))
        flat = torch.cat(partials)
        totals = torch.zeros(L.n_modules * L.n_experts, dtype=flat.dtype, device=flat.device)
        totals = totals.index_add_(0, plan.bucket, flat).view(L.n_modules, L.n_experts)
        if plan.numel is None or plan.numel.dtype != totals.dtype:
            plan.numel = on_device(plan.numel_host, totals.dtype, totals.device)
        scores, winners = decide(s, totals, plan.numel, plan.active)
        if s.routing_log is not None:  # copied without blocking; see RoutingLog.append
            s.routing_log.append(int(steps[plan.anchor]), winners, scores, plan.active)

        _update_all(s, plan.routed, tensors, steps, winners.reshape(-1))
        counts = winners.to(torch.int64).unbind(0)
        torch._foreach_add_(plan.wins, [counts[m] for m in plan.rows])

    def step_plain(self, s: StepSettings, plan: Plan) -> None:
        """Plain AdamW for the parameters outside the wrapped modules that have a gradient."""
        tensors, steps = _step_all(s, plan.plain)
        _update_all(s, plan.plain, tensors, steps, None)
