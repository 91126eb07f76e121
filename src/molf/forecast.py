"""Where MoLF's first optimizer step will send each module, from one backward pass, before any
training: the guard that tells a user "at this setting MoLF is an FFT" (or "a LoRA") before the
compute is spent.

At step 1 Adam's moments are m = (1 - b1) g and v = (1 - b2) g^2, so EPD compares the experts'
mean |gradient| times their learning rates. The LoRA expert starts at B = 0: A has no gradient
yet and B's is s G A^T, a random projection of the FFT expert's gradient G. With A drawn from
U(-1/sqrt(in), 1/sqrt(in)) this gives (docs/method.md section 8)

    EPD_lora / EPD_fft = (lr_lora / lr_fft) * s * out / (in + out) * sqrt(2 / pi) / sqrt(3) * kappa

with s the LoRA scale (alpha / sqrt(rank) under rsLoRA) and kappa = mean_o(||G_o,:|| / sqrt(in))
/ mean|G|, a property of the module's gradient alone. The LoRA expert wins a module when the
ratio exceeds 1, and the step-1 split holds for the rest of a run within a few points (measured
in docs/routing-sweep). `forecast_routing` reads G from the `.grad` a backward pass left on the
wrapped model's FFT experts.

PFN (`score="pfn"`) compares sqrt(mean over an expert's elements of (m / (sqrt(v) + eps))^2).
At step 1 each element with a gradient contributes (1 - b1)^2 / (1 - b2) (while |g| is well
above eps / sqrt(1 - b2)), whatever its size, and A contributes nothing, so

    PFN_lora / PFN_fft = sqrt(numel(B) / (numel(A) + numel(B))) = sqrt(out / (in + out)) < 1

for every module at any alpha, rank and learning rates: PFN's first step goes to the FFT
expert everywhere, and a LoRA expert left at B = 0 keeps A's gradient at zero afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from molf.errors import MoLFError
from molf.layer import base_layer_kind, molf_modules

__all__ = [
    "GAUSS",
    "RoutingForecast",
    "forecast_routing",
    "gradient_kappa",
    "lora_over_fft",
    "pfn_lora_over_fft",
]

# sqrt(2 / pi) / sqrt(3): E|a . x| for x uniform on +-1/sqrt(in) per unit row norm, times sqrt(in)
GAUSS = math.sqrt(2.0 / math.pi) / math.sqrt(3.0)
# a forecast at or beyond this share of modules for one expert calls MoLF that expert
ONE_SIDED = 0.95


def gradient_kappa(grad: torch.Tensor) -> float:
    """kappa of a weight gradient [out, in]: the mean row norm over sqrt(in), over mean |G|
    (1.25 for Gaussian entries; larger when the gradient sits in a few rows or entries)."""
    g = grad.detach().double()
    mean_abs = float(g.abs().mean())
    row = float(g.norm(dim=1).mean()) / math.sqrt(g.shape[1])
    return row / mean_abs if mean_abs > 0 else math.nan


def lora_over_fft(kappa: float, n_in: int, n_out: int, scale: float, lr_ratio: float) -> float:
    """The predicted step-1 EPD ratio LoRA / FFT of one module (module docstring)."""
    return lr_ratio * scale * (n_out / (n_in + n_out)) * GAUSS * kappa


def pfn_lora_over_fft(n_in: int, n_out: int) -> float:
    """The step-1 PFN ratio LoRA / FFT of one module where every gradient is well above eps
    (module docstring)."""
    return math.sqrt(n_out / (n_in + n_out))


def _pfn_step1(params: list[torch.Tensor], betas: tuple[float, float], eps: float) -> float:
    """An expert's step-1 PFN from its parameters' gradients, eps included: the optimizer's own
    PFN partials (`molf.optim.functional`) of the step-1 moments m = (1 - b1) g and
    v = (1 - b2) g^2, in float64; a parameter without a gradient counts as zeros."""
    from molf.optim import functional as F

    grads = [
        p.grad.detach().double()
        if p.grad is not None
        else torch.zeros(p.shape, dtype=torch.float64)
        for p in params
    ]
    ms = [(1 - betas[0]) * g for g in grads]
    vs = [(1 - betas[1]) * g * g for g in grads]
    total = float(F.kernel_partials("pfn", ms, vs, eps).sum())
    numel = sum(p.numel() for p in params)
    return math.sqrt(total / numel) if numel else math.nan


@dataclass
class RoutingForecast:
    """The predicted step-1 routing of a MoLF model: `ratios` (EPD_lora / EPD_fft per module;
    above 1 the LoRA expert wins) and the settings that decided it."""

    ratios: dict[str, float]
    rank: int
    scale: float
    lr_fft: float
    lr_lora: float
    use_rslora: bool = True
    score: str = "epd"

    @property
    def fft_share(self) -> float:
        """The share of modules whose first update goes to the FFT expert."""
        return sum(r <= 1 for r in self.ratios.values()) / max(len(self.ratios), 1)

    def one_sided(self) -> str | None:
        """'fft' or 'lora' when that expert takes at least 95% of the modules, else None."""
        if self.fft_share >= ONE_SIDED:
            return "fft"
        if 1 - self.fft_share >= ONE_SIDED:
            return "lora"
        return None

    def message(self) -> str | None:
        """A plain warning when MoLF would be (nearly) one of its experts, else None."""
        side = self.one_sided()
        if side is None:
            return None
        if self.score == "pfn":
            return (
                f"at this setting MoLF is an FFT at lr_fft {self.lr_fft:g}: the PFN score sends "
                f"{100 * self.fft_share:.0f}% of the modules' first step to the FFT expert, "
                "because it compares normalised step sizes, not their effect, and the LoRA "
                "expert's A has no gradient while B = 0 (its score is sqrt(out / (in + out)) of "
                "FFT's at any lora_alpha, rank and learning rates). score=epd routes by the "
                "expected loss decrease instead"
            )
        over = f"sqrt(rank {self.rank})" if self.use_rslora else f"rank {self.rank}"
        settings = (
            f"the LoRA scale is {self.scale:.3g} (lora_alpha / {over}) and lr_lora / lr_fft is "
            f"{self.lr_lora / self.lr_fft:.3g}"
        )
        if side == "lora":
            return (
                f"at this setting MoLF is a LoRA of rank {self.rank} at lr_lora "
                f"{self.lr_lora:g}: the first step is predicted to send "
                f"{100 * (1 - self.fft_share):.0f}% of the modules to the LoRA expert, because "
                f"{settings}. A lower lora_alpha or lr_lora (or a higher rank) gives modules to "
                "the FFT expert; `molf routing-sweep --predict` shows the split per setting"
            )
        return (
            f"at this setting MoLF is an FFT at lr_fft {self.lr_fft:g}: the first step is "
            f"predicted to send {100 * self.fft_share:.0f}% of the modules to the FFT expert, "
            f"because {settings}. A higher lora_alpha or lr_lora (or a lower rank) gives "
            "modules to the LoRA expert; `molf routing-sweep --predict` shows the split per "
            "setting"
        )


def forecast_routing(
    model: nn.Module,
    lr_fft: float,
    lr_lora: float,
    score: str = "epd",
    betas: tuple[float, float] = (0.9, 0.999),
    score_eps: float = 1e-8,
) -> RoutingForecast:
    """Predict MoLF's step-1 routing (`score` "epd" or "pfn") from the gradients of one backward
    pass. PFN's is computed from the experts' own gradients with the optimizer's `betas` and
    `score_eps` (exact at step 1); EPD's from the FFT gradient by the formula above.

    Call it after `loss.backward()` on the first batch and before the first optimizer step (then
    `model.zero_grad()`); nothing is changed. The model must be MoLF: an FFT expert and one LoRA
    expert per wrapped module, the LoRA expert still at B = 0."""
    modules = molf_modules(model)
    if not modules:
        raise MoLFError("forecast_routing: the model has no MoLF modules; wrap it with molf.wrap")
    ratios: dict[str, float] = {}
    first = next(iter(modules.values()))
    if not first.train_base or len(first.ranks) != 1:
        raise MoLFError(
            "forecast_routing: needs MoLF's two experts, FFT and one LoRA (train_base=True, one "
            f"rank); this model has {', '.join(first.expert_names)}"
        )
    if score not in ("epd", "pfn"):
        raise MoLFError(f"forecast_routing: score must be 'epd' or 'pfn', got {score!r}")
    if not (lr_fft > 0 and lr_lora >= 0):
        raise MoLFError(f"forecast_routing: lr_fft must be > 0, got {lr_fft}")
    for name, m in modules.items():
        grad = m.base_layer.weight.grad
        if grad is None:
            raise MoLFError(
                f"forecast_routing: module '{name}' has no gradient: call loss.backward() on the "
                "first batch before forecasting"
            )
        if bool((m.lora_B[0] != 0).any()):
            raise MoLFError(
                f"forecast_routing: module '{name}' has a trained LoRA expert (B != 0): the "
                "forecast is for the first step"
            )
        if base_layer_kind(m.base_layer).fan_in_fan_out:  # Conv1D keeps its weight [in, out]
            grad = grad.T
        if score == "pfn":
            fft = _pfn_step1(m.fft_expert(), betas, score_eps)
            ratios[name] = _pfn_step1(m.lora_experts()[0], betas, score_eps) / fft
            continue
        kappa = gradient_kappa(grad)
        ratios[name] = lora_over_fft(
            kappa, m.in_features, m.out_features, m.scalings[0], lr_lora / lr_fft
        )
    rslora = getattr(getattr(model, "molf_config", None), "use_rslora", True)
    return RoutingForecast(
        ratios, first.ranks[0], first.scalings[0], lr_fft, lr_lora, rslora, score
    )
