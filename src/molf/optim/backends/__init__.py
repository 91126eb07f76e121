"""The implementations of a MoLFAdamW step, behind one small interface.

A backend is a class with a `name`, a `preferred_on(device)` and an `unavailable(layout, score)`
check, built once per optimizer from its `RoutedLayout`; `step(settings)` takes one whole step
(routed modules and the other parameters) and returns None, or why it cannot take this one (it
must then have changed nothing, and the optimizer steps eager instead). Adding a backend is one
new module with such a class (the interface and the shared decision are in `base.py`) and one
`register_backend` line at the bottom of this file; the
registration order is the order in which `backend="auto"` tries them.
"""

from __future__ import annotations

from molf.errors import MolfError
from molf.optim.backends.base import Backend, StepSettings
from molf.optim.layout import RoutedLayout
from molf.optim.scores import Score

__all__ = ["BACKENDS", "Backend", "StepSettings", "choose_backend", "register_backend"]


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Make `cls` selectable as `MoLFAdamW(backend=cls.name)` and by "auto"."""
    BACKENDS[cls.name] = cls
    return cls


def choose_backend(requested: str, field: str, layout: RoutedLayout, score: Score) -> type[Backend]:
    """The backend class for `requested` ("auto" or a registered name); MolfError naming
    `field` when it is unknown or cannot run this optimizer."""
    if requested == "auto":
        for cls in BACKENDS.values():
            if cls.preferred_on(layout.device) and cls.unavailable(layout, score) is None:
                return cls
        raise MolfError(f"{field}: no backend can step parameters on {layout.device}")
    if requested not in BACKENDS:
        raise MolfError(
            f"{field}: must be one of {', '.join(['auto', *BACKENDS])}, got {requested!r}"
        )
    cls = BACKENDS[requested]
    why = cls.unavailable(layout, score)
    if why is not None:
        raise MolfError(f"{field}: {requested!r} is not available: {why}")
    return cls


from molf.optim.backends.device import DeviceBackend  # noqa: E402 (after the registry)
from molf.optim.backends.eager import EagerBackend  # noqa: E402
from molf.optim.backends.native import NativeBackend  # noqa: E402

register_backend(NativeBackend)  # CPU
register_backend(DeviceBackend)  # accelerators
register_backend(EagerBackend)  # last: "auto" falls back to it on any device
