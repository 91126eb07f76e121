"""MoLFAdamW: AdamW that routes each wrapped module's update to its top-k experts.

One step, for every wrapped module (method.md section 3):
  1. every expert's moments advance with its exact gradient (winners and losers alike);
  2. the module's step count advances (bias correction follows the moments, not the updates);
  3. every expert is scored on its raw moments (EPD by default, see molf.scores);
  4. the top-k experts win, ties going to the lower expert index;
  5. only winners are decayed and updated with the bias-corrected Adam step.
Parameters outside wrapped modules get plain AdamW every step.

The scores of all modules are reduced into one [modules, experts] tensor and the winners are
picked with one batched op on the device; the host sees one small tensor per step (for the
routing log and to select the winners' tensors), never one `.item()` per module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from molf.errors import MolfError
from molf.layer import molf_modules
from molf.routing import RoutingLog
from molf.scores import get_score


def _as_list(value: float | Sequence[float], n: int, field: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    out = [float(v) for v in value]
    if len(out) != n:
        raise MolfError(f"{field}: {len(out)} values for {n} LoRA experts")
    return out


def _adam_update(
    params: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[float],
    lr: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """Decoupled weight decay, then p -= lr * m_hat / (sqrt(v_hat) + eps), on already-advanced moments."""
    if not params:
        return
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    bc2_sqrt = [math.sqrt(1.0 - beta2**t) for t in steps]
    step_sizes = [-lr / (1.0 - beta1**t) for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    same_dtype = all(p.dtype == m.dtype for p, m in zip(params, exp_avgs))
    if same_dtype:
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
        return
    # Low-precision parameters with float32 moments: do the arithmetic in float32, round once.
    for p, m, d, s in zip(params, exp_avgs, denom, step_sizes):
        p.copy_(p.to(m.dtype).addcdiv_(m, d, value=s))


def _advance_moments(
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    beta1: float,
    beta2: float,
) -> None:
    grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)


class MoLFAdamW(torch.optim.Optimizer):
    """AdamW with per-module, per-step routing between the experts of `molf.wrap`ped linears.

    Args:
        model: a model wrapped by `molf.wrap`.
        lr_fft, weight_decay_fft: learning rate and decoupled weight decay of the FFT expert.
        lr_lora, weight_decay_lora: the same for the LoRA experts (one value, or one per expert).
        lr_other, weight_decay_other: for trainable parameters outside wrapped modules
            (default: the FFT values, or the LoRA ones when the base is frozen); biases and
            1-d weights (norms) never decay.
        betas, eps: AdamW's.
        score: a registered score name ("epd", the paper's default, or "pfn").
        top_k: number of experts updated per module and step (1 to the number of experts).
        moments_dtype: "float32" (default: moments in float32, or float64 for float64 params) or
            "param" (moments in the parameter dtype, e.g. bfloat16, to save memory).
        log_routing: keep a `RoutingLog` of winners and scores in `self.routing_log`.

    Parameter groups are flat and fixed: one per expert slot ("fft", "lora_r128", ...), then
    "other" and "other_no_decay". An LR scheduler scales every group, so the FFT/LoRA learning
    rate ratio, which biases EPD routing, stays what the user chose.
    """

    def __init__(
        self,
        model: nn.Module,
        lr_fft: float = 5e-5,
        lr_lora: float | Sequence[float] = 5e-5,
        weight_decay_fft: float = 0.1,
        weight_decay_lora: float | Sequence[float] = 0.01,
        lr_other: float | None = None,
        weight_decay_other: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        score: str = "epd",
        top_k: int = 1,
        moments_dtype: str = "float32",
        log_routing: bool = True,
    ) -> None:
        modules = molf_modules(model)
        if not modules:
            raise MolfError("MoLFAdamW: the model has no MoLF modules; call molf.wrap(model) first")
        first = next(iter(modules.values()))
        expert_names = first.expert_names
        for name, m in modules.items():
            if m.expert_names != expert_names:
                raise MolfError(
                    f"MoLFAdamW: module '{name}' has experts {m.expert_names}, not {expert_names}"
                )
        n_experts = len(expert_names)
        if not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
            raise MolfError(
                f"top_k: must be between 1 and the number of experts ({n_experts}), got {top_k}"
            )
        if moments_dtype not in ("float32", "param"):
            raise MolfError(f"moments_dtype: must be 'float32' or 'param', got {moments_dtype!r}")
        for field, value in (("lr_fft", lr_fft), ("eps", eps)):
            if not value >= 0:
                raise MolfError(f"{field}: must be >= 0, got {value}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise MolfError(f"betas: each must be in [0, 1), got {betas}")
        self.score_fn = get_score(score)
        n_lora = len(first.ranks)
        lr_loras = _as_list(lr_lora, n_lora, "lr_lora")
        wd_loras = _as_list(weight_decay_lora, n_lora, "weight_decay_lora")
        if any(lr < 0 for lr in lr_loras):
            raise MolfError(f"lr_lora: must be >= 0, got {lr_lora}")

        # One group per expert slot: every module's expert j lives in group j.
        slots: list[dict[str, Any]] = []
        if first.train_base:
            slots.append({"name": "fft", "lr": lr_fft, "weight_decay": weight_decay_fft})
        for j in range(n_lora):
            slots.append(
                {"name": expert_names[len(slots)], "lr": lr_loras[j], "weight_decay": wd_loras[j]}
            )
        routed: list[list[list[nn.Parameter]]] = [m.experts() for m in modules.values()]
        for j, slot in enumerate(slots):
            slot["params"] = [p for experts in routed for p in experts[j]]
            slot["routed"] = True

        routed_ids = {id(p) for slot in slots for p in slot["params"]}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in routed_ids]
        base_trained = first.train_base
        lr_o = lr_other if lr_other is not None else (lr_fft if base_trained else lr_loras[0])
        wd_o = (
            weight_decay_other
            if weight_decay_other is not None
            else (weight_decay_fft if base_trained else wd_loras[0])
        )
        groups = slots + [
            {
                "name": "other",
                "params": [p for p in others if p.dim() >= 2],
                "lr": lr_o,
                "weight_decay": wd_o,
                "routed": False,
            },
            {
                "name": "other_no_decay",
                "params": [p for p in others if p.dim() < 2],
                "lr": lr_o,
                "weight_decay": 0.0,
                "routed": False,
            },
        ]
        groups = [g for g in groups if g["params"] or g.get("routed")]
        defaults = {"lr": lr_fft, "weight_decay": 0.0, "betas": tuple(betas), "eps": eps}
        super().__init__(groups, defaults)

        self.top_k = top_k
        self.moments_dtype = moments_dtype
        self.expert_names = expert_names
        self.module_names = list(modules)
        self._routed = routed
        self._n_slots = n_experts
        # Flat view of the routed parameters, with the [module, expert] bucket of each.
        self._flat = [
            (p, mi, j)
            for mi, experts in enumerate(routed)
            for j, ps in enumerate(experts)
            for p in ps
        ]
        device = first.weight.device
        self._bucket = torch.tensor([mi * n_experts + j for _, mi, j in self._flat], device=device)
        numel = torch.zeros(len(routed) * n_experts, dtype=torch.float64)
        for p, mi, j in self._flat:
            numel[mi * n_experts + j] += p.numel()  # global numel, also for DTensor shards
        self._numel = numel.view(len(routed), n_experts).to(device)
        self._anchors = [experts[0][0] for experts in routed]
        self.routing_log = (
            RoutingLog(self.module_names, list(expert_names)) if log_routing else None
        )
        self.score_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None

    # -- state -----------------------------------------------------------------------------------
    def _moment_dtype(self, p: torch.Tensor) -> torch.dtype:
        if self.moments_dtype == "param":
            return p.dtype
        return torch.promote_types(p.dtype, torch.float32)

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            dt = self._moment_dtype(p)
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like torch's, but keeps each state tensor's saved dtype (float32 moments of bfloat16
        params, integer win counts) instead of casting everything to the parameter dtype."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, st in saved.items():
            p = params[idx]
            for key, val in st.items():
                if torch.is_tensor(val):
                    device = val.device if key in ("step", "wins") else p.device
                    self.state[p][key] = val.to(device=device, copy=True)

    def win_counts(self) -> torch.Tensor:
        """[modules, experts] int64: how often each expert of each module has won so far."""
        rows = []
        for anchor in self._anchors:
            wins = self.state[anchor].get("wins")
            rows.append(wins if wins is not None else torch.zeros(self._n_slots, dtype=torch.int64))
        return torch.stack(rows)

    # -- step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step: route and update the wrapped modules, AdamW for the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_routed()
        self._step_others()
        return loss

    def _step_routed(self) -> None:
        beta1, beta2 = self.defaults["betas"]
        eps = self.defaults["eps"]
        slots = [g for g in self.param_groups if g.get("routed")]
        active = torch.zeros(len(self._routed), dtype=torch.bool)
        for p, mi, _ in self._flat:
            if p.grad is not None:
                active[mi] = True
        if not bool(active.any()):
            return
        flat = [(p, mi, j) for p, mi, j in self._flat if active[mi]]
        states = [self._init_state(p) for p, _, _ in flat]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p, _, _ in flat]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        _advance_moments(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
        torch._foreach_add_([s["step"] for s in states], 1.0)

        partials = torch.stack(
            [self.score_fn.partial(m, v, eps) for m, v in zip(exp_avgs, exp_avg_sqs)]
        )
        bucket = self._bucket
        if len(flat) != len(self._flat):
            bucket = torch.tensor(
                [mi * self._n_slots + j for _, mi, j in flat], device=bucket.device
            )
        totals = torch.zeros(self._numel.numel(), dtype=partials.dtype, device=partials.device)
        totals.index_add_(0, bucket, partials)
        totals = totals.view_as(self._numel)
        if self.score_reducer is not None:
            totals = self.score_reducer(totals)
        lrs = torch.tensor([g["lr"] for g in slots], dtype=totals.dtype, device=totals.device)
        scores = self.score_fn.finalize(totals, self._numel.to(totals.dtype), lrs[None, :])
        winners = self._top_k(scores)
        winners &= active.to(winners.device)[:, None]

        # The one host transfer of the step: winners and scores of every module.
        packed = torch.cat([winners.to(scores.dtype), scores], dim=1).cpu()
        win_host = packed[:, : self._n_slots].bool()
        if self.routing_log is not None:
            step_no = int(self.state[self._anchors[int(active.nonzero()[0])]]["step"])
            self.routing_log.append(step_no, win_host, packed[:, self._n_slots :].float(), active)

        per_slot: list[tuple[list, list, list, list]] = [([], [], [], []) for _ in slots]
        for (p, mi, j), st in zip(flat, states):
            if win_host[mi, j]:
                ps, ms, vs, ts = per_slot[j]
                ps.append(p)
                ms.append(st["exp_avg"])
                vs.append(st["exp_avg_sq"])
                ts.append(float(st["step"]))
        for g, (ps, ms, vs, ts) in zip(slots, per_slot):
            _adam_update(ps, ms, vs, ts, g["lr"], g["weight_decay"], beta1, beta2, eps)
        for mi in active.nonzero().flatten().tolist():
            st = self.state[self._anchors[mi]]
            if "wins" not in st:
                st["wins"] = torch.zeros(self._n_slots, dtype=torch.int64)
            st["wins"] += win_host[mi].to(torch.int64)

    def _top_k(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean [modules, experts] mask of the top-k experts; ties go to the lower index."""
        if self.top_k == scores.shape[1]:
            return torch.ones_like(scores, dtype=torch.bool)
        if self.top_k == 1:
            idx = scores.argmax(dim=1, keepdim=True)  # first maximum on ties
        else:
            idx = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : self.top_k]
        mask = torch.zeros_like(scores, dtype=torch.bool)
        return mask.scatter_(1, idx, True)

    def _step_others(self) -> None:
        beta1, beta2 = self.defaults["betas"]
        eps = self.defaults["eps"]
        for g in self.param_groups:
            if g.get("routed"):
                continue
            ps = [p for p in g["params"] if p.grad is not None]
            if not ps:
                continue
            states = [self._init_state(p) for p in ps]
            ms = [s["exp_avg"] for s in states]
            vs = [s["exp_avg_sq"] for s in states]
            _advance_moments([p.grad for p in ps], ms, vs, beta1, beta2)
            torch._foreach_add_([s["step"] for s in states], 1.0)
            _adam_update(
                ps,
                ms,
                vs,
                [float(s["step"]) for s in states],
                g["lr"],
                g["weight_decay"],
                beta1,
                beta2,
                eps,
            )
