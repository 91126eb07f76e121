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

import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from molf.errors import MolfError
from molf.layer import molf_modules
from molf.optim import native as _native
from molf.optim.sharded import check_model, make_score_reducer
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
        self._layout: _native.NativeLayout | None = None
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
        elif self._n_slots > _native.MAX_EXPERTS:
            why = f"more than {_native.MAX_EXPERTS} experts per module"
        elif any(type(p.data) is not torch.Tensor for p in self._flat_params):
            why = "the parameters are tensor subclasses (e.g. FSDP2's DTensor)"
        elif _native.cpu_kernels() is None:
            why = f"the C++ kernels could not be built ({_native.KERNEL_STATE['error']})"
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
        lib = _native.cpu_kernels()
        if lib is None:
            return f"the kernels could not be built ({_native.KERNEL_STATE['error']})"
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
            layout = _native.NativeLayout(self, key, routed_grads, plain_grads)
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
        args = _native.KernelArgs(
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
            args.phase = _native.FUSED
            _native.run_kernel(lib, args)
        else:
            # Distributed: every module's totals are reduced before any module picks its winners.
            args.phase = _native.SCORE
            _native.run_kernel(lib, args)
            totals = self.score_reducer(arrays["totals"])
            scores = self.score_fn.finalize(
                totals, self._numel.to(totals.dtype), arrays["lr"].to(totals.dtype)[None, :]
            )
            winners = self._top_k(scores) & layout.arrays["active"].bool()[:, None]
            arrays["winners"].copy_(winners)
            args.phase = _native.APPLY
            _native.run_kernel(lib, args)
        if self.routing_log is not None and any(active):
            step_no = int(self.state[self._anchors[active.index(True)]]["step"])
            self.routing_log.append(
                step_no,
                arrays["winners"].bool(),
                scores.float(),
                layout.arrays["active"].bool(),
            )
        return None
