"""Atomic, verifiable checkpoints, and what a training run saves into them and restores.

A checkpoint is a directory `checkpoints/step-000120/` written under a temporary name and renamed
into place only when complete. Its `manifest.json` (written last) records the sha256 of every
file; a checkpoint whose manifest is missing or whose files do not match is skipped, with a
warning, in favour of the previous good one. `save_checkpoint` / `load_checkpoint` carry a run
(`molf.train.prepare.Setup`) through one bitwise: trainable weights (safetensors), optimizer and
scheduler state, RNG state, the method's own state, the routing log's place and the best-so-far
evaluation; a distributed run writes DCP shards through `molf.train.distributed`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import molf
from molf import _files
from molf.errors import MolfError
from molf.train import distributed
from molf.train.distributed import DistContext
from molf.train.manifest import verify, write_manifest
from molf.train.prepare import Setup, keeps_best, routed_optimizer
from molf.train.run_dir import is_leftover, record, recorded, remove_recorded


def signed_directory(
    final: Path, fill: Callable[[Path], None], manifest_extra: dict | None = None
) -> Path:
    """Write a checkpoint-like directory atomically (`molf._files.atomic_directory`), with the
    checksum manifest written last."""

    def fill_and_sign(tmp: Path) -> None:
        fill(tmp)
        write_manifest(tmp, manifest_extra)

    return _files.atomic_directory(final, fill_and_sign)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (temporary leftovers excluded)."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; warns about each newer one that does not."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warnings.warn(
            f"skipping checkpoint {ckpt}: {problem}; falling back to the previous one", stacklevel=2
        )
    return None


def prune_checkpoints(run_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all) and `protect` (the best one, which
    `keep_best` exports at the end); drop leftovers of interrupted writes."""
    root = run_dir / "checkpoints"
    if root.exists():
        known = recorded(run_dir)
        for p in root.iterdir():
            if p.is_dir() and is_leftover(f"checkpoints/{p.name}", known):
                shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if protect is not None and old == protect:
                continue
            remove_recorded(run_dir, old.relative_to(run_dir).as_posix())


# -- a run's checkpoints ------------------------------------------------------------------------
def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _method_state(s: Setup) -> dict[str, Any] | None:
    return s.method.save_state(s.model) if s.method.save_state is not None else None


def save_checkpoint(s: Setup, step: int, log_lines: int) -> Path:
    """Write an atomic checkpoint of everything needed to continue bitwise from `step`.

    One process: safetensors weights plus torch-saved optimizer and trainer state. Distributed:
    every rank writes its DCP shards and RNG state, rank 0 the rest (molf.train.distributed)."""
    opt = s.optimizer
    routed = routed_optimizer(opt)

    def fill_common(tmp: Path) -> None:
        progress: dict[str, Any] = {"step": step, "metrics_lines": log_lines}
        if s.tracker is not None:
            progress["best"] = s.tracker.state()
        (tmp / "progress.json").write_text(json.dumps(progress))
        log = None if routed is None else routed.routing_log
        if log is not None and log.streaming:  # appended to the run's log as it goes: how far
            (tmp / "routing_state.json").write_text(json.dumps(log.state_dict()))
        elif log is not None:
            log.write_jsonl(tmp / "routing.jsonl")

    def fill(tmp: Path) -> None:
        save_file(_trainable_state(s.model), str(tmp / "trainable.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save(
            {
                "scheduler": s.scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "method_state": _method_state(s),
            },
            tmp / "trainer_state.pt",
        )
        fill_common(tmp)

    def fill_main(tmp: Path) -> None:  # distributed: rank 0's files beside the shards
        state = {"scheduler": s.scheduler.state_dict(), "method_state": _method_state(s)}
        torch.save(state, tmp / "trainer_state.pt")
        fill_common(tmp)

    final = checkpoint_dir(s.cfg.run_dir, step)
    try:
        if s.dist.enabled:
            path = distributed.save_checkpoint(
                s.dist, final, s.model, opt, fill_main, {"step": step}
            )
        else:
            path = signed_directory(final, fill, {"step": step})
    except OSError as e:
        raise MolfError(
            f"could not write checkpoint at step {step} in {s.cfg.run_dir}: {e.strerror or e}"
        ) from None
    if s.dist.is_main:
        record(s.cfg.run_dir, path)
        prune_checkpoints(s.cfg.run_dir, s.cfg.keep_checkpoints, best_checkpoint(s))
    return path


def best_checkpoint(s: Setup) -> Path | None:
    """The checkpoint `keep_best` exports at the end (None: the model being trained is it)."""
    t = s.tracker
    if not keeps_best(s.cfg) or t is None or t.best_step is None:
        return None
    return checkpoint_dir(s.cfg.run_dir, t.best_step)


def load_checkpoint(s: Setup, path: Path) -> tuple[int, int]:
    """Restore a checkpoint into `s`; returns (step, metrics lines to keep).

    A sharded (distributed) checkpoint can be resumed with any world size, one process
    included; a one-process checkpoint by one process or DDP (which holds whole tensors)."""
    if distributed.is_sharded_checkpoint(path):
        distributed.load_checkpoint(s.dist, path, s.model, s.optimizer)
    elif s.dist.mode == "fsdp2":
        raise MolfError(
            f"checkpoint {path} was written by a one-process run; resume it with "
            "distributed=none or ddp"
        )
    else:
        _load_whole_checkpoint(s, path)
    trainer = torch.load(path / "trainer_state.pt", weights_only=True)
    s.scheduler.load_state_dict(trainer["scheduler"])
    if "rng_cpu" in trainer:
        torch.set_rng_state(trainer["rng_cpu"])
        if trainer["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer["rng_cuda"])
    # older checkpoints keep AdaLoRA's allocator state under the key "adalora"
    method_state = trainer.get("method_state", trainer.get("adalora"))
    if s.method.load_state is not None and method_state:
        s.method.load_state(s.model, method_state)
    routed = routed_optimizer(s.optimizer)
    if routed is not None and routed.routing_log is not None:
        log, stream = routed.routing_log, s.cfg.run_dir / "routing.jsonl"
        if (path / "routing_state.json").exists():  # cut the log back to this checkpoint
            state = json.loads((path / "routing_state.json").read_text())
            log.stream_to(stream if s.dist.is_main else None, state)
        elif (path / "routing.jsonl").exists():  # a checkpoint that holds the whole log
            log.records = molf.RoutingLog.read_jsonl(path / "routing.jsonl").records
            log.stream_to(stream if s.dist.is_main else None)
    progress = json.loads((path / "progress.json").read_text())
    if s.tracker is not None and "best" in progress:
        s.tracker.restore(progress["best"])
    return progress["step"], progress["metrics_lines"]


def _load_whole_checkpoint(s: Setup, path: Path) -> None:
    state = load_file(str(path / "trainable.safetensors"), device=str(s.device))
    missing = s.model.load_state_dict(state, strict=False)
    wanted = {n for n, p in s.model.named_parameters() if p.requires_grad}
    lost = wanted - set(state)
    if lost or missing.unexpected_keys:
        raise MolfError(
            f"checkpoint {path} does not match this run's model/method ({sorted(lost)[:1] or missing.unexpected_keys[:1]})"
        )
    s.optimizer.load_state_dict(
        torch.load(path / "optimizer.pt", weights_only=True, map_location=s.device)
    )


def resume_path(run_dir: Path, resume: str, ctx: DistContext) -> Path | None:
    """The checkpoint to resume from (None: start afresh); rank 0 picks it for everyone."""

    def pick() -> Path | None:
        path = Path(resume) if resume != "auto" else latest_good_checkpoint(run_dir)
        if resume != "auto" and (path is None or verify(path) is not None):
            raise MolfError(f"--resume {resume}: not a complete checkpoint ({verify(path)})")
        return path

    if not ctx.enabled:
        return pick()
    found, error = None, None
    if ctx.is_main:
        try:
            picked = pick()
            found = None if picked is None else str(picked)
        except MolfError as e:
            error = str(e)
    found, error = distributed.broadcast_object((found, error), ctx)
    if error is not None:
        raise MolfError(error)
    return None if found is None else Path(found)
