"""Shared pieces of the benchmarks: the model, interleaved timing, peak memory, sync counting.

The model is the smollm2-135m architecture (LlamaConfig: hidden 576, intermediate 1536, 30 layers,
9 heads, 3 kv heads, vocab 49152, tied embeddings) with random weights, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn


def _mmap_threshold(nbytes: int, trim: bool = False) -> None:
    """glibc's M_MMAP_THRESHOLD: new blocks from this size on are mmapped, so freeing them
    returns them to the OS at once. `trim` also returns the free memory glibc holds, which it
    would otherwise hand out again without the resident size growing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, nbytes)
        if trim:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def smollm2_135m(layers: int = 30, seed: int = 0) -> nn.Module:
    """A randomly initialised LlamaForCausalLM with the smollm2-135m shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    steps: int,
    warmup: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin (a different order each round)
    so that drifts of the machine spread over all of them equally. `clock` may be
    time.process_time: CPU seconds of this process, which other processes sharing the cores do
    not inflate (with one thread; with more it also counts threads spinning idle)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(steps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            sync(device)
            t0 = clock()
            fns[n]()
            sync(device)
            times[n].append(clock() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """How far memory rises above its level before `fn` while it runs: the allocator's peak on
    CUDA, the peak resident size on Linux CPUs (None where neither can be read)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    # While measuring, every block over 64 KiB is a fresh mapping, so that the peak resident
    # size sees each temporary; outside, 32 MiB, about where glibc's own threshold settles, so
    # that timed steps reuse freed memory as they normally would.
    _mmap_threshold(1 << 16, trim=True)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident size (VmHWM) to the current one
        before = _status_bytes("VmRSS:")
        fn()
        return max(0, _status_bytes("VmHWM:") - before)
    except OSError:
        fn()
        return None
    finally:
        _mmap_threshold(32 << 20)


def count_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Host-device synchronisations made by `fn`, as torch.cuda.set_sync_debug_mode reports them
    (None on devices without that mode)."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cap = torch.backends.cpu.get_cpu_capability()
    return f"cpu ({cap}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def base_parser(description: str, steps: int) -> argparse.ArgumentParser:
    """The options every benchmark takes: device, model depth, timed steps, threads, clock."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (30 = full)")
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per contender")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: process CPU time, robust on a shared machine with --threads 1",
    )
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads and return the --device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)
