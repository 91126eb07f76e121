"""What the routing log costs as a run grows: memory held and the time of a checkpoint, with the
records kept in memory and rewritten whole into every checkpoint (the loop before streaming) and
with the log streamed to disk (`RoutingLog.stream_to`, a checkpoint stores `state_dict()`).

    python benchmarks/routing_log.py [--modules 210] [--steps 2000 4000 6000 8000]

Records have the shape of a SmolLM2-135M MoLF run (210 wrapped modules, 2 experts, random
scores); each milestone appends records up to that step count and then takes one checkpoint, as
a run checkpointing every 2000 steps would. A streamed checkpoint flushes and fsyncs the lines
written since the previous one, so its cost follows the checkpoint interval, not the run length.
Memory is the growth of the process's resident size since the first 20 steps (both logs are built
in turn, the in-memory one last so that the streamed one cannot benefit from its freed memory).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import _status_bytes, fmt_bytes, table

from molf import RoutingLog

WARMUP = 20  # steps before the resident size is taken as the baseline


def _trim() -> None:
    """Return freed heap memory to the OS, so that the resident size shows what is held."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _resident() -> int:
    gc.collect()
    _trim()
    return _status_bytes("VmRSS:")


def run(streamed: bool, modules: int, milestones: list[int], tmp: Path) -> list[tuple]:
    """(steps, memory growth, checkpoint seconds, checkpoint bytes) at each milestone."""
    names = [f"model.layers.{i // 7}.proj{i % 7}" for i in range(modules)]
    log = RoutingLog(names, ["fft", "lora_r128"])
    g = torch.Generator().manual_seed(0)
    active = torch.ones(modules, dtype=torch.bool)
    if streamed:
        log.stream_to(tmp / "routing.jsonl")
    out, step, base = [], 0, 0
    for target in [WARMUP, *milestones]:
        while step < target:
            step += 1
            scores = torch.rand(modules, 2, generator=g)
            winners = torch.zeros(modules, 2, dtype=torch.bool)
            winners.scatter_(1, scores.argmax(dim=1, keepdim=True), True)
            log.append(step, winners, scores, active)
        if target == WARMUP:  # allocator pools and file buffers exist from here on
            base = _resident()
            continue
        held = _resident() - base
        t0 = time.perf_counter()
        if streamed:
            state = log.state_dict()
            (tmp / "routing_state.json").write_text(str(state))
            size = (tmp / "routing_state.json").stat().st_size
        else:
            log.write_jsonl(tmp / "checkpoint-routing.jsonl")
            size = (tmp / "checkpoint-routing.jsonl").stat().st_size
        out.append((target, held, time.perf_counter() - t0, size))
    log.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=210)
    parser.add_argument("--steps", type=int, nargs="+", default=[2000, 4000, 6000, 8000])
    args = parser.parse_args(argv)
    print(
        f"routing log: {args.modules} modules x 2 experts per record; a checkpoint at each "
        f"step count"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for streamed in (True, False):
            label = "streamed to disk" if streamed else "kept in memory, rewritten"
            for steps, held, seconds, size in run(streamed, args.modules, args.steps, Path(tmp)):
                rows.append(
                    [
                        label,
                        str(steps),
                        fmt_bytes(held),
                        f"{seconds * 1e3:.1f}",
                        f"{size / 1024:.1f} KiB",
                    ]
                )
    header = ["log", "steps", "memory held", "checkpoint ms", "written per checkpoint"]
    print(table(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
