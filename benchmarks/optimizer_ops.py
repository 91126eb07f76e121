"""Operator calls and host reads of one `MoLFAdamW.step()` per backend, at two model depths: a CPU
proxy for the kernel launches and host-device synchronisations a step makes on an accelerator.

    python benchmarks/optimizer_ops.py [--layers 10 30] [--backends native eager device]
                                       [--chunk-elements N]

Model: the smollm2-135m architecture (random weights) with every linear wrapped as MoLF (one
LoRA expert of rank 128, base trained), fp32, fixed random gradients.

- Operator calls: the aten operators the step calls from Python, counted by the torch profiler
  on CPU (a foreach op is one call however many tensors it covers; on a GPU it launches one
  kernel per ~20M elements or per few dozen tensors). "kernel calls" leaves out views, metadata
  and allocations, which launch nothing.
- Host reads: the step runs on the `meta` device, whose tensors hold no values, under
  `common.count_host_reads`, which answers and counts every read of a device tensor by the host:
  "blocking" ones (the host would wait for the GPU) and non-blocking copies to pinned memory.
  The native backend runs on CPU tensors only (n/a).

What must not grow with the depth is the device backend's calls; they grow only with its
chunks (one per CHUNK_ELEMENTS elements, which bounds its scratch memory).
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import count_host_reads, count_ops, llama, table

import molf
from molf.optim.backends import device as D

CONFIG = molf.MoLFConfig(lora_ranks=(128,), lora_dropout=0.0)


def _with_grads(model: torch.nn.Module, device: str) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = (
                torch.empty_like(p)
                if device == "meta"
                else torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-3
            )
    return model


def measure(backend: str, layers: int, vocab: int | None = None) -> dict[str, str]:
    """One row of the table: calls and reads of a step with the routing log off and on."""
    model = _with_grads(molf.wrap(llama("smollm2-135m", layers, vocab=vocab), CONFIG), "cpu")
    row = {"backend": backend, "layers": str(layers)}
    routed = None
    for log in (False, True):
        opt = molf.MoLFAdamW(model, backend=backend, log_routing=log, lr_fft=1e-4, lr_lora=1e-4)
        routed = len(opt.layout.params)
        opt.step()  # first step: state, pointer tables or plan
        calls, kernels = count_ops(opt.step)
        row[f"calls, log {'on' if log else 'off'}"] = f"{calls} ({kernels})"
        if backend == "device":
            row["chunks"] = str(len(opt._impl.plan.routed))
        del opt
    row["routed tensors"] = str(routed)
    del model
    if backend == "native":
        row["blocking reads off/on"] = row["non-blocking copies on"] = "n/a (CPU only)"
        return row
    meta = llama("smollm2-135m", layers, device="meta", vocab=vocab)
    meta = _with_grads(molf.wrap(meta, CONFIG), "meta")
    reads = []
    for log in (False, True):
        opt = molf.MoLFAdamW(meta, backend=backend, log_routing=log)
        with count_host_reads():  # first step, not counted
            opt.step()
        with count_host_reads() as r:
            opt.step()
            opt.step()
        reads.append((len(r.blocking) / 2, len(r.non_blocking) / 2))
    row["blocking reads off/on"] = f"{reads[0][0]:g} / {reads[1][0]:g}"
    row["non-blocking copies on"] = f"{reads[1][1]:g}"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--backends", nargs="+", default=["native", "eager", "device"])
    parser.add_argument(
        "--chunk-elements", type=int, default=D.CHUNK_ELEMENTS, help="the device backend's chunk"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    D.CHUNK_ELEMENTS = args.chunk_elements
    print(
        f"operator calls and host reads per MoLFAdamW step: smollm2-135m architecture, MoLF "
        f"(LoRA rank 128), fp32; device backend chunk {args.chunk_elements} elements; "
        f"torch {torch.__version__}"
    )
    rows = [measure(b, n, args.vocab) for b in args.backends for n in args.layers]
    header = [
        "backend",
        "layers",
        "routed tensors",
        "chunks",
        "calls, log off",
        "calls, log on",
        "blocking reads off/on",
        "non-blocking copies on",
    ]
    print(table([[r.get(h, "-") for h in header] for r in rows], header))
    print("calls: operator calls per step (of which run a kernel); reads: per step, on meta")
    return 0


if __name__ == "__main__":
    sys.exit(main())
