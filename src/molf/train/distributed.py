"""Multi-process training on the engines PyTorch ships: DDP and FSDP2 (docs/method.md section 4).

What this module gives the training loop, and a user's own loop:

- `init(mode)` / `shutdown(ctx)`: the process group from torchrun's (or `accelerate launch`'s)
  environment, one device per process, and a `DistContext` saying who we are.
- `molf.optim.sharded` (`check_model`, `attach_score_reducer`, used by the loop): every rank
  routes identically, and engines that hide the experts (FSDP1, DeepSpeed ZeRO) are refused.
- data and gradient helpers (`local_part`, `gradient_sync`, `all_reduce_floats`, `scalar`),
  and `save_checkpoint` / `load_checkpoint`: `torch.distributed.checkpoint` (DCP) with sharded
  model and optimizer state, written as safetensors (no pickle anywhere) into the atomic,
  checksummed directory scheme of `molf.train.checkpoint`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molf import _files
from molf.errors import MolfError
from molf.optim.sharded import torch_dist
from molf.train import manifest, methods

MODES = ("none", "ddp", "fsdp2")
DCP_DIR = "dcp"
GROUPS_FILE = "optimizer_groups.json"
# Every collective of a run waits at most this long for the slowest rank (loading a model or a
# long evaluation on rank 0 happen outside collectives, so this only bounds real hangs).
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class DistContext:
    """Who this process is in the run. `mode == "none"` is the single-process run."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None  # a 1-d DeviceMesh over all ranks, for FSDP2
    owns_group: bool = False  # whether `init` created the process group (and shutdown ends it)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# -- launch ------------------------------------------------------------------------------------
def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise MolfError(
            f"environment variable {name}: expected an integer, got {value!r}"
        ) from None


def launched_world_size() -> int | None:
    """WORLD_SIZE set by torchrun or `accelerate launch`, or None outside such a launcher."""
    return _env_int("WORLD_SIZE")


def check_launcher(mode: str) -> None:
    """Refuse launch configurations that would train wrongly, before anything is loaded."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes"):
        raise MolfError(
            "accelerate is configured for DeepSpeed: ZeRO flattens and partitions the optimizer's "
            "parameters, which breaks MoLF's per-module routing; use distributed=fsdp2 (ZeRO-3 "
            "style sharding with the expert tensors kept whole) and an accelerate config without "
            "DeepSpeed"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise MolfError(
                f"accelerate is configured for FSDP version {version}: FSDP1 flattens parameters, "
                "which breaks MoLF's per-module routing; set fsdp_version: 2 (or drop FSDP from "
                "the accelerate config) and distributed=fsdp2"
            )
    world = launched_world_size()
    if mode == "none" and world is not None and world > 1:
        raise MolfError(
            f"launched as {world} processes (WORLD_SIZE={world}) but config key 'distributed' is "
            "'none': set distributed=ddp or distributed=fsdp2"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(mode: str) -> DistContext:
    """Join (or create) the process group for `mode`; `none` returns the single-process context.

    Under torchrun / `accelerate launch` the rank, world size and rendezvous come from the
    environment; without a launcher a distributed mode runs as a world of one process (handy to
    check a config before asking for GPUs).
    """
    if mode not in MODES:
        raise MolfError(
            f"config key 'distributed': must be one of {', '.join(MODES)}, got {mode!r}"
        )
    check_launcher(mode)
    if mode == "none":
        return DistContext()
    import torch.distributed as dist

    if not dist.is_available():
        raise MolfError(f"distributed={mode}: this torch build has no torch.distributed")
    cuda = torch.cuda.is_available()
    world = launched_world_size()
    rank = _env_int("RANK") or 0
    local_rank = _env_int("LOCAL_RANK") or 0
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise MolfError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                "launch at most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # CPU tensors (the native optimizer's score totals, object collectives) go through gloo.
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    owns = not dist.is_initialized()
    if owns:
        if world is None:  # no launcher: a world of one
            world, rank = 1, 0
            dist.init_process_group(
                backend,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
                timeout=TIMEOUT,
            )
        else:
            dist.init_process_group(backend, timeout=TIMEOUT)
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = None
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
    return DistContext(mode, rank, world, local_rank, device, mesh, owns)


def shutdown(ctx: DistContext) -> None:
    """End the process group if `init` created it (idempotent)."""
    if not ctx.enabled or not ctx.owns_group:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    ctx.owns_group = False


# -- collectives -------------------------------------------------------------------------------
def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    torch_dist().broadcast_object_list(box, src=0)
    return box[0]


def agree(error: str | None, ctx: DistContext) -> None:
    """A point every rank reaches, with or without an error of its own; if any rank failed,
    every rank raises that MolfError, so that none is left waiting in a later collective."""
    if not ctx.enabled:
        if error is not None:
            raise MolfError(error)
        return
    errors: list[str | None] = [None] * ctx.world_size
    torch_dist().all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise MolfError(first)


def all_reduce_floats(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Element-wise sum over ranks of a few numbers, in one float64 all-reduce."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    torch_dist().all_reduce(t)
    return t.tolist()


def scalar(t: torch.Tensor) -> float:
    """A 0-d tensor (a DTensor too: total grad norms under FSDP2 are replicated DTensors)."""
    full = getattr(t, "full_tensor", None)
    return float(full() if full is not None else t)


# -- data and gradients --------------------------------------------------------------------------
def check_batch_size(batch_size: int, world_size: int) -> None:
    """The global micro-batch is split evenly across ranks; refuse sizes that do not split."""
    if world_size > 1 and batch_size % world_size != 0:
        raise MolfError(
            f"config key 'batch_size': {batch_size} examples per micro-batch cannot be split "
            f"evenly over {world_size} processes; use a multiple of {world_size}"
        )


def check_setup(method: str, mode: str, batch_size: int, world_size: int) -> None:
    """Refuse, before anything is loaded, what a distributed run of `method` cannot do."""
    check_batch_size(batch_size, world_size)
    refusal = methods.get(method).fsdp2_refusal
    if mode == "fsdp2" and refusal is not None:
        raise MolfError(
            f"config key 'distributed': method '{method}' cannot run under fsdp2 ({refusal}); "
            "use distributed=ddp"
        )


def local_part(indices: Sequence[int], ctx: DistContext) -> list[int]:
    """This rank's contiguous share of a global micro-batch."""
    if not ctx.enabled:
        return list(indices)
    per = len(indices) // ctx.world_size
    return list(indices[ctx.rank * per : (ctx.rank + 1) * per])


@contextlib.contextmanager
def gradient_sync(engine: nn.Module, ctx: DistContext, sync: bool) -> Iterator[None]:
    """Forward and backward of one micro-batch; gradients are reduced across ranks only when
    `sync` (the last micro-batch of a step), the others accumulate locally."""
    if ctx.mode == "ddp" and not sync:
        with engine.no_sync():
            yield
        return
    if ctx.mode == "fsdp2":
        engine.set_requires_gradient_sync(sync)
    yield


# -- models --------------------------------------------------------------------------------------
def _block_classes(model: nn.Module) -> set[str]:
    """Class names of the repeated blocks (transformers' `_no_split_modules`, e.g. decoder
    layers): each becomes one FSDP2 unit, so only one block is unsharded at a time."""
    names: set[str] = set()
    for module in model.modules():
        for n in getattr(module, "_no_split_modules", None) or []:
            names.add(n)
    return names


def shard_fsdp2(model: nn.Module, ctx: DistContext) -> nn.Module:
    """`fully_shard` every transformer block, then the root (embeddings, norm, head), in place.

    Parameters become DTensors sharded on dim 0 across all ranks; MoLF's expert tensors stay
    separate parameters, so the optimizer still sees every expert of every module.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = _block_classes(model)
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    return model


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The DDP engine around `model` (whose parameters stay the optimizer's)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def full_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0 (on CPU), gathered shard by shard; {} on other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


# -- checkpoints ---------------------------------------------------------------------------------
def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return f"{type(e).__name__}: {e}"


def collective_signed_directory(
    ctx: DistContext,
    final: Path,
    fill_all: Callable[[Path], None],
    fill_main: Callable[[Path], None],
    manifest_extra: dict[str, Any] | None = None,
) -> Path:
    """The collective version of `molf.train.checkpoint.signed_directory`.

    Rank 0 makes the temporary directory; every rank writes its part (`fill_all`, e.g. its DCP
    shards); once all have finished, rank 0 writes its own files (`fill_main`), the checksum
    manifest, fsyncs and renames into place. Any rank's failure removes the temporary directory
    and raises OSError on every rank. The directory must be on a file system all ranks share.
    """
    made: str | None = None
    error: str | None = None
    if ctx.is_main:
        try:
            made = str(_files.temp_sibling(final))
        except OSError as e:
            error = _describe(e)
    made, error = broadcast_object((made, error), ctx)
    if error is not None:
        raise OSError(errno.EIO, error)
    tmp = Path(made)
    try:
        fill_all(tmp)
    except Exception as e:
        error = f"rank {ctx.rank}: {_describe(e)}"
    errors: list[str | None] = [error]
    if ctx.enabled:
        errors = [None] * ctx.world_size
        torch_dist().all_gather_object(errors, error)
    error = next((e for e in errors if e is not None), None)
    if error is None and ctx.is_main:
        try:
            fill_main(tmp)
            manifest.write_manifest(tmp, manifest_extra)
            _files.publish(tmp, final)
        except Exception as e:
            error = _describe(e)
    if ctx.is_main and error is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    error = broadcast_object(error, ctx)
    if error is not None:
        raise OSError(errno.EIO, error)
    return final


def _materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create a fresh optimizer's state tensors (DCP loads into existing tensors): one step
    with zero gradients at learning rate 0, which moves no weight; everything it does create
    (moments, step counts, win counts, a routing record) is then overwritten by the load."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in optimizer.param_groups]
    log = getattr(optimizer, "routing_log", None)
    n_records = len(log.records) if log is not None else 0
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    try:
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        if log is not None:
            del log.records[n_records:]


def _tensor_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, with_optimizer: bool
) -> tuple[dict[str, Any], list[list[str]]]:
    """What DCP saves and loads, keyed by parameter name (the same under DDP, FSDP2 and one
    process): the trainable weights and every optimizer state tensor (DTensor shards stay
    shards), plus the names of each optimizer group's parameters, in order."""
    names = {p: n for n, p in model.named_parameters()}
    weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state: dict[str, Any] = {"model": weights}
    order: list[list[str]] = []
    if with_optimizer:
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for g in optimizer.param_groups:
            order.append([names[p] for p in g["params"]])
            for p in g["params"]:
                st = optimizer.state.get(p)
                if st:
                    tensors[names[p]] = {k: v for k, v in st.items() if torch.is_tensor(v)}
        state["optim"] = tensors
    return state, order


def _json_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def plain(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.tolist()
        if isinstance(v, tuple):
            return list(v)
        return v

    return [{k: plain(v) for k, v in g.items() if k != "params"} for g in groups]


def save_checkpoint(
    ctx: DistContext,
    final: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    write_main: Callable[[Path], None],
    manifest_extra: dict[str, Any],
) -> Path:
    """Write a sharded checkpoint atomically: DCP shards (safetensors) of the trainable weights
    and optimizer state from every rank, each rank's RNG state, the optimizer's hyperparameters
    and rank 0's own files (`write_main`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    with_optimizer = bool(optimizer.state)
    state, order = _tensor_state(model, optimizer, with_optimizer)

    def fill_all(tmp: Path) -> None:
        writer = HuggingFaceStorageWriter(str(tmp / DCP_DIR), save_distributed=True)
        dcp.save(state, storage_writer=writer)
        rng = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if ctx.device.type == "cuda" else None,
        }
        torch.save(rng, tmp / f"rng-rank{ctx.rank:05d}.pt")

    def fill_main(tmp: Path) -> None:
        groups = {
            "with_optimizer": with_optimizer,
            "params": order,
            "param_groups": _json_groups(optimizer.param_groups),
        }
        (tmp / GROUPS_FILE).write_text(json.dumps(groups))
        write_main(tmp)

    extra = {**manifest_extra, "distributed": ctx.mode, "world_size": ctx.world_size}
    return collective_signed_directory(ctx, final, fill_all, fill_main, extra)


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / DCP_DIR).is_dir()


def load_checkpoint(
    ctx: DistContext, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Restore trainable weights, optimizer state and this rank's RNG from a sharded checkpoint
    (written with any world size: DCP reshards; the RNG is restored when the sizes match)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    saved = json.loads((path / GROUPS_FILE).read_text())
    with_optimizer = bool(saved["with_optimizer"])
    if with_optimizer and not optimizer.state:
        _materialize_optimizer_state(optimizer)
    state, order = _tensor_state(model, optimizer, with_optimizer)
    if with_optimizer and saved["params"] != order:
        raise MolfError(
            f"checkpoint {path}: its optimizer groups hold other parameters than this run's "
            "(not the same method/model)"
        )
    reader = HuggingFaceStorageReader(str(path / DCP_DIR))
    if with_optimizer:
        # State the checkpoint does not hold (a parameter that never had a gradient) must not
        # keep what the materializing step made up: drop it, as a fresh optimizer would have.
        stored = set(reader.read_metadata().state_dict_metadata)
        by_name = {n: p for n, p in model.named_parameters()}
        for name, tensors in list(state["optim"].items()):
            for key in list(tensors):
                if f"optim.{name}.{key}" not in stored:
                    del tensors[key]
                    optimizer.state[by_name[name]].pop(key, None)
            if not tensors:
                del state["optim"][name]
                optimizer.state.pop(by_name[name], None)
        reader = HuggingFaceStorageReader(str(path / DCP_DIR))
    try:
        dcp.load(state, storage_reader=reader)
    except Exception as e:
        raise MolfError(
            f"checkpoint {path} does not match this run's model/method ({_describe(e)[:300]})"
        ) from None
    if with_optimizer:
        for group, hyper in zip(optimizer.param_groups, saved["param_groups"]):
            for key, value in hyper.items():
                group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
    meta = json.loads((path / manifest.MANIFEST).read_text())
    rng_file = path / f"rng-rank{ctx.rank:05d}.pt"
    if meta.get("world_size") == ctx.world_size and rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
