"""The native backend, the default on CPU: the whole step in one call of C++ kernels
(`molf.optim.kernels`).

For each module one pass over each of its tensors advances m and v and sums the score partial;
the module's scores, top-k and the winners' update follow at once, while the moments are still
in cache; the other parameters get a one-pass AdamW. Modules are spread over
`torch.get_num_threads()` threads. The kernels read and write the tensors in place through
pointer tables (`KernelTables`) that this backend builds from the optimizer's `RoutedLayout`
and checks every step. With a score reducer (distributed) the step is two calls: moments and
totals, then the reducer and the decision in torch, then the winners.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from molf.optim import kernels as K
from molf.optim.backends.base import StepSettings, decide
from molf.optim.layout import RoutedLayout, is_plain
from molf.optim.scores import Score

# The columns of the pointer tables, one row per tensor: the other parameters' tables have the
# shared ones (prefixed "p"), the routed tensors' also their expert slot and whether they decay.
SHARED = ("p", "m", "v", "step", "numel", "combo")
COLUMNS = SHARED + ("expert", "decay")
# A gradient slot: (index into the step's gradient list or -1, the dtype expected, the param).
GradSlot = tuple[int, "torch.dtype | None", "torch.Tensor | None"]


def dense_cpu(t: torch.Tensor) -> bool:
    return t.is_cpu and t.layout == torch.strided and t.is_contiguous()


class KernelTables:
    """What the kernels need that stays the same from step to step (pointers to parameters,
    moments, step counts and win counters, sizes, dtypes), for one set of routed tensors and
    of other parameters with gradients. Built once, checked every step, rebuilt when any of it
    changes (another set of gradients, `load_state_dict`, a parameter given new storage...).
    A routed tensor without a gradient (or of an inactive module) gets a row of zeros: the
    kernels skip it, as torch's AdamW skips a parameter without a gradient."""

    def __init__(
        self,
        layout: RoutedLayout,
        key: tuple[tuple[bool, ...], tuple[bool, ...]],
        routed_grads: list[torch.Tensor | None],
        plain_grads: list[torch.Tensor | None],
    ) -> None:
        self.key = key
        self.layout = layout
        self.why: str | None = None
        # (param, its state, exp_avg, exp_avg_sq, step, param data pointer): checked every step
        self.entries: list[tuple] = []
        self.wins: list[tuple[dict, torch.Tensor]] = []
        self.routed_grads: list[GradSlot] = []
        self.plain_grads: list[GradSlot] = []
        self.plain_group: list[int] = []
        cols: dict[str, list[int]] = {k: [] for k in COLUMNS}
        cols.update({"p" + k: [] for k in SHARED})
        has_grad, plain_has = key
        active = layout.active_modules(has_grad)
        start = layout.module_start
        wins = [0] * len(active)
        for mi, is_active in enumerate(active):
            for t in range(start[mi], start[mi + 1]):
                p, e = layout.params[t], layout.expert_of[t]
                if not has_grad[t]:  # never read by the kernels, but every column keeps one row
                    for col in SHARED:
                        cols[col].append(0)
                    cols["expert"].append(e)
                    cols["decay"].append(0)
                    self.routed_grads.append((-1, None, None))
                    continue
                cols["decay"].append(int(layout.decays[t]))
                self.why = self._add(cols, "", p, routed_grads[t], e, t, self.routed_grads)
                if self.why is not None:
                    return
            if is_active:
                w = layout.wins(mi, torch.device("cpu"))
                self.wins.append((layout.states()[layout.params[start[mi]]], w))
                wins[mi] = w.data_ptr()
        for i, ((p, gi), has) in enumerate(zip(layout.plain, plain_has)):
            if has:
                self.why = self._add(cols, "p", p, plain_grads[i], 0, i, self.plain_grads)
                if self.why is not None:
                    return
                self.plain_group.append(gi)
        self.arrays = {k: torch.tensor(v, dtype=torch.int64) for k, v in cols.items()}
        self.arrays["mod_start"] = torch.tensor(start, dtype=torch.int64)
        self.arrays["active"] = torch.tensor(active, dtype=torch.uint8)
        self.arrays["wins"] = torch.tensor(wins, dtype=torch.int64)
        self.arrays["numel_exp"] = layout.numel_with_grad(has_grad).to(torch.float64).contiguous()
        # the step number the routing log records: the first routed tensor's count
        self.anchor = next((t for t, has in enumerate(has_grad) if has), None)

    def _add(
        self,
        cols: dict[str, list[int]],
        prefix: str,
        p: torch.Tensor,
        grad: torch.Tensor | None,
        expert: int,
        index: int,
        grad_slots: list[GradSlot],
    ) -> str | None:
        st = self.layout.state(p)
        m, v, step = st["exp_avg"], st["exp_avg_sq"], st["step"]
        g_dtype = p.dtype if grad is None else grad.dtype
        combo = K.COMBOS.get((p.dtype, g_dtype, m.dtype))
        if combo is None or v.dtype != m.dtype:
            return f"dtypes param {p.dtype}, grad {g_dtype}, moments {m.dtype}"
        tensors = (p, m, v) if grad is None else (p, grad, m, v)
        if not all(dense_cpu(t) and t.numel() == p.numel() for t in tensors):
            return "a parameter, gradient or moment that is not a contiguous CPU tensor"
        if not (step.is_cpu and step.dtype == torch.float32 and step.is_contiguous()):
            step = st["step"] = step.to("cpu", torch.float32).contiguous()
        try:
            ptr = p.data_ptr()
            values = (ptr, m.data_ptr(), v.data_ptr(), step.data_ptr(), p.numel(), combo, expert)
        except RuntimeError:  # tensor subclasses without storage, e.g. DTensor
            return f"parameters of type {type(p).__name__}"
        for col, value in zip(SHARED + ("expert",), values):
            if prefix and col == "expert":
                continue
            cols[prefix + col].append(value)
        self.entries.append((p, st, m, v, step, ptr))
        grad_slots.append((index, g_dtype, p))
        return None

    def is_current(self) -> bool:
        """Whether every pointer is still right: same state tensors and parameter storage."""
        state = self.layout.states()
        return all(
            state.get(p) is st
            and st.get("exp_avg") is m
            and st.get("exp_avg_sq") is v
            and st.get("step") is s
            and p.data_ptr() == ptr
            for p, st, m, v, s, ptr in self.entries
        ) and all(st.get("wins") is w for st, w in self.wins)

    def grad_pointers(
        self,
        routed_grads: list[torch.Tensor | None],
        plain_grads: list[torch.Tensor | None],
    ) -> tuple[list[int], list[int]] | None:
        """This step's gradient pointers (0 where the tables have no gradient), or None when a
        gradient does not match the dtype and layout the tables were built for."""
        out = []
        for grads, slots in ((routed_grads, self.routed_grads), (plain_grads, self.plain_grads)):
            ptrs = []
            for index, dtype, p in slots:
                if index < 0:
                    ptrs.append(0)
                    continue
                g = grads[index]
                if g is None or g.dtype != dtype or not dense_cpu(g) or g.numel() != p.numel():
                    return None
                ptrs.append(g.data_ptr())
            out.append(ptrs)
        return out[0], out[1]


class NativeBackend:
    name: ClassVar[str] = "native"

    @staticmethod
    def preferred_on(device: torch.device) -> bool:
        return device.type == "cpu"

    @staticmethod
    def unavailable(layout: RoutedLayout, score: Score) -> str | None:
        if layout.device.type != "cpu":
            return f"the parameters are on {layout.device.type}, the kernels run on CPU"
        if score.kernel is None:
            return f"score '{score.name}' has no kernel"
        if layout.n_experts > K.MAX_EXPERTS:
            return f"more than {K.MAX_EXPERTS} experts per module"
        if not all(is_plain(p) for p in layout.params):
            return "the parameters are tensor subclasses (e.g. FSDP2's DTensor)"
        kernels = K.cpu_kernels()
        if kernels is None:
            return f"the C++ kernels could not be built ({K.KERNEL_STATE['error']})"
        if score.kernel not in kernels.score_ids:
            return f"the C++ kernels have no '{score.kernel}' score"
        return None

    def __init__(self, layout: RoutedLayout) -> None:
        self.layout = layout
        self.tables: KernelTables | None = None

    def step(self, s: StepSettings) -> str | None:
        """The whole step in one call of the C++ kernels; returns None, or why they cannot take
        it (nothing has changed then)."""
        kernels = K.cpu_kernels()
        if kernels is None:
            return f"the kernels could not be built ({K.KERNEL_STATE['error']})"
        L = self.layout
        routed_grads = [p.grad for p in L.params]
        plain_grads = [p.grad for p, _ in L.plain]
        key = (
            tuple(g is not None for g in routed_grads),
            tuple(g is not None for g in plain_grads),
        )
        if not any(key[0]) and not any(key[1]):
            return None
        tables = self.tables
        pointers = None
        if tables is not None and tables.key == key and tables.is_current():
            pointers = tables.grad_pointers(routed_grads, plain_grads)
        if pointers is None:  # first step, other active set, new state or gradient dtypes
            tables = KernelTables(L, key, routed_grads, plain_grads)
            if tables.why is not None:
                return tables.why
            self.tables = tables
            pointers = tables.grad_pointers(routed_grads, plain_grads)
            if pointers is None:
                return "gradients that changed while the step was prepared"
        g, pg = pointers

        active = tables.arrays["active"]
        n_mod, n_exp = len(active), L.n_experts
        f64 = torch.float64
        arrays: dict[str, Any] = {
            "g": torch.tensor(g, dtype=torch.int64),
            "pg": torch.tensor(pg, dtype=torch.int64),
            "lr": torch.tensor(s.slot_lrs, dtype=f64),
            "wd": torch.tensor(s.slot_weight_decays, dtype=f64),
            "plr": torch.tensor([s.group_lrs[gi] for gi in tables.plain_group], dtype=f64),
            "pwd": torch.tensor(
                [s.group_weight_decays[gi] for gi in tables.plain_group], dtype=f64
            ),
            "totals": torch.zeros(n_mod, n_exp, dtype=f64),
            "scores": torch.zeros(n_mod, n_exp, dtype=f64),
            "winners": torch.zeros(n_mod, n_exp, dtype=torch.uint8),
        }
        values = tables.arrays | arrays
        values.update(
            n_mod=n_mod,
            n_exp=n_exp,
            n_plain=len(pg),
            b1=s.beta1,
            b2=s.beta2,
            eps=s.eps,
            score_eps=s.score_eps,
            kind=kernels.score_ids[s.score.kernel],
            top_k=s.top_k,
            n_threads=torch.get_num_threads(),
            phase=K.FUSED if s.score_reducer is None else K.SCORE,
        )
        args = K.KernelArgs.filled(values)
        scores = arrays["scores"]
        with torch.profiler.record_function("molf::native_step"):
            kernels.run(args)
            if s.score_reducer is not None:
                # Distributed: every module's totals are reduced before any module decides.
                active_mask = tables.arrays["active"].bool()
                numel = tables.arrays["numel_exp"]
                scores, winners = decide(s, arrays["totals"], numel, active_mask)
                arrays["winners"].copy_(winners)
                args.phase = K.APPLY
                kernels.run(args)
        if s.routing_log is not None and tables.anchor is not None:
            step_no = int(L.state(L.params[tables.anchor])["step"])
            s.routing_log.append(
                step_no,
                arrays["winners"].bool(),
                scores.float(),
                tables.arrays["active"].bool(),
            )
        return None
