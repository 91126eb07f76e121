"""Shared pieces of the benchmarks: the models, interleaved timing, peak memory, and the counts
of operator calls and host reads of a step (also used by the tests, so that they are checked).

The models have random weights, so nothing is downloaded: the smollm2-135m architecture
(LlamaConfig: hidden 576, intermediate 1536, 30 layers, 9 heads, 3 kv heads, vocab 49152, tied
embeddings) and a 1B-shaped Llama (Llama-3.2-1B's shapes: hidden 2048, intermediate 8192, 16
layers, 32 heads, 8 kv heads, vocab 128256, tied embeddings).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


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


SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}


def llama(
    shape: str = "smollm2-135m",
    layers: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vocab: int | None = None,
) -> nn.Module:
    """A randomly initialised LlamaForCausalLM with the shapes of SHAPES[shape] (`layers` and
    `vocab` override the depth and the vocabulary), created directly on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(SHAPES[shape])
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    if vocab is not None:
        sizes["vocab_size"] = vocab
    cfg = LlamaConfig(**sizes, tie_word_embeddings=True, max_position_embeddings=2048)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default)


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters (packed bytes for quantized ones) plus optimizer state: what stays allocated
    between steps."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        n += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
    return n


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


# Operators that make the host wait for the device when their input is on an accelerator: a
# value read into Python, a nonzero-style op whose output size depends on the data, and
# repeat_interleave without its output size.
_HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select"}


@dataclass
class HostReads:
    """Reads of device tensors by the host during a `count_host_reads` block: `blocking` ones
    (the host waits for the device) and `non_blocking` copies to the host."""

    blocking: list[str] = field(default_factory=list)
    non_blocking: list[str] = field(default_factory=list)


class count_host_reads(TorchDispatchMode):  # noqa: N801 - used like a function
    """Count every host read of a non-CPU tensor in the block, as a CPU proxy for host-device
    synchronisations. Run the code on the `meta` device, whose tensors hold no values: reads
    are answered with zeros instead of failing, so the count covers the whole step."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = HostReads()

    def __enter__(self) -> HostReads:  # type: ignore[override]
        super().__enter__()
        return self.reads

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.name()
        if not name.startswith("aten::"):
            name = f"aten::{name}"
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        on_device = any(t.device.type != "cpu" for t in tensors)
        if name.split(".")[0] == "aten::_local_scalar_dense" and on_device:
            self.reads.blocking.append(name)
            return 0
        if name.split(".")[0] in _HOST_READS and on_device:
            self.reads.blocking.append(name)
        if name.startswith("aten::repeat_interleave") and on_device:
            if kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None):
                self.reads.blocking.append(name)
        if name.split(".")[0] in ("aten::copy_", "aten::_to_copy") and on_device:
            to_host = (
                args[0].device.type == "cpu"
                if name.startswith("aten::copy_")
                else torch.device(kwargs.get("device") or "meta").type == "cpu"
            )
            if to_host:
                blocking = not kwargs.get("non_blocking", len(args) > 2 and bool(args[2]))
                (self.reads.blocking if blocking else self.reads.non_blocking).append(name)
                if name.startswith("aten::copy_"):
                    return args[0].zero_()
                src = args[0]
                return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
        return func(*args, **kwargs)


# Operators that only make a view or look at metadata: no kernel runs on any device.
VIEW_OPS = {
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::as_strided",
    "aten::slice",
    "aten::select",
    "aten::unbind",
    "aten::split",
    "aten::split_with_sizes",
    "aten::narrow",
    "aten::expand",
    "aten::alias",
    "aten::detach",
    "aten::t",
    "aten::transpose",
    "aten::lift_fresh",
    "aten::empty",
    "aten::empty_strided",
}


def count_ops(fn: Callable[[], object]) -> tuple[int, int]:
    """The operator calls `fn` makes from Python (aten events of the torch profiler that no other
    aten op called; a foreach op is one call however many tensors it covers): (all, those that
    run a kernel, i.e. not views, metadata or allocations)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [
        e.name
        for e in prof.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    ]
    return len(names), sum(n not in VIEW_OPS for n in names)


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
    parser.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
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
