"""The training application: run config, methods, the loop, checkpoints, distributed launch and
model loading. Built on the core (`molf.wrap`, `MoLFAdamW`); the core never imports it."""
