"""MoLFAdamW: AdamW that routes each wrapped module's update to its top-k experts.

One step, for every wrapped module (method.md section 3):
  1. every expert's moments advance with its exact gradient (winners and losers alike);
  2. the module's step count advances (bias correction follows the moments, not the updates);
  3. every expert is scored on its raw moments (EPD by default, see molf.scores);
  4. the top-k experts win, ties going to the lower expert index;
  5. only winners are decayed and updated with the bias-corrected Adam step.
Parameters outside wrapped modules get plain AdamW every step.

Two implementations of that step (`backend`, see docs/performance.md):
- "native", the default on CPU: C++ kernels built at first use with the system compiler. Steps
  1-3 are one pass over each tensor; a module's winners are updated right after it is scored,
  while their moments are still in cache; the whole step is one call, modules spread over
  threads. Costs about one fused AdamW step.
- "eager": torch ops on any device. Moments advance with foreach ops, the scores of all modules
  are reduced into one [modules, experts] tensor and the winners are picked with one batched op
  on the device. The host reads that small tensor once per step (for the routing log and to
  update only the winners); on an accelerator without a routing log it is not read at all and
  the winners are applied through a device-side mask, so the step never waits for the device.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molf.distributed import check_model, make_score_reducer
from molf.errors import MolfError
from molf.layer import molf_modules
from molf.routing import RoutingLog
from molf.scores import batched_partials, get_score

BACKENDS = ("auto", "native", "eager")
BACKEND_ENV = "MOLF_OPTIMIZER_BACKEND"


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


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on `device`, copied without making the host wait for it."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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
        backend: "auto" (native on CPU when it can be built, else eager; the environment
            variable MOLF_OPTIMIZER_BACKEND overrides it), "native" or "eager". See the module
            docstring. A step the native kernels cannot take (e.g. a non-contiguous gradient)
            runs eager, with a warning.

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
        backend: str = "auto",
    ) -> None:
        check_model(model)  # FSDP1 / DeepSpeed would hide the experts from the routing
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
        checks = [("lr_fft", lr_fft), ("weight_decay_fft", weight_decay_fft), ("eps", eps)]
        checks += [
            ("lr_lora", v) for v in ([lr_lora] if isinstance(lr_lora, (int, float)) else lr_lora)
        ]
        checks += [
            ("weight_decay_lora", v)
            for v in (
                [weight_decay_lora]
                if isinstance(weight_decay_lora, (int, float))
                else weight_decay_lora
            )
        ]
        checks += [
            (f, v)
            for f, v in (("lr_other", lr_other), ("weight_decay_other", weight_decay_other))
            if v is not None
        ]
        for field, value in checks:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise MolfError(f"{field}: must be a finite number >= 0, got {value}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise MolfError(f"betas: each must be in [0, 1), got {betas}")
        self.score_fn = get_score(score)
        n_lora = len(first.ranks)
        lr_loras = _as_list(lr_lora, n_lora, "lr_lora")
        wd_loras = _as_list(weight_decay_lora, n_lora, "weight_decay_lora")

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
        # Flat view of the routed parameters (module-major, expert-minor), with the [module,
        # expert] bucket of each and the range of each module in it.
        self._flat = [
            (p, mi, j)
            for mi, experts in enumerate(routed)
            for j, ps in enumerate(experts)
            for p in ps
        ]
        self._flat_params = [p for p, _, _ in self._flat]
        self._module_start = [0]
        for experts in routed:
            self._module_start.append(self._module_start[-1] + sum(len(ps) for ps in experts))
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
        # FSDP2 (DTensor) parameters: each rank scores its shards, so the totals must be summed
        # over the shard group before any decision (method.md section 4); never left to the user.
        self._sharded = any(type(p.data) is not torch.Tensor for p in self._flat_params)
        if self._sharded:
            self.score_reducer = make_score_reducer("fsdp2", self._flat_params)
        # Parameters outside the wrapped modules, with the index of their group.
        self._plain = [
            (p, gi)
            for gi, g in enumerate(self.param_groups)
            if not g.get("routed")
            for p in g["params"]
        ]
        self._layout: _NativeLayout | None = None
        self.backend = self._resolve_backend(backend, device)
        self._warned = False

    def _resolve_backend(self, backend: str, device: torch.device) -> str:
        field = "backend"
        if backend == "auto" and os.environ.get(BACKEND_ENV):
            backend, field = os.environ[BACKEND_ENV], BACKEND_ENV
        if backend not in BACKENDS:
            raise MolfError(f"{field}: must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "eager":
            return "eager"
        why = None
        if device.type != "cpu":
            why = f"the parameters are on {device.type}, the kernels run on CPU"
        elif self.score_fn.kernel is None:
            why = f"score '{self.score_fn.name}' has no kernel"
        elif self._n_slots > _MAX_EXPERTS:
            why = f"more than {_MAX_EXPERTS} experts per module"
        elif any(type(p.data) is not torch.Tensor for p in self._flat_params):
            why = "the parameters are tensor subclasses (e.g. FSDP2's DTensor)"
        elif _cpu_kernels() is None:
            why = f"the C++ kernels could not be built ({_KERNEL_STATE['error']})"
        if why is None:
            return "native"
        if backend == "native":
            raise MolfError(f"{field}: 'native' is not available: {why}")
        return "eager"

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

    def _wins(self, mi: int, device: torch.device) -> torch.Tensor:
        """Module mi's win counter (kept with its anchor parameter's state), on `device`."""
        st = self.state[self._anchors[mi]]
        wins = st.get("wins")
        if wins is None:
            wins = st["wins"] = torch.zeros(self._n_slots, dtype=torch.int64, device=device)
        elif wins.device != device:
            wins = st["wins"] = wins.to(device)
        return wins

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
        """[modules, experts] int64 on the CPU: how often each expert of each module has won so
        far (counters kept on an accelerator are read back, which waits for it)."""
        rows = []
        for anchor in self._anchors:
            wins = self.state[anchor].get("wins")
            rows.append(
                wins.cpu() if wins is not None else torch.zeros(self._n_slots, dtype=torch.int64)
            )
        return torch.stack(rows)

    # -- step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step: route and update the wrapped modules, AdamW for the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.backend == "native":
            why = self._step_native()
            if why is None:
                return loss
            if not self._warned:
                warnings.warn(
                    f"MoLFAdamW: native kernels skipped ({why}); stepping eager", stacklevel=2
                )
                self._warned = True
        self._step_routed()
        self._step_others()
        return loss

    def _active_modules(self) -> list[bool]:
        """Modules with a gradient on any of their experts; the others are not stepped at all."""
        start = self._module_start
        grads = [p.grad is not None for p in self._flat_params]
        return [any(grads[start[i] : start[i + 1]]) for i in range(len(self._routed))]

    def _step_routed(self) -> None:
        beta1, beta2 = self.defaults["betas"]
        eps = self.defaults["eps"]
        slots = [g for g in self.param_groups if g.get("routed")]
        active_list = self._active_modules()
        if not any(active_list):
            return
        flat = [(p, mi, j) for p, mi, j in self._flat if active_list[mi]]
        states = [self._init_state(p) for p, _, _ in flat]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p, _, _ in flat]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        _advance_moments(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
        torch._foreach_add_([s["step"] for s in states], 1.0)

        # float32 partial sums over this rank's shards; `score_reducer` adds up the ranks'
        partials = batched_partials(
            self.score_fn, [_local(m) for m in exp_avgs], [_local(v) for v in exp_avg_sqs], eps
        )
        device = partials.device
        bucket = self._bucket
        if len(flat) != len(self._flat):
            bucket = _on_device([mi * self._n_slots + j for _, mi, j in flat], torch.int64, device)
        totals = torch.zeros(self._numel.numel(), dtype=partials.dtype, device=device)
        totals.index_add_(0, bucket, partials)
        totals = totals.view_as(self._numel)
        if self.score_reducer is not None:
            totals = self.score_reducer(totals)
        lrs = _on_device([g["lr"] for g in slots], totals.dtype, device)
        scores = self.score_fn.finalize(totals, self._numel.to(totals.dtype), lrs[None, :])
        winners = self._top_k(scores)
        active = torch.tensor(active_list)
        winners &= _on_device(active_list, torch.bool, device)[:, None]
        step_no = int(self.state[self._anchors[active_list.index(True)]]["step"])

        win_host = None
        if self.routing_log is not None:
            # The one host transfer of the step: winners and scores of every module.
            packed = torch.cat([winners.to(scores.dtype), scores], dim=1).cpu()
            win_host = packed[:, : self._n_slots].bool()
            self.routing_log.append(step_no, win_host, packed[:, self._n_slots :].float(), active)
        if self._mask_on_device(device):
            self._apply_masked(flat, states, winners, bucket, slots)
            return
        if win_host is None:
            win_host = winners.cpu()

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
        rows = [mi for mi, a in enumerate(active_list) if a]
        host = torch.device("cpu")
        torch._foreach_add_(
            [self._wins(mi, host) for mi in rows], list(win_host[rows].to(torch.int64))
        )

    def _mask_on_device(self, device: torch.device) -> bool:
        """Whether winners are applied through a device mask (see `_apply_masked`) rather than
        selected on the host: on an accelerator when nothing else needs the host copy (and the
        parameters are plain tensors: the mask is not a DTensor)."""
        return device.type != "cpu" and self.routing_log is None and not self._sharded

    def _apply_masked(
        self,
        flat: list[tuple[nn.Parameter, int, int]],
        states: list[dict[str, torch.Tensor]],
        winners: torch.Tensor,
        bucket: torch.Tensor,
        slots: list[dict[str, Any]],
    ) -> None:
        """Winner updates without reading the winners on the host: every routed tensor computes
        its Adam step and keeps it only where its expert won, so losers keep their exact bits."""
        beta1, beta2 = self.defaults["betas"]
        eps = self.defaults["eps"]
        won = winners.reshape(-1)[bucket]
        for t, ((p, _, j), st) in enumerate(zip(flat, states)):
            lr, wd = slots[j]["lr"], slots[j]["weight_decay"]
            step = float(st["step"])
            m, v = st["exp_avg"], st["exp_avg_sq"]
            denom = (v.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
            new = p.to(m.dtype, copy=True).mul_(1.0 - lr * wd)
            new.addcdiv_(m, denom, value=-lr / (1.0 - beta1**step))
            p.copy_(torch.where(won[t], new, p))
        rows = sorted({mi for _, mi, _ in flat})
        counts = winners.to(torch.int64).unbind(0)  # views: no index tensor to copy over
        torch._foreach_add_(
            [self._wins(mi, winners.device) for mi in rows], [counts[mi] for mi in rows]
        )

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

    # -- native step -----------------------------------------------------------------------------
    def _step_native(self) -> str | None:
        """The whole step in one call of the C++ kernels; returns None, or why they cannot take
        it (nothing has changed then, and the caller steps eager)."""
        lib = _cpu_kernels()
        if lib is None:
            return f"the kernels could not be built ({_KERNEL_STATE['error']})"
        start = self._module_start
        routed_grads = [p.grad for p in self._flat_params]
        plain_grads = [p.grad for p, _ in self._plain]
        active = tuple(
            any(g is not None for g in routed_grads[start[i] : start[i + 1]])
            for i in range(len(self._routed))
        )
        key = (active, tuple(g is not None for g in plain_grads))
        if not any(active) and not any(key[1]):
            return None
        keep: list[torch.Tensor] = []  # zero gradients the kernels read: alive until they return
        layout = self._layout
        pointers = None
        if layout is not None and layout.key == key and layout.is_current(self.state):
            pointers = layout.grad_pointers(routed_grads, plain_grads, keep)
        if pointers is None:  # first step, other active set, new state or gradient dtypes
            layout = _NativeLayout(self, key, routed_grads, plain_grads)
            if layout.why is not None:
                return layout.why
            self._layout = layout
            pointers = layout.grad_pointers(routed_grads, plain_grads, keep)
            if pointers is None:
                return "gradients that changed while the step was prepared"
        g, pg = pointers

        beta1, beta2 = self.defaults["betas"]
        groups = self.param_groups
        slots = [grp for grp in groups if grp.get("routed")]
        n_mod, n_exp = len(active), self._n_slots
        f64 = torch.float64
        arrays = {
            "g": torch.tensor(g, dtype=torch.int64),
            "pg": torch.tensor(pg, dtype=torch.int64),
            "lr": torch.tensor([grp["lr"] for grp in slots], dtype=f64),
            "wd": torch.tensor([grp["weight_decay"] for grp in slots], dtype=f64),
            "plr": torch.tensor([groups[gi]["lr"] for gi in layout.plain_group], dtype=f64),
            "pwd": torch.tensor(
                [groups[gi]["weight_decay"] for gi in layout.plain_group], dtype=f64
            ),
            "totals": torch.zeros(n_mod, n_exp, dtype=f64),
            "scores": torch.zeros(n_mod, n_exp, dtype=f64),
            "winners": torch.zeros(n_mod, n_exp, dtype=torch.uint8),
        }
        args = _KernelArgs(
            n_mod=n_mod,
            n_exp=n_exp,
            n_plain=len(pg),
            b1=beta1,
            b2=beta2,
            eps=self.defaults["eps"],
            kind=0 if self.score_fn.kernel == "epd" else 1,
            top_k=self.top_k,
            n_threads=torch.get_num_threads(),
            **{k: v.data_ptr() for k, v in (layout.arrays | arrays).items()},
        )
        scores = arrays["scores"]
        if self.score_reducer is None:
            args.phase = _FUSED
            _run_kernel(lib, args)
        else:
            # Distributed: every module's totals are reduced before any module picks its winners.
            args.phase = _SCORE
            _run_kernel(lib, args)
            totals = self.score_reducer(arrays["totals"])
            scores = self.score_fn.finalize(
                totals, self._numel.to(totals.dtype), arrays["lr"].to(totals.dtype)[None, :]
            )
            winners = self._top_k(scores) & layout.arrays["active"].bool()[:, None]
            arrays["winners"].copy_(winners)
            args.phase = _APPLY
            _run_kernel(lib, args)
        if self.routing_log is not None and any(active):
            step_no = int(self.state[self._anchors[active.index(True)]]["step"])
            self.routing_log.append(
                step_no,
                arrays["winners"].bool(),
                scores.float(),
                layout.arrays["active"].bool(),
            )
        return None


class _NativeLayout:
    """What the kernels need that stays the same from step to step (pointers to parameters,
    moments, step counts and win counters, sizes, dtypes), for one set of active modules and of
    other parameters with gradients. Built once, checked every step, rebuilt when any of it
    changes (another active set, `load_state_dict`, a parameter given new storage...)."""

    def __init__(
        self,
        opt: MoLFAdamW,
        key: tuple[tuple[bool, ...], tuple[bool, ...]],
        routed_grads: list[torch.Tensor | None],
        plain_grads: list[torch.Tensor | None],
    ) -> None:
        self.key = key
        self.state = opt.state
        self.why: str | None = None
        # (param, its state, exp_avg, exp_avg_sq, step, param data pointer): checked every step
        self.entries: list[tuple] = []
        self.wins: list[tuple[dict, torch.Tensor]] = []
        # per gradient slot: (index into the step's gradient list or -1, expected dtype, param)
        self.routed_grads: list[tuple[int, torch.dtype | None, torch.Tensor | None]] = []
        self.plain_grads: list[tuple[int, torch.dtype | None, torch.Tensor | None]] = []
        self.plain_group: list[int] = []
        cols: dict[str, list[int]] = {k: [] for k in _COLUMNS}
        cols.update({"p" + k: [] for k in _COLUMNS[:-1]})  # the other parameters: no expert
        active, plain_has = key
        start = opt._module_start
        wins = [0] * len(active)
        for mi, is_active in enumerate(active):
            for t in range(start[mi], start[mi + 1]):
                p, _, j = opt._flat[t]
                if not is_active:  # never read by the kernels, but every column keeps one row
                    for col in _COLUMNS[:-1]:
                        cols[col].append(0)
                    cols["expert"].append(j)
                    self.routed_grads.append((-1, None, None))
                    continue
                self.why = self._add(opt, cols, "", p, routed_grads[t], j, t, self.routed_grads)
                if self.why is not None:
                    return
            if is_active:
                st = opt.state[opt._anchors[mi]]
                w = opt._wins(mi, torch.device("cpu"))
                self.wins.append((st, w))
                wins[mi] = w.data_ptr()
        for i, ((p, gi), has) in enumerate(zip(opt._plain, plain_has)):
            if has:
                self.why = self._add(opt, cols, "p", p, plain_grads[i], 0, i, self.plain_grads)
                if self.why is not None:
                    return
                self.plain_group.append(gi)
        self.arrays = {k: torch.tensor(v, dtype=torch.int64) for k, v in cols.items()}
        self.arrays["mod_start"] = torch.tensor(start, dtype=torch.int64)
        self.arrays["active"] = torch.tensor(active, dtype=torch.uint8)
        self.arrays["wins"] = torch.tensor(wins, dtype=torch.int64)
        self.arrays["numel_exp"] = opt._numel.to("cpu", torch.float64).contiguous()

    def _add(
        self,
        opt: MoLFAdamW,
        cols: dict[str, list[int]],
        prefix: str,
        p: torch.Tensor,
        grad: torch.Tensor | None,
        expert: int,
        index: int,
        grad_slots: list,
    ) -> str | None:
        st = opt._init_state(p)
        m, v, step = st["exp_avg"], st["exp_avg_sq"], st["step"]
        g_dtype = p.dtype if grad is None else grad.dtype
        combo = _COMBOS.get((p.dtype, g_dtype, m.dtype))
        if combo is None or v.dtype != m.dtype:
            return f"dtypes param {p.dtype}, grad {g_dtype}, moments {m.dtype}"
        tensors = (p, m, v) if grad is None else (p, grad, m, v)
        if not all(_dense_cpu(t) and t.numel() == p.numel() for t in tensors):
            return "a parameter, gradient or moment that is not a contiguous CPU tensor"
        if not (step.is_cpu and step.dtype == torch.float32 and step.is_contiguous()):
            step = st["step"] = step.to("cpu", torch.float32).contiguous()
        try:
            ptr = p.data_ptr()
            values = (ptr, m.data_ptr(), v.data_ptr(), step.data_ptr(), p.numel(), combo, expert)
        except RuntimeError:  # tensor subclasses without storage, e.g. DTensor
            return f"parameters of type {type(p).__name__}"
        for col, value in zip(_COLUMNS, values):
            if prefix and col == "expert":
                continue
            cols[prefix + col].append(value)
        self.entries.append((p, st, m, v, step, ptr))
        grad_slots.append((index, g_dtype, p))
        return None

    def is_current(self, state: dict) -> bool:
        """Whether every pointer is still right: same state tensors and parameter storage."""
        return (
            state is self.state
            and all(
                state.get(p) is st
                and st.get("exp_avg") is m
                and st.get("exp_avg_sq") is v
                and st.get("step") is s
                and p.data_ptr() == ptr
                for p, st, m, v, s, ptr in self.entries
            )
            and all(st.get("wins") is w for st, w in self.wins)
        )

    def grad_pointers(
        self,
        routed_grads: list[torch.Tensor | None],
        plain_grads: list[torch.Tensor | None],
        keep: list[torch.Tensor],
    ) -> tuple[list[int], list[int]] | None:
        """This step's gradient pointers (zeros for a tensor of an active module without one),
        or None when a gradient does not match the dtype and layout the layout was built for."""
        out = []
        for grads, slots in ((routed_grads, self.routed_grads), (plain_grads, self.plain_grads)):
            ptrs = []
            for index, dtype, p in slots:
                if index < 0:
                    ptrs.append(0)
                    continue
                g = grads[index]
                if g is None:
                    if p.dtype != dtype:
                        return None
                    g = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    keep.append(g)
                elif g.dtype != dtype or not _dense_cpu(g) or g.numel() != p.numel():
                    return None
                ptrs.append(g.data_ptr())
            out.append(ptrs)
        return out[0], out[1]


_COLUMNS = ("p", "m", "v", "step", "numel", "combo", "expert")


def _dense_cpu(t: torch.Tensor) -> bool:
    return t.is_cpu and t.layout == torch.strided and t.is_contiguous()


# -- CPU kernels --------------------------------------------------------------------------------
# Built once per machine with the system C++ compiler (as torch.compile's CPU backend does) and
# cached under $MOLF_CACHE_DIR or ~/.cache/molf. They read and write the tensors in place through
# their data pointers; `_NativeLayout` checks dtypes and layout first.

_FUSED, _SCORE, _APPLY = 0, 1, 2
_MAX_EXPERTS = 64
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_COMBOS = {
    (p, g, m): _DTYPE_CODES[p] + 4 * _DTYPE_CODES[g] + 16 * _DTYPE_CODES[m]
    for p, g, m in [
        (torch.float32, torch.float32, torch.float32),
        (torch.float64, torch.float64, torch.float64),
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16, torch.float32),
        (torch.float16, torch.float32, torch.float32),
        (torch.float16, torch.float16, torch.float16),
    ]
}


class _KernelArgs(ctypes.Structure):
    """The C struct MolfStep, field by field (pointers as integers)."""

    _fields_ = (
        [
            (name, ctypes.c_int64)
            for name in (
                "n_mod n_exp mod_start expert p g m v step numel combo active numel_exp lr wd wins "
                "totals scores winners n_plain pp pg pm pv pstep pnumel pcombo plr pwd"
            ).split()
        ]
        + [(name, ctypes.c_double) for name in ("b1", "b2", "eps")]
        + [(name, ctypes.c_int64) for name in ("kind", "top_k", "phase", "n_threads")]
    )


_KERNEL_STATE: dict[str, Any] = {"lib": None, "error": None, "tried": False}
_KERNEL_LOCK = threading.Lock()


def _cache_dir() -> Path:
    if os.environ.get("MOLF_CACHE_DIR"):
        return Path(os.environ["MOLF_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "molf" / "kernels"


def _cpu_fingerprint() -> str:
    """What `-march=native` depends on: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _build(cxx: str, flags: list[str], out: Path) -> str | None:
    """Compile the kernels into `out`; returns None or the compiler's complaint."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src = Path(tmp) / "molf_kernels.cpp"
            src.write_text(_CPU_KERNELS_SOURCE)
            lib = Path(tmp) / out.name
            cmd = [cxx, *flags, "-shared", "-fPIC", "-o", str(lib), str(src)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                return (res.stderr.strip().splitlines() or ["failed"])[-1]
            os.replace(lib, out)  # atomic: concurrent processes see a whole library or none
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    return None


def _cpu_kernels() -> ctypes.CDLL | None:
    """The compiled kernels (built and cached on first use), or None if they cannot be built."""
    with _KERNEL_LOCK:
        if _KERNEL_STATE["tried"]:
            return _KERNEL_STATE["lib"]
        _KERNEL_STATE["tried"] = True
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None or sys.byteorder != "little":
            _KERNEL_STATE["error"] = (
                "no C++ compiler found (set CXX)" if cxx is None else "a big-endian host"
            )
            return None
        base = ["-O3", "-std=c++17", "-fno-math-errno"]
        # Fastest first; each fallback drops what some compilers lack (-march=native, OpenMP).
        attempts = [
            base + ["-march=native", "-fopenmp"],
            base + ["-fopenmp"],
            base + ["-march=native", "-fopenmp-simd"],
            base,
        ]
        errors = []
        for flags in attempts:
            key = hashlib.sha256(
                "\n".join([_CPU_KERNELS_SOURCE, cxx, *flags, _cpu_fingerprint()]).encode()
            ).hexdigest()[:16]
            path = _cache_dir() / f"molf_kernels_{key}.so"
            if not path.exists():
                error = _build(cxx, flags, path)
                if error is not None and not _cache_dir().is_dir():  # unwritable cache: a temp dir
                    path = Path(tempfile.gettempdir()) / "molf-kernels" / path.name
                    error = None if path.exists() else _build(cxx, flags, path)
                if error is not None:
                    errors.append(error)
                    continue
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                errors.append(str(e))
                continue
            lib.molf_step.argtypes = [ctypes.POINTER(_KernelArgs)]
            lib.molf_step.restype = ctypes.c_int
            _KERNEL_STATE["lib"] = lib
            return lib
        _KERNEL_STATE["error"] = errors[-1] if errors else "unknown error"
        return None


def _run_kernel(lib: ctypes.CDLL, args: _KernelArgs) -> None:
    if lib.molf_step(ctypes.byref(args)) != 0:
        raise RuntimeError(f"molf kernels: more than {_MAX_EXPERTS} experts per module")


_CPU_KERNELS_SOURCE = r"""
// MoLF CPU kernels (built by molf.optimizer at first use).
// One pass per tensor advances m and v and accumulates the score partial; the winners of a
// module are then updated while their moments are still in cache. A whole module is one work
// item of one thread, so its result does not depend on the thread count and needs no barrier.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

enum Dtype { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };
enum Kind { EPD = 0, PFN = 1 };
enum Phase { FUSED = 0, SCORE = 1, APPLY = 2 };
const int64_t BLOCK = 2048;  // elements per float partial sum (then summed in double)
const int64_t CHUNK = 1 << 18;  // elements per work item of the plain AdamW tensors
const int MAX_EXPERTS = 64;

inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// IEEE half by bit manipulation (any C++ compiler; _Float16 needs GCC 12), round to nearest even.
inline float half_to_float(uint16_t h) {
  uint32_t u = uint32_t(h & 0x7fffu) << 13;
  const uint32_t exp = u & (0x7c00u << 13);
  u += (127 - 15) << 23;
  float f;
  if (exp == (0x7c00u << 13)) {  // inf or NaN
    u += (128 - 16) << 23;
    std::memcpy(&f, &u, 4);
  } else if (exp == 0) {  // zero or subnormal: renormalise through a float subtraction
    u += 1 << 23;
    std::memcpy(&f, &u, 4);
    f -= 6.103515625e-05f;  // 2^-14
  } else {
    std::memcpy(&f, &u, 4);
  }
  return (h & 0x8000u) ? -f : f;
}

inline uint16_t float_to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u >= 0x47800000u) return sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN, inf
  if (u < 0x38800000u) {  // subnormal or zero: let a float addition do the rounding
    float a;
    std::memcpy(&a, &u, 4);
    a += 0.5f;
    std::memcpy(&u, &a, 4);
    return sign | uint16_t(u - 0x3f000000u);
  }
  u += 0xc8000fffu + ((u >> 13) & 1u);  // rebias the exponent, round to nearest even
  return sign | uint16_t(u >> 13);
}

template <int D> struct Io;
template <> struct Io<F32> {
  typedef float T;
  template <class C> static inline C round(C x) { return C(float(x)); }
  template <class C> static inline C ld(const T* p, int64_t i) { return C(p[i]); }
  template <class C> static inline void st(T* p, int64_t i, C x) { p[i] = float(x); }
};
template <> struct Io<F64> {
  typedef double T;
  template <class C> static inline C round(C x) { return x; }
  template <class C> static inline C ld(const T* p, int64_t i) { return C(p[i]); }
  template <class C> static inline void st(T* p, int64_t i, C x) { p[i] = double(x); }
};
template <> struct Io<BF16> {
  typedef uint16_t T;
  template <class C> static inline C round(C x) { return C(bf16_to_float(float_to_bf16(float(x)))); }
  template <class C> static inline C ld(const T* p, int64_t i) { return C(bf16_to_float(p[i])); }
  template <class C> static inline void st(T* p, int64_t i, C x) { p[i] = float_to_bf16(float(x)); }
};
template <> struct Io<F16> {
  typedef uint16_t T;
  template <class C> static inline C round(C x) { return C(half_to_float(float_to_half(float(x)))); }
  template <class C> static inline C ld(const T* p, int64_t i) { return C(half_to_float(p[i])); }
  template <class C> static inline void st(T* p, int64_t i, C x) { p[i] = float_to_half(float(x)); }
};

// m <- m + c1 (g - m); v <- b2 v + c2 g^2 on [lo, hi), c = 1 - b computed in double (1 - 0.999
// in float is off by 1e-5); returns the score partial.
template <int P, int G, int M, class C, int K>
double moments(const void* g_, void* m_, void* v_, int64_t lo, int64_t hi, C c1, C b2, C c2,
               C eps) {
  const typename Io<G>::T* g = static_cast<const typename Io<G>::T*>(g_);
  typename Io<M>::T* m = static_cast<typename Io<M>::T*>(m_);
  typename Io<M>::T* v = static_cast<typename Io<M>::T*>(v_);
  double total = 0.0;
  for (int64_t b = lo; b < hi; b += BLOCK) {
    const int64_t e = std::min(hi, b + BLOCK);
    C acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = b; i < e; ++i) {
      const C gi = Io<G>::template ld<C>(g, i);
      const C mi = Io<M>::template ld<C>(m, i) + c1 * (gi - Io<M>::template ld<C>(m, i));
      const C vi = b2 * Io<M>::template ld<C>(v, i) + c2 * (gi * gi);
      Io<M>::st(m, i, mi);
      Io<M>::st(v, i, vi);
      // the score reads the moments as stored (rounded, for low-precision moments)
      const C ms = Io<M>::round(mi), vs = Io<M>::round(vi);
      const C d = std::sqrt(vs) + eps;
      if (K == EPD) {
        acc += ms * ms / d;
      } else {
        const C u = ms / d;
        acc += u * u;
      }
    }
    total += double(acc);
  }
  return total;
}

// p <- p (1 - lr wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps) on [lo, hi), computed as
// p decay - step * m / (sqrt(v) + eps'), step = lr sqrt(bc2) / bc1, eps' = eps sqrt(bc2): one
// division and one square root per element, which bound this loop on CPUs with fast memory.
template <int P, int M, class C>
void apply(void* p_, const void* m_, const void* v_, int64_t lo, int64_t hi, C decay, C step,
           C eps) {
  typename Io<P>::T* p = static_cast<typename Io<P>::T*>(p_);
  const typename Io<M>::T* m = static_cast<const typename Io<M>::T*>(m_);
  const typename Io<M>::T* v = static_cast<const typename Io<M>::T*>(v_);
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    const C d = std::sqrt(Io<M>::template ld<C>(v, i)) + eps;
    const C pi = Io<P>::template ld<C>(p, i) * decay;
    Io<P>::st(p, i, pi - step * (Io<M>::template ld<C>(m, i) / d));
  }
}

// Plain AdamW in one pass, for parameters outside the wrapped modules.
template <int P, int G, int M, class C>
void adamw(void* p_, const void* g_, void* m_, void* v_, int64_t lo, int64_t hi, C c1, C b2, C c2,
           C decay, C step, C eps) {
  typename Io<P>::T* p = static_cast<typename Io<P>::T*>(p_);
  const typename Io<G>::T* g = static_cast<const typename Io<G>::T*>(g_);
  typename Io<M>::T* m = static_cast<typename Io<M>::T*>(m_);
  typename Io<M>::T* v = static_cast<typename Io<M>::T*>(v_);
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    const C gi = Io<G>::template ld<C>(g, i);
    const C mi = Io<M>::template ld<C>(m, i) + c1 * (gi - Io<M>::template ld<C>(m, i));
    const C vi = b2 * Io<M>::template ld<C>(v, i) + c2 * (gi * gi);
    Io<M>::st(m, i, mi);
    Io<M>::st(v, i, vi);
    const C d = std::sqrt(Io<M>::round(vi)) + eps;
    const C pi = Io<P>::template ld<C>(p, i) * decay;
    Io<P>::st(p, i, pi - step * (Io<M>::round(mi) / d));
  }
}

// The dtype combinations (param, grad, moments) the kernels are built for; "combo" codes are
// P + 4 G + 16 M. The Python side sends anything else to the eager path.
#define MOLF_COMBOS(X)        \
  X(F32, F32, F32, float)     \
  X(F64, F64, F64, double)    \
  X(BF16, BF16, F32, float)   \
  X(BF16, F32, F32, float)    \
  X(BF16, BF16, BF16, float)  \
  X(F16, F16, F32, float)     \
  X(F16, F32, F32, float)     \
  X(F16, F16, F16, float)

double run_moments(int64_t combo, int64_t kind, const void* g, void* m, void* v, int64_t lo,
                   int64_t hi, double b1, double b2, double eps) {
#define X(P, G, M, C)                                                                     \
  if (combo == P + 4 * G + 16 * M)                                                        \
    return kind == EPD                                                                    \
               ? moments<P, G, M, C, EPD>(g, m, v, lo, hi, C(1 - b1), C(b2), C(1 - b2), C(eps)) \
               : moments<P, G, M, C, PFN>(g, m, v, lo, hi, C(1 - b1), C(b2), C(1 - b2), C(eps));
  MOLF_COMBOS(X)
#undef X
  return NAN;
}

void run_apply(int64_t combo, void* p, const void* m, const void* v, int64_t lo, int64_t hi,
               double decay, double step, double eps) {
#define X(P, G, M, C)                                                                    \
  if (combo == P + 4 * G + 16 * M)                                                       \
    return apply<P, M, C>(p, m, v, lo, hi, C(decay), C(step), C(eps));
  MOLF_COMBOS(X)
#undef X
}

void run_adamw(int64_t combo, void* p, const void* g, void* m, void* v, int64_t lo, int64_t hi,
               double b1, double b2, double decay, double step, double eps) {
#define X(P, G, M, C)                                                                       \
  if (combo == P + 4 * G + 16 * M)                                                          \
    return adamw<P, G, M, C>(p, g, m, v, lo, hi, C(1 - b1), C(b2), C(1 - b2), C(decay), C(step), \
                             C(eps));
  MOLF_COMBOS(X)
#undef X
}

}  // namespace

extern "C" {

// Mirrors the ctypes Structure `_KernelArgs` in optimizer.py field by field.
struct MolfStep {
  // routed tensors, module-major and expert-minor; module i owns [mod_start[i], mod_start[i+1])
  int64_t n_mod, n_exp;
  const int64_t* mod_start;
  const int64_t* expert;
  void* const* p;
  void* const* g;
  void* const* m;
  void* const* v;
  float* const* step;
  const int64_t* numel;
  const int64_t* combo;
  const uint8_t* active;     // [n_mod]
  const double* numel_exp;   // [n_mod * n_exp] global element count of each expert
  const double* lr;          // [n_exp]
  const double* wd;          // [n_exp]
  int64_t* const* wins;      // [n_mod], null for inactive modules
  double* totals;            // [n_mod * n_exp] out (SCORE, FUSED)
  double* scores;            // [n_mod * n_exp] out (FUSED)
  uint8_t* winners;          // [n_mod * n_exp] out (FUSED) or in (APPLY)
  // parameters outside the wrapped modules: plain AdamW (APPLY, FUSED)
  int64_t n_plain;
  void* const* pp;
  void* const* pg;
  void* const* pm;
  void* const* pv;
  float* const* pstep;
  const int64_t* pnumel;
  const int64_t* pcombo;
  const double* plr;
  const double* pwd;
  double b1, b2, eps;
  int64_t kind, top_k, phase, n_threads;
};

static void apply_winners(const MolfStep& s, int64_t i) {
  const int64_t E = s.n_exp;
  for (int64_t t = s.mod_start[i]; t < s.mod_start[i + 1]; ++t) {
    const int64_t e = s.expert[t];
    if (!s.winners[i * E + e]) continue;
    const double t_ = double(*s.step[t]), bc2_sqrt = std::sqrt(1.0 - std::pow(s.b2, t_));
    run_apply(s.combo[t], s.p[t], s.m[t], s.v[t], 0, s.numel[t], 1.0 - s.lr[e] * s.wd[e],
              s.lr[e] * bc2_sqrt / (1.0 - std::pow(s.b1, t_)), s.eps * bc2_sqrt);
  }
  if (s.wins[i])
    for (int64_t e = 0; e < E; ++e) s.wins[i][e] += s.winners[i * E + e];
}

static inline bool beats(double a, double b) {  // torch's order: NaN above everything
  return (std::isnan(a) && !std::isnan(b)) || a > b;
}

static void route_module(const MolfStep& s, int64_t i) {
  const int64_t E = s.n_exp;
  double total[MAX_EXPERTS] = {0.0};
  for (int64_t t = s.mod_start[i]; t < s.mod_start[i + 1]; ++t)
    total[s.expert[t]] += run_moments(s.combo[t], s.kind, s.g[t], s.m[t], s.v[t], 0, s.numel[t],
                                      s.b1, s.b2, s.eps);
  for (int64_t e = 0; e < E; ++e) s.totals[i * E + e] = total[e];
  if (s.phase != FUSED) return;
  double score[MAX_EXPERTS];
  for (int64_t e = 0; e < E; ++e) {
    const double n = s.numel_exp[i * E + e];
    score[e] = s.kind == EPD ? s.lr[e] * total[e] / n : std::sqrt(total[e]) / std::sqrt(n);
    s.scores[i * E + e] = score[e];
    s.winners[i * E + e] = s.top_k >= E;
  }
  // top_k >= E: every expert already won above; otherwise pick k, ties to the lower index
  for (int64_t k = 0; s.top_k < E && k < s.top_k; ++k) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e)
      if (!s.winners[i * E + e] && (best < 0 || beats(score[e], score[best]))) best = e;
    s.winners[i * E + best] = 1;
  }
  apply_winners(s, i);
}

static void plain_chunk(const MolfStep& s, int64_t t, int64_t lo, int64_t hi) {
  const double t_ = double(*s.pstep[t]), bc2_sqrt = std::sqrt(1.0 - std::pow(s.b2, t_));
  run_adamw(s.pcombo[t], s.pp[t], s.pg[t], s.pm[t], s.pv[t], lo, hi, s.b1, s.b2,
            1.0 - s.plr[t] * s.pwd[t], s.plr[t] * bc2_sqrt / (1.0 - std::pow(s.b1, t_)),
            s.eps * bc2_sqrt);
}

// One optimizer phase over all tensors. Returns 0, or -1 for too many experts.
int molf_step(const MolfStep* sp) {
  const MolfStep& s = *sp;
  if (s.n_exp > MAX_EXPERTS) return -1;
  // Step counts first, serially: bias corrections below read them from any thread.
  if (s.phase != APPLY)
    for (int64_t i = 0; i < s.n_mod; ++i)
      if (s.active[i])
        for (int64_t t = s.mod_start[i]; t < s.mod_start[i + 1]; ++t) *s.step[t] += 1.0f;
  const bool plain = s.phase != SCORE;
  if (plain)
    for (int64_t t = 0; t < s.n_plain; ++t) *s.pstep[t] += 1.0f;
  // Work items, largest first so that the dynamic schedule balances: whole modules, then chunks
  // of the plain tensors.
  std::vector<std::pair<int64_t, int64_t>> items;  // (-cost, id); id >= 0 module, < 0 chunk
  std::vector<int64_t> chunk_tensor, chunk_lo;
  for (int64_t i = 0; i < s.n_mod; ++i) {
    if (!s.active[i]) continue;
    int64_t cost = 0;
    for (int64_t t = s.mod_start[i]; t < s.mod_start[i + 1]; ++t) cost += s.numel[t];
    items.push_back({-cost, i});
  }
  if (plain)
    for (int64_t t = 0; t < s.n_plain; ++t)
      for (int64_t lo = 0; lo < s.pnumel[t]; lo += CHUNK) {
        items.push_back({-std::min(CHUNK, s.pnumel[t] - lo), -1 - int64_t(chunk_tensor.size())});
        chunk_tensor.push_back(t);
        chunk_lo.push_back(lo);
      }
  std::stable_sort(items.begin(), items.end(),
                   [](const std::pair<int64_t, int64_t>& a, const std::pair<int64_t, int64_t>& b) {
                     return a.first < b.first;
                   });
  const int64_t n_items = int64_t(items.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(int(s.n_threads)) if (s.n_threads > 1)
  for (int64_t w = 0; w < n_items; ++w) {
    const int64_t id = items[w].second;
    if (id >= 0) {
      if (s.phase == APPLY)
        apply_winners(s, id);
      else
        route_module(s, id);
    } else {
      const int64_t c = -1 - id, t = chunk_tensor[c], lo = chunk_lo[c];
      plain_chunk(s, t, lo, std::min(lo + CHUNK, s.pnumel[t]));
    }
  }
  return 0;
}

}  // extern "C"
"""
