"""The routing optimizer: `MoLFAdamW` and the pieces behind it (see docs/method.md section 3)."""

from molf.optim.adamw import MoLFAdamW

__all__ = ["MoLFAdamW"]
