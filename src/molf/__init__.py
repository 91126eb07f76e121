"""molf: Mixture of LoRA and Full fine-tuning.

model = molf.wrap(model, molf.MoLFConfig(lora_ranks=(128,)))
opt = molf.MoLFAdamW(model, lr_fft=5e-5, lr_lora=5e-5)
... loss.backward(); opt.step(); opt.zero_grad() ...
plain = molf.merge_and_unload(model)
molf.save_pretrained(model, "out")   # unmerged; molf.from_pretrained("out") rebuilds it
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The public names and the core modules that define them. `import molf` itself stays light (the
# `molf` command's `--help` answers without torch); the first access to any of these names
# imports the whole core at once, so that every module's registrations (the save guard of
# `molf.saving`, the scores) are in place whichever name is used first.
_PUBLIC = {
    "MoLFConfig": "molf.config",
    "MoLFError": "molf.errors",
    "MolfError": "molf.errors",
    "MoLFWarning": "molf.errors",
    "export_peft_lora": "molf.export",
    "merge_and_unload": "molf.export",
    "RoutingForecast": "molf.forecast",
    "forecast_routing": "molf.forecast",
    "MoLFLinear": "molf.layer",
    "molf_modules": "molf.layer",
    "wrap": "molf.layer",
    "MoLFAdamW": "molf.optim",
    "SCORES": "molf.optim.scores",
    "Score": "molf.optim.scores",
    "get_score": "molf.optim.scores",
    "register_score": "molf.optim.scores",
    "RoutingLog": "molf.routing",
    "from_pretrained": "molf.saving",
    "load_wrapped": "molf.saving",
    "save_pretrained": "molf.saving",
    "print_trainable_parameters": "molf.trainable",
    "trainable_parameters": "molf.trainable",
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'molf' has no attribute {name!r}")
    for module in dict.fromkeys(_PUBLIC.values()):
        loaded = importlib.import_module(module)
        for public, where in _PUBLIC.items():
            if where == module:
                globals()[public] = getattr(loaded, public)
    return globals()[name]


def __dir__() -> list[str]:
    """The module's names with the lazy exports among them (tab completion, `dir(molf)`)."""
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:
    from molf.config import MoLFConfig
    from molf.errors import MoLFError, MolfError, MoLFWarning
    from molf.export import export_peft_lora, merge_and_unload
    from molf.forecast import RoutingForecast, forecast_routing
    from molf.layer import MoLFLinear, molf_modules, wrap
    from molf.optim import MoLFAdamW
    from molf.optim.scores import SCORES, Score, get_score, register_score
    from molf.routing import RoutingLog
    from molf.saving import from_pretrained, load_wrapped, save_pretrained
    from molf.trainable import print_trainable_parameters, trainable_parameters

__version__ = "0.1.0"

# bitsandbytes (imported by peft and transformers' Trainer) logs one known notice at import that
# tells a molf user nothing; only that line is dropped (molf._quiet), for library users too.
from molf._quiet import quiet_known_noise as _quiet_known_noise  # noqa: E402

_quiet_known_noise()

__all__ = [
    "MoLFConfig",
    "MoLFError",
    "MolfError",
    "MoLFWarning",
    "MoLFLinear",
    "MoLFAdamW",
    "RoutingForecast",
    "RoutingLog",
    "SCORES",
    "Score",
    "export_peft_lora",
    "forecast_routing",
    "from_pretrained",
    "get_score",
    "load_wrapped",
    "merge_and_unload",
    "molf_modules",
    "print_trainable_parameters",
    "register_score",
    "save_pretrained",
    "trainable_parameters",
    "wrap",
]
