"""MoLFAdamW: AdamW that routes each wrapped module's update to its top-k experts.

One step, for every wrapped module (docs/method.md section 3):
  1. every expert's moments advance with its exact gradient (winners and losers alike);
  2. the module's step count advances (bias correction follows the moments, not the updates);
  3. every expert is scored on its raw moments (EPD by default, see molf.optim.scores);
  4. the top-k experts win, ties going to the lower expert index;
  5. only winners are decayed and updated with the bias-corrected Adam step.
A tensor without a gradient is skipped, as torch's AdamW skips it: no moment update, no step
count, not counted in its expert's size; an expert none of whose tensors has one cannot win.
Parameters outside wrapped modules get plain AdamW every step.

This class is the front: parameter groups, state, validation and the choice of a backend. The
maths is `molf.optim.functional`; the backends that run it are in `molf.optim.backends` ("native"
C++ kernels on CPU, "eager" torch ops on any device; see docs/performance.md). They read the
`RoutedLayout` built here, never the optimizer's own attributes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from molf.config import check_betas, check_rate
from molf.errors import MolfError
from molf.layer import molf_modules
from molf.optim.backends import StepSettings, choose_backend
from molf.optim.backends.eager import EagerBackend
from molf.optim.layout import RoutedLayout
from molf.optim.scores import get_score
from molf.optim.sharded import check_model, make_score_reducer
from molf.routing import RoutingLog

BACKEND_ENV = "MOLF_OPTIMIZER_BACKEND"


def _as_list(value: float | Sequence[float], n: int, field: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    out = [float(v) for v in value]
    if len(out) != n:
        raise MolfError(f"{field}: {len(out)} values for {n} LoRA experts")
    return out


def _what(value: object) -> str:
    if isinstance(value, nn.Parameter):
        return "a parameter"
    kind = type(value).__name__
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind} (of parameters?)"


class MoLFAdamW(torch.optim.Optimizer):
    """AdamW with per-module, per-step routing between the experts of `molf.wrap`ped linears.

    Args:
        model: a model wrapped by `molf.wrap`.
        lr_fft: learning rate of the FFT expert.
        lr_lora: learning rate of the LoRA experts (one value, or one per expert).
        weight_decay_fft: decoupled weight decay of the FFT expert.
        weight_decay_lora: the same for the LoRA experts (one value, or one per expert).
        lr_other: learning rate of trainable parameters outside wrapped modules (default: the
            FFT value, or the LoRA one when the base is frozen).
        weight_decay_other: their weight decay, likewise; biases and 1-d weights (norms) never
            decay.
        betas: AdamW's betas.
        eps: AdamW's eps.
        score: a registered score name ("epd", the paper's default, or "pfn").
        score_eps: the eps inside the score, its own constant (1e-8, the reference's) whatever
            Adam's `eps` is, so that changing Adam's eps does not change the routing.
        decay_bias: whether the biases of wrapped layers (scored with the FFT expert's weight)
            take the FFT weight decay; off by default, as in the reference.
        top_k: number of experts updated per module and step (1 to the number of experts).
        moments_dtype: "float32" (default: moments in float32, or float64 for float64 params) or
            "param" (moments in the parameter dtype, e.g. bfloat16, to save memory).
        log_routing: keep a `RoutingLog` of winners and scores in `self.routing_log`.
        backend: "auto" (the first registered backend that prefers the parameters' device and
            can run: native on CPU when it can be built, else eager; the environment variable
            MOLF_OPTIMIZER_BACKEND overrides it) or a name in `molf.optim.backends.BACKENDS`.
            A step a backend cannot take (e.g. a non-contiguous gradient for the native
            kernels) runs eager, with a warning.

    Parameter groups are flat and fixed: one per expert slot ("fft", "lora_r128", ...), then
    "other" and "other_no_decay". An LR scheduler scales every group, so the FFT/LoRA learning
    rate ratio, which biases EPD routing, stays what the user chose.
    """

    routes_experts = True  # molf.guard: this optimizer routes; it needs no warning

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
        score_eps: float = 1e-8,
        decay_bias: bool = False,
        top_k: int = 1,
        moments_dtype: str = "float32",
        log_routing: bool = True,
        backend: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise MolfError(
                f"MoLFAdamW takes the wrapped model itself, not {_what(model)}: it routes between "
                "each module's experts, so it needs the modules (MoLFAdamW(model, lr_fft=..., "
                "lr_lora=...))"
            )
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
        _check_settings(
            len(expert_names),
            top_k,
            moments_dtype,
            betas,
            [
                ("lr_fft", lr_fft),
                ("weight_decay_fft", weight_decay_fft),
                ("eps", eps),
                ("score_eps", score_eps),
                *[("lr_lora", v) for v in _listed(lr_lora)],
                *[("weight_decay_lora", v) for v in _listed(weight_decay_lora)],
                *[
                    (f, v)
                    for f, v in (("lr_other", lr_other), ("weight_decay_other", weight_decay_other))
                    if v is not None
                ],
            ],
        )
        self.score_fn = get_score(score)
        n_lora = len(first.ranks)
        lr_loras = _as_list(lr_lora, n_lora, "lr_lora")
        wd_loras = _as_list(weight_decay_lora, n_lora, "weight_decay_lora")

        routed: list[list[list[nn.Parameter]]] = [m.experts() for m in modules.values()]
        groups = _param_groups(
            model,
            routed,
            expert_names,
            first.train_base,
            (lr_fft, weight_decay_fft),
            list(zip(lr_loras, wd_loras)),
            (lr_other, weight_decay_other),
        )
        defaults = {"lr": lr_fft, "weight_decay": 0.0, "betas": tuple(betas), "eps": eps}
        super().__init__(groups, defaults)

        self.top_k = top_k
        self.score_eps = float(score_eps)
        self.decay_bias = bool(decay_bias)
        self.moments_dtype = moments_dtype
        self.expert_names = expert_names
        self.module_names = list(modules)
        self.routing_log = (
            RoutingLog(self.module_names, list(expert_names)) if log_routing else None
        )
        biases = {id(m.bias) for m in modules.values() if m.bias is not None}
        self.layout = self._build_layout(routed, biases, first.weight.device)
        self.score_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None
        # FSDP2 (DTensor) parameters: each rank scores its shards, so the totals must be summed
        # over the shard group before any decision (docs/method.md section 4); never left to the user.
        if self.layout.sharded:
            self.score_reducer = make_score_reducer("fsdp2", self.layout.params)
        field = "backend"
        if backend == "auto" and os.environ.get(BACKEND_ENV):
            backend, field = os.environ[BACKEND_ENV], BACKEND_ENV
        backend_cls = choose_backend(backend, field, self.layout, self.score_fn)
        self.backend = backend_cls.name
        self._impl = backend_cls(self.layout)
        self._eager = self._impl if isinstance(self._impl, EagerBackend) else None
        self._warned = False

    def _build_layout(
        self, routed: list[list[list[nn.Parameter]]], biases: set[int], device: torch.device
    ) -> RoutedLayout:
        """The read-only description of the routed tensors that the backends step."""
        n_exp = len(self.expert_names)
        flat = [
            (p, m, e)
            for m, experts in enumerate(routed)
            for e, ps in enumerate(experts)
            for p in ps
        ]
        start = [0]
        for experts in routed:
            start.append(start[-1] + sum(len(ps) for ps in experts))
        numel = torch.zeros(len(routed), n_exp, dtype=torch.float64)
        for p, m, e in flat:
            numel[m, e] += p.numel()  # global numel, also for DTensor shards
        # Parameters outside the wrapped modules, with the index of their group.
        plain = tuple(
            (p, gi)
            for gi, g in enumerate(self.param_groups)
            if not g.get("routed")
            for p in g["params"]
        )
        return RoutedLayout(
            module_names=tuple(self.module_names),
            expert_names=tuple(self.expert_names),
            params=tuple(p for p, _, _ in flat),
            module_of=tuple(m for _, m, _ in flat),
            expert_of=tuple(e for _, _, e in flat),
            module_start=tuple(start),
            decays=tuple(self.decay_bias or id(p) not in biases for p, _, _ in flat),
            tensor_numel=tuple(p.numel() for p, _, _ in flat),
            numel=numel,
            plain=plain,
            state=self._init_state,
            states=lambda: self.state,
            wins=self._wins,
            device=device,
        )

    # -- state -----------------------------------------------------------------------------------
    def _moment_dtype(self, p: torch.Tensor) -> torch.dtype:
        if self.moments_dtype == "param":
            return p.dtype
        return torch.promote_types(p.dtype, torch.float32)

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if "step" not in state:  # a module's win counter may be there first
            dt = self._moment_dtype(p)
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        return state

    def _anchor(self, mi: int) -> torch.Tensor:
        """Module mi's first tensor, whose state also holds the module's win counter."""
        return self.layout.params[self.layout.module_start[mi]]

    def _wins(self, mi: int, device: torch.device) -> torch.Tensor:
        """Module mi's win counter, on `device`."""
        st = self.state[self._anchor(mi)]
        wins = st.get("wins")
        if wins is None:
            wins = st["wins"] = torch.zeros(
                len(self.expert_names), dtype=torch.int64, device=device
            )
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
        for mi in range(self.layout.n_modules):
            wins = self.state[self._anchor(mi)].get("wins")
            rows.append(
                wins.cpu()
                if wins is not None
                else torch.zeros(len(self.expert_names), dtype=torch.int64)
            )
        return torch.stack(rows)

    # -- step ------------------------------------------------------------------------------------
    def _settings(self) -> StepSettings:
        """This step's hyperparameters, as the groups hold them now (after any LR scheduler)."""
        beta1, beta2 = self.defaults["betas"]
        slots = [g for g in self.param_groups if g.get("routed")]
        return StepSettings(
            beta1=beta1,
            beta2=beta2,
            eps=self.defaults["eps"],
            score_eps=self.score_eps,
            top_k=self.top_k,
            score=self.score_fn,
            slot_lrs=tuple(g["lr"] for g in slots),
            slot_weight_decays=tuple(g["weight_decay"] for g in slots),
            group_lrs=tuple(g["lr"] for g in self.param_groups),
            group_weight_decays=tuple(g["weight_decay"] for g in self.param_groups),
            score_reducer=self.score_reducer,
            routing_log=self.routing_log,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step: route and update the wrapped modules, AdamW for the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        settings = self._settings()
        why = self._impl.step(settings)
        if why is None:
            return loss
        if not self._warned:
            warnings.warn(
                f"MoLFAdamW: {self.backend} backend skipped this step ({why}); stepping eager",
                stacklevel=2,
            )
            self._warned = True
        if self._eager is None:
            self._eager = EagerBackend(self.layout)
        self._eager.step(settings)
        return loss


def _listed(value: float | Sequence[float]) -> list[float]:
    return [value] if isinstance(value, (int, float)) else list(value)


def check_top_k(top_k: int, n_experts: int, name: str = "top_k") -> None:
    """Refuse a top_k that is not an integer from 1 to the number of experts, naming `name`
    (the argument, or the config key when a run's config is checked)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise MolfError(
            f"{name}: must be between 1 and the number of experts ({n_experts}), got {top_k}"
        )


def _check_settings(
    n_experts: int,
    top_k: int,
    moments_dtype: str,
    betas: tuple[float, float],
    rates: list[tuple[str, Any]],
) -> None:
    """Refuse an out-of-range setting with one line naming it."""
    check_top_k(top_k, n_experts)
    if moments_dtype not in ("float32", "param"):
        raise MolfError(f"moments_dtype: must be 'float32' or 'param', got {moments_dtype!r}")
    for field, value in rates:
        check_rate(value, field)
    check_betas(betas, "betas")


def _param_groups(
    model: nn.Module,
    routed: list[list[list[nn.Parameter]]],
    expert_names: tuple[str, ...],
    train_base: bool,
    fft: tuple[float, float],
    loras: list[tuple[float, float]],
    other: tuple[float | None, float | None],
) -> list[dict[str, Any]]:
    """The flat, fixed parameter groups: one per expert slot (every module's expert j lives in
    group j), then `other` and `other_no_decay` for the trainable parameters outside the wrapped
    layers, at `other`'s rates or, unset, the FFT expert's (the first LoRA expert's in MoLF-E)."""
    slots: list[dict[str, Any]] = []
    if train_base:
        slots.append({"name": "fft", "lr": fft[0], "weight_decay": fft[1]})
    for lr, decay in loras:
        slots.append({"name": expert_names[len(slots)], "lr": lr, "weight_decay": decay})
    for j, slot in enumerate(slots):
        slot["params"] = [p for experts in routed for p in experts[j]]
        slot["routed"] = True
    routed_ids = {id(p) for slot in slots for p in slot["params"]}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in routed_ids]
    lr_o, wd_o = fft if train_base else loras[0]
    lr_o = other[0] if other[0] is not None else lr_o
    wd_o = other[1] if other[1] is not None else wd_o
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
    return [g for g in groups if g["params"] or g.get("routed")]
