"""What the EPD score compares at the first step, predicted from the gradient (`molf.forecast`
holds the formula and its derivation; docs/method.md section 8 gives it in full) and checked
against the routing the sweep measured. `predicted_ratios` evaluates it from one forward and
backward pass of the untrained model on the run's first batch, for any (alpha, lr ratio).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from molf.config import lora_scale
from molf.experiments.grid import Cell
from molf.experiments.routing_stats import TYPE_ORDER, first_step_ratios, median
from molf.forecast import GAUSS, gradient_kappa, lora_over_fft, pfn_lora_over_fft
from molf.layer import _is_target
from molf.routing import RoutingLog, module_type

__all__ = ["GAUSS", "derivation_check", "module_kappas", "predict_routing", "predicted_ratios"]


def module_kappas(cfg: Any) -> dict[str, tuple[float, int, int]]:
    """{module name: (kappa, in_features, out_features)} of every linear layer MoLF would wrap,
    from the first optimizer step's gradient of the untrained model on the run's first batch."""
    import molf
    from molf.train.data import StepOrder, collate, tokenize_examples
    from molf.train.models import load_model
    from molf.train.prepare import task_and_splits

    _, splits = task_and_splits(cfg)
    model, tokenizer = load_model(cfg.model)
    data = tokenize_examples(splits.train, tokenizer, cfg.max_length, cfg.too_long)
    order = StepOrder(len(data), cfg.batch_size, cfg.grad_accum, cfg.seed)
    # the linear layers MoLF wraps under the run's target_modules
    config = molf.MoLFConfig(lora_ranks=(8,), target_modules=cfg.target_modules)
    targets = {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and _is_target(n, config)
    }
    model.train()
    for micro in order.micro_batches(0):
        batch = collate(
            [data.input_ids[i] for i in micro],
            [data.labels[i] for i in micro],
            tokenizer.pad_token_id,
        )
        model(**batch).loss.backward()
    out = {}
    for name, module in model.named_modules():
        if name in targets and module.weight.grad is not None:
            g = module.weight.grad
            out[name] = (gradient_kappa(g), g.shape[1], g.shape[0])
    return out


def kappa_medians(kappas: dict[str, tuple[float, int, int]]) -> dict[str, float]:
    """{module type: median kappa over its modules} (types without a finite kappa left out)."""
    by_type: dict[str, list[float]] = {}
    for name, (k, _, _) in kappas.items():
        by_type.setdefault(module_type(name), []).append(k)
    medians = {t: median(v) for t, v in by_type.items()}
    return {t: m for t, m in medians.items() if m is not None}


def predicted_ratios(
    kappas: dict[str, tuple[float, int, int]], scale: float, lr_ratio: float, score: str = "epd"
) -> dict[str, float]:
    """The predicted step-1 ratio LoRA / FFT of `score` (EPD or PFN) per module (`molf.forecast`)."""
    if score == "pfn":
        return {name: pfn_lora_over_fft(n_in, n_out) for name, (_, n_in, n_out) in kappas.items()}
    return {
        name: lora_over_fft(kappa, n_in, n_out, scale, lr_ratio)
        for name, (kappa, n_in, n_out) in kappas.items()
    }


def derivation_check(cells: list[Cell], out: Path) -> list[str]:
    """Markdown lines: per task, the predicted against the measured step-1 ratio per module type
    and the predicted against the measured FFT share at step 1, for the MoLF `cells` of the
    first seed (written to `out/first_step.md` too)."""
    lines = [
        "Predicted: the formula of docs/method.md section 8 with kappa measured on the untrained "
        "model's first batch; measured: the step-1 scores in the cell's routing log. Ratio = "
        "score(LoRA) / score(FFT) (EPD, or PFN for the PFN variants: sqrt(out / (in + out))), "
        "median over the modules of each type; share = modules routed to FFT at step 1.",
        "",
    ]
    found = False
    for task in dict.fromkeys(c.task for c in cells):
        molf_cells = [
            c
            for c in cells
            if c.task == task
            and c.config.seed == cells[0].config.seed
            and (c.directory / "routing.jsonl").exists()
        ]
        if not molf_cells:
            continue
        found = True
        kappas = module_kappas(molf_cells[0].config)
        header = ["score", "alpha", "lr ratio", "share pred.", "share meas."]
        header += [f"{t} pred./meas." for t in TYPE_ORDER]
        lines += [f"### {task}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + " --- |" * len(header))
        ratios_all: list[float] = []
        for cell in molf_cells:
            cfg = cell.config
            scale = lora_scale(cfg.lora_alpha, cfg.lora_rank, cfg.use_rslora)
            pred = predicted_ratios(kappas, scale, cfg.lr_lora / cfg.lr_fft, cfg.score)
            measured = first_step_ratios(RoutingLog.read_jsonl(cell.directory / "routing.jsonl"))
            common = [n for n in measured if n in pred]
            ratios_all += [measured[n] / pred[n] for n in common if pred[n] > 0]
            share_pred = sum(pred[n] <= 1 for n in common) / len(common)
            share_meas = sum(measured[n] <= 1 for n in common) / len(common)
            row = [cfg.score.upper(), f"{cfg.lora_alpha:g}", f"{cfg.lr_lora / cfg.lr_fft:g}"]
            row += [f"{100 * share_pred:.0f}%", f"{100 * share_meas:.0f}%"]
            for t in TYPE_ORDER:
                names = [n for n in common if module_type(n) == t]
                p = median([pred[n] for n in names])
                m = median([measured[n] for n in names])
                row.append("-" if p is None or m is None else f"{p:.2f} / {m:.2f}")
            lines.append("| " + " | ".join(row) + " |")
        spread = sorted(ratios_all)
        if spread:
            q = [spread[int(f * (len(spread) - 1))] for f in (0.1, 0.5, 0.9)]
            lines += [
                "",
                f"Measured / predicted over every module of these cells: median {q[1]:.2f}, "
                f"10th-90th percentile {q[0]:.2f}-{q[2]:.2f} ({len(spread)} module-cells).",
            ]
        kap = kappa_medians(kappas)
        lines += [
            "",
            "kappa per module type (median): "
            + ", ".join(f"{t} {kap[t]:.2f}" for t in TYPE_ORDER if t in kap),
            "",
        ]
    if not found:
        return []
    write = out / "first_step.md"
    write.write_text("\n".join(lines) + "\n")
    return lines


def predict_routing(cells: list[Cell], out: Path) -> list[str]:
    """Markdown lines (also written to `out/predict.md`): for each task of the MoLF `cells`, kappa
    per module type and the predicted step-1 FFT share at each (alpha, lr ratio) of the cells,
    without training. Since the step-1 routing holds for the rest of a run (docs/method.md
    section 8), this says before any training where MoLF's updates will go."""
    points: dict[tuple[str, float, float], None] = {}
    by_task: dict[str, Cell] = {}
    for c in cells:
        points[(c.config.score, c.config.lora_alpha, c.config.lr_lora / c.config.lr_fft)] = None
        by_task.setdefault(c.task, c)
    grid = sorted(points)
    header = ["task", *[f"{t} kappa" for t in TYPE_ORDER]]
    header += [("" if s == "epd" else f"{s} ") + f"a{a:g} r{r:g}" for s, a, r in grid]
    lines = [
        "Predicted share of modules routed to the FFT expert at step 1 (docs/method.md section "
        "8), per lora_alpha (a) and lr_lora / lr_fft (r), from kappa measured on the untrained "
        "model's first training batch of each task; kappa: median over the modules of each type.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    from tqdm.auto import tqdm

    bar = tqdm(by_task.items(), desc="predict", unit="task", file=sys.stderr, dynamic_ncols=True)
    for task, cell in bar:
        bar.set_postfix_str(task)
        cfg = cell.config
        kappas = module_kappas(cfg)
        kap = kappa_medians(kappas)
        row = [task] + [f"{kap[t]:.2f}" if t in kap else "-" for t in TYPE_ORDER]
        for score, alpha, ratio in grid:
            scale = lora_scale(alpha, cfg.lora_rank, cfg.use_rslora)
            pred = predicted_ratios(kappas, scale, ratio, score)
            share = sum(v <= 1 for v in pred.values()) / max(len(pred), 1)
            row.append(f"{100 * share:.0f}%")
        lines.append("| " + " | ".join(row) + " |")
    (out / "predict.md").write_text("\n".join(lines) + "\n")
    return lines
