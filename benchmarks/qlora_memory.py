"""MoLF-E and peft LoRA on the same bitsandbytes 4-bit (NF4) frozen base: memory and step time.

    python benchmarks/qlora_memory.py [--device cpu|cuda] [--layers 30] [--batch 2] [--seq 128]
                                      [--steps 5] [--threads N] [--bits 4|8]

The base is the smollm2-135m architecture with random weights, saved once and loaded through
transformers' BitsAndBytesConfig, one copy per method (every linear of the decoder quantized; the
tied embeddings / lm_head stay in --dtype). Methods:
  lora r128    peft LoraConfig(r=128, all-linear, rsLoRA) + torch AdamW, the QLoRA baseline;
  lora r160    the same at rank 160: the FLOPs of MoLF-E's two experts (32 + 128);
  molf-e       molf.wrap(ranks 32 and 128, base frozen) + MoLFAdamW (top-k 1).
Steps are interleaved across methods and the median is reported, with the memory held between
steps (parameters, quantized or not, and optimizer state) and the peak extra memory of one step
(gradients, activations, temporaries; the allocator's peak on CUDA, the resident size on CPU).
Needs bitsandbytes (pip install 'molf[quant]'); its CPU backend runs without a GPU.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time

import torch
from common import (
    base_parser,
    describe_machine,
    fmt_bytes,
    interleaved_times,
    llama,
    median,
    peak_extra_bytes,
    setup,
    state_bytes,
    table,
)
from torch import nn

import molf

LR = 5e-5  # the paper's learning rate; the values do not change the cost
METHODS = ["lora r128", "lora r160", "molf-e"]


def load_quantized(path: str, bits: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant, device_map=str(device), dtype=dtype
    )
    # Train mode throughout: in eval mode bitsandbytes' CPU backend repacks 4-bit weights for a
    # bfloat16 inference kernel, which is not what training runs.
    return model.train()


def build(method: str, base: nn.Module, dropout: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    if method.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=int(method.split("r")[-1]),
            lora_alpha=16,
            target_modules="all-linear",
            lora_dropout=dropout,
            use_rslora=True,
        )
        model = get_peft_model(base, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=LR, weight_decay=0.01, foreach=True)
    cfg = molf.MoLFConfig(lora_ranks=(32, 128), train_base=False, lora_dropout=dropout)
    model = molf.wrap(base, cfg)
    return model, molf.MoLFAdamW(model, lr_lora=LR)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], steps=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA and MoLF dropout")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="compute dtype and dtype of the unquantized parts (default: bfloat16 on cuda, "
        "float32 on cpu)",
    )
    args = parser.parse_args(argv)
    device = setup(args)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("needs bitsandbytes: pip install 'molf[quant]'", file=sys.stderr)
        return 2
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    quant = "NF4" if args.bits == 4 else "int8"
    print(
        f"QLoRA-style train step: smollm2-135m architecture, {args.layers} layers, {quant} base, "
        f"{dtype_name} compute, batch {args.batch} x {args.seq} tokens; median of {args.steps} "
        f"interleaved steps ({args.clock} clock); {describe_machine(device)}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        llama("smollm2-135m", args.layers).save_pretrained(tmp)
        runs = {
            m: build(m, load_quantized(tmp, args.bits, dtype, device), args.lora_dropout)
            for m in METHODS
        }
    gc.collect()
    vocab = runs["molf-e"][0].config.vocab_size
    tokens = torch.randint(
        0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    ).to(device)

    def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()

    steps = {m: (lambda mo=model, op=opt: train_step(mo, op)) for m, (model, opt) in runs.items()}
    clock = time.process_time if args.clock == "cpu" and device.type == "cpu" else time.perf_counter
    times = interleaved_times(steps, args.steps, 1, device, clock)
    peaks = {m: peak_extra_bytes(fn, device) for m, fn in steps.items()}
    held = {m: state_bytes(model, opt) for m, (model, opt) in runs.items()}
    t = {m: median(times[m]) for m in METHODS}

    rows = []
    for m in METHODS:
        model, _ = runs[m]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = held[m] + peaks[m] if peaks[m] is not None else None
        rows.append(
            [
                m,
                f"{trainable / 1e6:.1f}M",
                f"{t[m] * 1e3:.0f}",
                fmt_bytes(held[m]),
                fmt_bytes(peaks[m]),
                fmt_bytes(total),
            ]
        )
    print(table(rows, ["method", "trainable", "ms/step", "params+state", "peak extra", "peak"]))
    wrapped = molf.molf_modules(runs["molf-e"][0])
    kinds = sorted({type(m.base_layer).__name__ for m in wrapped.values()})
    print(f"\nmolf-e wrapped {len(wrapped)} layers of type {', '.join(kinds)}")
    print(f"molf-e optimizer backend: {runs['molf-e'][1].backend}")
    print("ratios (molf-e / lora):")
    for ref in ("lora r128", "lora r160"):
        parts = [
            f"time {t['molf-e'] / t[ref]:.3f}",
            f"params+state {held['molf-e'] / held[ref]:.3f}",
        ]
        if peaks["molf-e"] is not None and peaks[ref]:
            parts.append(f"peak extra {peaks['molf-e'] / peaks[ref]:.3f}")
            parts.append(
                f"peak {(held['molf-e'] + peaks['molf-e']) / (held[ref] + peaks[ref]):.3f}"
            )
        print(f"  vs {ref}: " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
