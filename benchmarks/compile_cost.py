"""What `torch.compile` of the device backend's step functions would cost: compile time of the
first step, whether a later step recompiles, and the compiled step's time against the same
functions run eagerly (the device backend as it is).

    python benchmarks/compile_cost.py [--device cpu|cuda] [--layers 1]

The functions are `molf.optim.functional`'s, on one chunk holding every routed tensor of a MoLF
model (smollm2-135m shapes, LoRA rank 128, fp32): phase A advances the moments and computes the
EPD partials, phase B applies the masked Adam update of the winners (half the tensors win).
Inductor emits C++ on CPU and Triton on a GPU; the numbers decide whether a compiled device
backend is worth its compile time.
"""

from __future__ import annotations

import sys
import time

import torch
import torch._inductor.config
from common import base_parser, describe_machine, llama, setup, sync, table

import molf
from molf.optim import functional as F
from molf.optim.backends.device import scratch_for

B1, B2, EPS = 0.9, 0.999, 1e-8


def phase_a(grads, ms, vs, scratch):
    F.advance_moments(grads, ms, vs, B1, B2, scratch)
    return F.kernel_partials("epd", ms, vs, EPS, scratch)


def phase_b(params, ms, vs, steps, won, scratch):
    n = len(params)
    F.adam_update(params, ms, vs, steps, [1e-4] * n, [0.01] * n, B1, B2, EPS, won, scratch)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():  # as in an optimizer step
        fn()
    sync(device)
    return time.perf_counter() - t0


def measure(name: str, fn, inputs, repeats: int, device: torch.device) -> list[str]:
    """Compile `fn`, call it at step 1 and 2 (does the new step recompile?), then time it
    compiled and eager; `inputs(t)` gives its arguments at step t."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    t0 = time.perf_counter()
    try:
        first = timed(lambda: compiled(*inputs(1)), device)
    except Exception as e:  # a compiler failure is a result here, not a crash
        reason = str(e).strip().splitlines()[0][:100]
        print(f"{name}: compile failed after {time.perf_counter() - t0:.0f} s: {reason}")
        return [name, "failed", "-", "-", "-", "-"]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    second = timed(lambda: compiled(*inputs(2)), device)
    recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    eager = min(timed(lambda: fn(*inputs(3)), device) for _ in range(repeats))
    steady = min(timed(lambda: compiled(*inputs(2)), device) for _ in range(repeats))
    return [
        name,
        f"{first:.1f}",
        "yes" if recompiled else "no",
        f"{second * 1e3:.1f}",
        f"{steady * 1e3:.1f}",
        f"{eager * 1e3:.1f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], steps=3)
    parser.set_defaults(layers=1)
    args = parser.parse_args(argv)
    device = setup(args)
    # compile for real: no kernels from an earlier run's on-disk cache
    torch._inductor.config.fx_graph_cache = False
    model = molf.wrap(
        llama("smollm2-135m", args.layers, device=device, vocab=args.vocab),
        molf.MoLFConfig(lora_ranks=(128,), lora_dropout=0.0),
    )
    params = [p for m in molf.molf_modules(model).values() for e in m.experts() for p in e]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    size = sum(p.numel() for p in params)
    workspace = (torch.empty(size, device=device), torch.empty(size, device=device))
    scratch = scratch_for(params, workspace)
    won = torch.arange(len(params), device=device) % 2 == 0
    print(
        f"torch.compile of the step functions: {len(params)} routed tensors, {size / 1e6:.1f}M "
        f"elements, {args.layers} layers; {describe_machine(device)}"
    )
    phases = {
        "A: moments + partials": (phase_a, lambda t: (grads, ms, vs, scratch)),
        "B: masked update": (
            phase_b,
            lambda t: (params, ms, vs, [float(t)] * len(params), won, scratch),
        ),
    }
    rows = [measure(name, fn, inputs, args.steps, device) for name, (fn, inputs) in phases.items()]
    header = ["phase", "first call s", "step 2 recompiles", "step 2 ms", "compiled ms", "eager ms"]
    print(table(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
