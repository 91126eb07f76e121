"""`molf train`'s routing guard: before the first step of a MoLF run, predict its step-1 routing
from the first batch (`molf.forecast`) and say plainly when one expert would take (nearly) every
module, so the user learns that MoLF is an FFT or a LoRA at this setting before spending the
compute. Nothing of the run changes: the gradients are dropped and the RNG state restored."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

from molf.errors import MoLFError
from molf.forecast import RoutingForecast, forecast_routing
from molf.layer import molf_modules
from molf.train.prepare import Setup, routed_optimizer

__all__ = ["forecast_first_step", "warn_if_one_sided"]


def _applies(s: Setup) -> bool:
    """A one-process MoLF run (FFT + one LoRA expert) routed by EPD or PFN at top-1, at its
    start."""
    opt = routed_optimizer(s.optimizer)
    modules = molf_modules(s.model)
    if opt is None or not modules or s.dist.enabled:
        return False
    first = next(iter(modules.values()))
    return (
        first.train_base
        and len(first.ranks) == 1
        and s.cfg.score in ("epd", "pfn")
        and s.cfg.top_k == 1
    )


def forecast_first_step(
    s: Setup, batches: Iterable[dict[str, torch.Tensor]]
) -> RoutingForecast | None:
    """The step-1 routing forecast of the run `s` from `batches`, its first optimizer step's
    micro-batches as the loop builds them (None when the guard does not apply). One forward and
    backward pass, in eval mode (LoRA dropout acts on a path that is still zero), under a forked
    RNG; the gradients are then dropped."""
    if not _applies(s):
        return None
    model = s.model
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]):
            model.eval()
            for batch in batches:
                model(**batch).loss.backward()
            return forecast_routing(model, s.cfg.lr_fft, s.cfg.lr_lora, s.cfg.score)
    except MoLFError:
        return None
    finally:
        s.optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def warn_if_one_sided(
    s: Setup, batches: Iterable[dict[str, torch.Tensor]]
) -> RoutingForecast | None:
    """Forecast the run's step-1 routing and print a warning when it is one-sided."""
    forecast = forecast_first_step(s, batches)
    message = None if forecast is None else forecast.message()
    if message and s.dist.is_main:
        print(f"molf: {message} (routing_forecast=false skips this check)", file=sys.stderr)
    return forecast
