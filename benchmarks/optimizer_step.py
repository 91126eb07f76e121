"""One `MoLFAdamW.step()` against `torch.optim.AdamW` (fused and foreach) on the same tensors.

    python benchmarks/optimizer_step.py [--device cpu|cuda] [--layers 30] [--steps 20]
                                        [--threads N] [--backend auto|native|device|eager]

Models: the smollm2-135m architecture (random weights) with every linear wrapped, as MoLF (one
LoRA expert of rank 128, base trained) and as MoLF-E (LoRA experts of ranks 32 and 128, base and
everything else frozen). The AdamW baselines step exactly the tensors MoLFAdamW steps. Every
optimizer sees the same fixed random gradients; the runs are interleaved (round-robin, the order
rotating every round) and the median of `--steps` steps after warm-up is reported, with the
peak extra memory of one step and, on CUDA, the host-device synchronisations of one step
(torch.cuda.set_sync_debug_mode), with the routing log on and off.

The two routing extremes are forced through the learning rates, which EPD multiplies into the
score: an expert with learning rate 0 scores 0 and loses everywhere, so the other one wins in
every module (the winner's update runs with a non-zero learning rate, at full cost):
  - MoLF "FFT wins": lr_lora = 0, the worst case (every weight matrix is updated);
  - MoLF "LoRA wins": lr_fft = 0 (weight matrices are never touched, their moments advance);
  - MoLF-E "r128 wins" (the larger expert, worst case) and "r32 wins".
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings

import torch
from common import (
    base_parser,
    count_syncs,
    describe_machine,
    fmt_bytes,
    interleaved_times,
    llama,
    median,
    peak_extra_bytes,
    setup,
    table,
)

import molf
from molf.optim.backends import BACKENDS

# The baselines step plain AdamW over the experts' tensors on purpose (the same tensors MoLFAdamW
# steps): molf's warning against doing that in training says nothing here.
warnings.filterwarnings("ignore", message="AdamW is stepping", category=molf.MoLFWarning)

# Targets of issues 5 (CPU) and 14 (GPU), against fused AdamW on the same tensors.
WORST_CASE_TARGET = 1.3
LORA_WINS_TARGET = 1.0


def adamw_baselines(params: list[torch.nn.Parameter]) -> dict[str, torch.optim.Optimizer]:
    """torch AdamW over `params`: fused (where this torch supports it) and foreach."""
    out = {}
    try:
        out["torch AdamW fused"] = torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, ValueError) as e:
        print(f"  (fused AdamW unavailable: {e})")
    out["torch AdamW foreach"] = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    return out


def bench_model(
    name: str,
    config: molf.MoLFConfig,
    routings: dict[str, dict],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, float]:
    """Time every optimizer on one wrapped model; returns each MoLF routing's ratio to fused."""
    model = molf.wrap(llama("smollm2-135m", args.layers, device=device, vocab=args.vocab), config)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device=device).manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=device, dtype=p.dtype) * 1e-3
    n_params = sum(p.numel() for p in params)
    print(f"\n{name}: {len(params)} trainable tensors, {n_params / 1e6:.1f}M parameters")

    opts: dict[str, torch.optim.Optimizer] = adamw_baselines(params)
    molf_opts = {}
    for label, lrs in routings.items():
        opt = molf.MoLFAdamW(model, backend=args.backend, **lrs)
        molf_opts[label] = opt
        opts[f"MoLFAdamW, {label} ({opt.backend})"] = opt
    clock = time.process_time if args.clock == "cpu" and device.type == "cpu" else time.perf_counter
    times = interleaved_times({k: o.step for k, o in opts.items()}, args.steps, 3, device, clock)
    memory = {k: peak_extra_bytes(o.step, device) for k, o in opts.items()}
    syncs: dict[str, str] = {}
    for k, o in opts.items():
        n = count_syncs(o.step, device)
        if n is None:
            syncs[k] = "n/a (cpu)"
            continue
        syncs[k] = str(n)
        if isinstance(o, molf.MoLFAdamW):
            log, o.routing_log = o.routing_log, None
            syncs[k] = f"{n} (log off: {count_syncs(o.step, device)})"
            o.routing_log = log

    fused = median(times["torch AdamW fused"]) if "torch AdamW fused" in times else None
    foreach = median(times["torch AdamW foreach"])
    rows = []
    for k in opts:
        t = median(times[k])
        rows.append(
            [
                k,
                f"{t * 1e3:.1f}",
                f"{t / fused:.3f}" if fused else "n/a",
                f"{t / foreach:.3f}",
                fmt_bytes(memory[k]),
                syncs[k],
            ]
        )
    header = ["optimizer", "ms/step", "x fused", "x foreach", "peak extra", "syncs/step"]
    print(table(rows, header))
    ratios = {}
    for label, opt in molf_opts.items():
        wins = opt.win_counts().sum(dim=0).tolist()
        share = ", ".join(
            f"{e} {w / max(1, sum(wins)):.0%}" for e, w in zip(opt.expert_names, wins)
        )
        print(f"  routing check, {label}: {share} of module-steps")
        if fused:
            ratios[label] = median(times[f"MoLFAdamW, {label} ({opt.backend})"]) / fused
    del opts, molf_opts, model, params
    gc.collect()
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], steps=20)
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS])
    args = parser.parse_args(argv)
    device = setup(args)
    print(
        f"optimizer step: smollm2-135m architecture, {args.layers} layers, fp32; median of "
        f"{args.steps} interleaved steps ({args.clock} clock); {describe_machine(device)}"
    )

    lr = 1e-4
    molf_ratios = bench_model(
        "MoLF (LoRA rank 128, base trained)",
        molf.MoLFConfig(lora_ranks=(128,), lora_dropout=0.0),
        {
            "FFT wins everywhere": {"lr_fft": lr, "lr_lora": 0.0, "lr_other": lr},
            "LoRA wins everywhere": {"lr_fft": 0.0, "lr_lora": lr, "lr_other": lr},
        },
        args,
        device,
    )
    e_ratios = bench_model(
        "MoLF-E (LoRA ranks 32 and 128, base frozen)",
        molf.MoLFConfig(lora_ranks=(32, 128), train_base=False, lora_dropout=0.0),
        {
            "r128 wins everywhere": {"lr_lora": (0.0, lr)},
            "r32 wins everywhere": {"lr_lora": (lr, 0.0)},
        },
        args,
        device,
    )
    if molf_ratios:  # the same targets on CPU (issue 5) and on a GPU (issue 14)
        print(f"\ntargets against fused AdamW ({device.type}):")
        checks = [
            ("MoLF worst case (FFT wins)", molf_ratios["FFT wins everywhere"], WORST_CASE_TARGET),
            ("MoLF LoRA wins everywhere", molf_ratios["LoRA wins everywhere"], LORA_WINS_TARGET),
        ]
        for label, ratio, target in checks:
            verdict = "met" if ratio <= target else "MISSED"
            print(f"  {label}: {ratio:.3f}x, target <= {target}x: {verdict}")
        for label, ratio in e_ratios.items():
            print(f"  MoLF-E {label}: {ratio:.3f}x (no target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
