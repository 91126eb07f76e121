"""`molf planted`: make a planted teacher-student dataset (`molf.tasks.planted` describes the
task), and score a run's routing against the folder's ground truth.

The teacher is the base model with a change added to the weight W of every linear layer inside
the decoder layers: per module type, a full-rank change (Gaussian entries), a rank-`rank` change
(a product of two Gaussian factors), or none. Both kinds have the same size, `strength` times
W's Frobenius norm, so they differ only in rank. The prompts are ICD-10-CM code descriptions
(the `simple-icd-10-cm` package); the teacher continues each one with `length` tokens, greedily,
or sampled at `temperature` for the training examples (noisy labels). Held-out records keep the
token ids and the teacher's most likely next token at every continuation position.

`routing_accuracy` reads a MoLF run's routing log: the share of full-rank modules' updates that
went to the FFT expert and of low-rank modules' updates that went to a LoRA expert.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from molf._files import atomic_directory, check_directory_path
from molf.errors import MolfError
from molf.routing import RoutingLog, layer_index, module_type
from molf.tasks.planted import MARKER, read_planted

__all__ = ["CHANGES", "make_planted", "plant", "routing_accuracy", "run_planted"]

TYPES = ("q", "k", "v", "o", "gate", "up", "down")
# the named changes: which module types get a full-rank and which a low-rank change; `mixed`
# puts the full-rank change where MoLF's reference setting routes to LoRA, and the other way
CHANGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "full": (TYPES, ()),
    "low": ((), TYPES),
    "mixed": (("q", "gate", "up"), ("k", "v", "o", "down")),
}


def _targets(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers inside the decoder layers (what MoLF's all-linear wraps), by name."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and layer_index(n) is not None
    }


def plant(
    model: torch.nn.Module,
    full: tuple[str, ...],
    low: tuple[str, ...],
    rank: int,
    strength: float,
    seed: int,
) -> dict[str, str]:
    """Add the planted change to `model` in place; returns {module name: "full"|"low"|"none"}.

    Each change has Frobenius norm `strength` x ||W||: a full-rank one is Gaussian, a low-rank
    one U V^T with Gaussian U [out, rank] and V [in, rank]."""
    gen = torch.Generator().manual_seed(seed)
    kinds = {}
    with torch.no_grad():
        for name, module in _targets(model).items():
            t = module_type(name)
            kind = "full" if t in full else "low" if t in low else "none"
            kinds[name] = kind
            if kind == "none":
                continue
            w = module.weight
            out_f, in_f = w.shape
            if kind == "full":
                delta = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
            else:
                u = torch.randn(out_f, rank, generator=gen, dtype=torch.float64)
                v = torch.randn(in_f, rank, generator=gen, dtype=torch.float64)
                delta = u @ v.T
            delta *= strength * w.double().norm() / delta.norm()
            w.add_(delta.to(w.dtype))
    return kinds


def _prompts(n: int, seed: int) -> list[str]:
    """`n` distinct ICD-10-CM code descriptions, shuffled by `seed`."""
    try:
        import simple_icd_10_cm as icd
    except ModuleNotFoundError:
        raise MolfError(
            "molf planted needs simple-icd-10-cm (pip install simple-icd-10-cm)"
        ) from None
    texts = sorted({icd.get_description(c) for c in icd.get_all_codes()})
    random.Random(seed).shuffle(texts)
    if len(texts) < n:
        raise MolfError(f"molf planted: {n} prompts asked, {len(texts)} available")
    return texts[:n]


@torch.no_grad()
def _continue(
    model: Any, tokenizer: Any, rows: list[list[int]], length: int, temperature: float, seed: int
) -> list[list[int]]:
    """`length` new tokens after each row, greedy (temperature 0) or sampled."""
    from molf.tasks.common import batch_starts, left_padded

    torch.manual_seed(seed)
    out: list[list[int]] = []
    for i in batch_starts(len(rows), 32):
        batch = left_padded(rows[i : i + 32], tokenizer.pad_token_id)
        sample = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {}
        gen = model.generate(
            **batch,
            max_new_tokens=length,
            min_new_tokens=length,
            do_sample=bool(temperature),
            pad_token_id=tokenizer.pad_token_id,
            **sample,
        )
        out += gen[:, batch["input_ids"].shape[1] :].tolist()
    return out


@torch.no_grad()
def _teacher_choices(model: Any, tokenizer: Any, records: list[dict[str, Any]]) -> None:
    """Fill each record's `target`: the model's most likely token at every continuation position."""
    from molf.tasks.common import batch_starts, padded_batch

    for i in batch_starts(len(records), 32):
        part = records[i : i + 32]
        batch = padded_batch(
            [r["ids"] for r in part], [r["ids"] for r in part], tokenizer.pad_token_id
        )
        guess = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        guess = guess.argmax(dim=-1)
        for row, r in enumerate(part):
            n = r["n_prompt"]
            r["target"] = guess[row, n - 1 : len(r["ids"]) - 1].tolist()


def make_planted(
    model_name: str,
    output_dir: str | Path,
    change: str = "full",
    rank: int = 4,
    strength: float = 0.3,
    n_train: int = 256,
    n_val: int = 32,
    n_test: int = 128,
    length: int = 24,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Make the teacher and write the dataset folder (atomically); returns planted.json's content.

    The folder's floor (the base model's agreement on its validation records) is measured and
    recorded, so a change too weak to leave room for learning shows before any training."""
    from molf.tasks.planted import PlantedTask
    from molf.train.models import load_model

    if change not in CHANGES:
        raise MolfError(f"--change: one of {', '.join(CHANGES)}, got {change!r}")
    for name, value in (("--n-train", n_train), ("--n-val", n_val), ("--n-test", n_test)):
        if value < 1:
            raise MolfError(f"{name}: must be >= 1, got {value}")
    if rank < 1 or length < 1 or not strength > 0 or temperature < 0:
        raise MolfError(
            "molf planted: --rank and --length >= 1, --strength > 0, --temperature >= 0"
        )
    out = Path(output_dir).expanduser()
    check_directory_path(out, "--output-dir")
    if out.exists() and any(out.iterdir()):
        raise MolfError(f"--output-dir {out}: exists and is not empty; give a new folder")
    started = time.perf_counter()
    model, tokenizer = load_model(model_name)
    base = copy.deepcopy(model)  # the untrained student, for the floor
    full, low = CHANGES[change]
    kinds = plant(model, full, low, rank, strength, seed)
    model.eval()
    texts = _prompts(n_train + n_val + n_test, seed)
    rows = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    greedy_from = n_train if temperature else 0
    cont = _continue(model, tokenizer, rows[:greedy_from], length, temperature, seed)
    cont += _continue(model, tokenizer, rows[greedy_from:], length, 0.0, seed)
    train = [
        {"prompt": texts[i], "completion": tokenizer.decode(cont[i], skip_special_tokens=True)}
        for i in range(n_train)
    ]
    held = [
        {
            "ids": rows[i] + cont[i],
            "n_prompt": len(rows[i]),
            "prompt": texts[i],
            "completion": tokenizer.decode(cont[i], skip_special_tokens=True),
        }
        for i in range(n_train, len(texts))
    ]
    _teacher_choices(model, tokenizer, held)
    val, test = held[:n_val], held[n_val:]
    floor = PlantedTask().evaluate(base, tokenizer, val, 32)["agreement"]
    spec = {
        "model": model_name,
        "change": change,
        "full_types": list(full),
        "low_types": list(low),
        "rank": rank,
        "strength": strength,
        "length": length,
        "temperature": temperature,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "floor_validation": floor,
        "seconds": round(time.perf_counter() - started, 1),
        "modules": kinds,
    }

    def fill(tmp: Path) -> None:
        for split, records in (("train", train), ("validation", val), ("test", test)):
            with open(tmp / f"{split}.jsonl", "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        (tmp / MARKER).write_text(json.dumps(spec, indent=1) + "\n")

    atomic_directory(out, fill)
    return spec


def routing_accuracy(log: RoutingLog, modules: dict[str, str]) -> dict[str, float | None]:
    """Routing against a planted ground truth, over every active module-step of `log`:
    `full_to_fft` (share of full-rank modules' updates that went to expert 0, the FFT expert),
    `low_to_lora` (share of low-rank modules' updates that went to another expert) and
    `accuracy` (both together). None where the log has no such module, and all None for a log
    without an FFT expert (LoRA alone, MoLF-E), where the question does not arise."""
    none: dict[str, float | None] = {"full_to_fft": None, "low_to_lora": None, "accuracy": None}
    if "fft" not in log.expert_names:
        return none
    fft = log.expert_names.index("fft")
    counts = {"full": [0, 0], "low": [0, 0]}
    kind_of = [modules.get(n, "none") for n in log.module_names]
    for r in log.records:
        act, win = r["active"], r["winners"]
        for i, kind in enumerate(kind_of):
            if kind in counts and bool(act[i]):
                right = bool(win[i, fft]) if kind == "full" else not bool(win[i, fft])
                counts[kind][0] += int(right)
                counts[kind][1] += 1
    full, low = counts["full"], counts["low"]
    both = full[0] + low[0], full[1] + low[1]
    return {
        "full_to_fft": full[0] / full[1] if full[1] else None,
        "low_to_lora": low[0] / low[1] if low[1] else None,
        "accuracy": both[0] / both[1] if both[1] else None,
    }


def run_planted(args: argparse.Namespace) -> int:
    """`molf planted`: make the folder and say what it holds."""
    spec = make_planted(
        args.model,
        args.output_dir,
        args.change,
        args.rank,
        args.strength,
        args.n_train,
        args.n_val,
        args.n_test,
        args.length,
        args.temperature,
        args.seed,
    )
    kinds = list(spec["modules"].values())
    print(
        f"planted: {args.output_dir}: teacher = {spec['model']} + {args.change} change "
        f"({kinds.count('full')} full-rank, {kinds.count('low')} rank-{spec['rank']} modules, "
        f"strength {spec['strength']:g}); {spec['n_train']} training, {spec['n_val']} "
        f"validation, {spec['n_test']} test prompts; the base model agrees with the teacher on "
        f"{100 * spec['floor_validation']:.1f}% of validation positions (the floor); "
        f"{spec['seconds']:.0f} s",
        file=sys.stdout,
    )
    return 0


def read_truth(data: str | Path) -> dict[str, str]:
    """{module name: change kind} of a planted folder."""
    return dict(read_planted(data)["modules"])
