"""Routing over sharded or replicated parameters (docs/method.md section 4).

Every rank must pick the same winners. Under FSDP2 each rank holds a shard of every moment, so
MoLFAdamW sums its float32 score partials over the local shards and a reducer adds them up across
ranks with one `all_reduce(SUM)` of the packed [modules, experts] totals per step (a DTensor's
`numel()` is global, so the score divides by the expert's whole size). Moments are never
gathered. Under DDP the gradients are averaged before the step, so every rank computes the same
totals; the reducer broadcasts rank 0's anyway, so that no rounding difference can make two ranks
disagree. Engines that flatten parameters (FSDP1, DeepSpeed ZeRO) hide the expert tensors and
are refused by `check_model`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from molf.errors import MolfError


def torch_dist() -> Any:
    import torch.distributed as dist

    return dist


def check_model(model: nn.Module) -> None:
    """Refuse models prepared by engines that break per-module routing (docs/method.md section 4)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover - torch without distributed
        FSDP1 = ()  # noqa: N806
    for name, module in model.named_modules():
        if isinstance(module, FSDP1):
            where = f" ('{name}')" if name else ""
            raise MolfError(
                f"model{where} is wrapped by FSDP1 (FullyShardedDataParallel), whose flattened "
                "parameters hide the expert tensors and their global sizes from MoLF's routing; "
                "use FSDP2 (torch.distributed.fsdp.fully_shard, distributed=fsdp2) instead"
            )
        if type(module).__name__ == "DeepSpeedEngine":
            raise MolfError(
                "model is wrapped by a DeepSpeed engine: ZeRO partitions and flattens parameters "
                "and optimizer state, which breaks MoLF's per-module routing; use FSDP2 "
                "(distributed=fsdp2) instead"
            )
    for name, p in model.named_parameters():
        if type(p).__name__ == "FlatParameter" or hasattr(p, "ds_id"):
            raise MolfError(
                f"parameter '{name}' is a flattened or ZeRO-partitioned parameter (FSDP1 or "
                "DeepSpeed), which breaks MoLF's per-module routing; use FSDP2 "
                "(torch.distributed.fsdp.fully_shard, distributed=fsdp2) instead"
            )


def _sharded_groups(params: Sequence[torch.Tensor]) -> list[Any] | None:
    """Process groups over which the parameters are sharded (None: no DTensor parameters)."""
    from torch.distributed.tensor import DTensor, Shard

    meshes = {}
    for p in params:
        if isinstance(p, DTensor):
            dims = tuple(i for i, pl in enumerate(p.placements) if isinstance(pl, Shard))
            # equal meshes compare equal: fully_shard without a mesh makes a new one per call
            meshes[(p.device_mesh, dims)] = (p.device_mesh, dims)
    if not meshes:
        return None
    if len(meshes) > 1:
        raise MolfError(
            "MoLFAdamW: the parameters are sharded over different device meshes or mesh "
            "dimensions; shard the whole model with one fully_shard mesh"
        )
    mesh, dims = next(iter(meshes.values()))
    return [mesh.get_group(d) for d in dims]


def make_score_reducer(
    mode: str, params: Sequence[torch.Tensor] = ()
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-step reduction of the packed [modules, experts] score totals for `mode`.

    fsdp2: all_reduce(SUM) over the shard group(s) of `params` (default: the whole world): the
    totals are sums of local-shard partials. ddp: broadcast of rank 0's totals (all ranks hold the
    same moments; this makes the decision provably identical).
    """
    dist = torch_dist()
    if mode == "fsdp2":
        groups = _sharded_groups(params) if params else None
        groups = groups or [None]

        def reduce_sum(totals: torch.Tensor) -> torch.Tensor:
            for group in groups:
                dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
            return totals

        return reduce_sum
    if mode == "ddp":

        def from_rank0(totals: torch.Tensor) -> torch.Tensor:
            dist.broadcast(totals, src=0)
            return totals

        return from_rank0
    raise MolfError(f"score reducer: mode must be 'ddp' or 'fsdp2', got {mode!r}")


def attach_score_reducer(optimizer: torch.optim.Optimizer) -> None:
    """Give a MoLFAdamW the reducer its parameters need: FSDP2 (DTensor) parameters the
    shard-group sum (MoLFAdamW sets that one itself), replicated parameters in a multi-process
    run (DDP) the rank-0 broadcast; a single process needs none. Other optimizers are left
    alone."""
    if not hasattr(optimizer, "score_reducer"):
        return
    dist = torch_dist()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if _sharded_groups(params) is not None:
        optimizer.score_reducer = make_score_reducer("fsdp2", params)
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        optimizer.score_reducer = make_score_reducer("ddp")
