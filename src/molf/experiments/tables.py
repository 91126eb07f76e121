"""The comparison's tables: results.md/csv (methods x tasks), cells.csv (every candidate),
items.csv (every chosen cell's per-item test scores, per seed) and the claims section of
report.md, formatted from `molf.experiments.claims`."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from molf.experiments.claims import (
    CLAIM_TOLERANCE_POINTS,
    LEARNED_POINTS,
    PAPER_CLAIM2_POINTS,
    Claims,
    Difference,
    cell_items,
)
from molf.experiments.grid import Results
from molf.train import methods as registry


# -- formatting ------------------------------------------------------------------------------------
def pts(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def shown(value: float | None, loss_like: bool) -> str:
    """A headline value as reports show it: points with one decimal, a loss-like metric (lower
    is better, not a fraction) with three."""
    if loss_like:
        return num(value, ".3f")
    return pts(value)


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def num(value: Any, fmt: str = ".1f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# -- tables ----------------------------------------------------------------------------------------
def results_table(res: Results) -> tuple[list[str], list[list[str]]]:
    """Markdown header and rows: methods x tasks (test headline, points), mean, chosen LRs."""
    header = ["method"]
    header += [
        f"{t} ({res.headline(t)}{', lower is better' if res.lower_is_better(t) else ''})"
        for t in res.tasks
    ]
    header += ["mean"]
    header += [f"LR {t}" for t in res.tasks]
    rows = []
    if any(res.base(t) is not None for t in res.tasks):
        values = [res.base(t) for t in res.tasks]
        mean = res.average(values)
        rows.append(
            ["base model (no training)"]
            + [shown(v, res.lower_is_better(t)) for t, v in zip(res.tasks, values)]
            + [pts(mean)]
            + ["-" for _ in res.tasks]
        )
    for m in res.methods:
        row = [registry.label(m)]
        row += [shown(res.score(t, m), res.lower_is_better(t)) for t in res.tasks]
        row += [pts(res.mean(m))]
        for t in res.tasks:
            group, cell = res.groups[(t, m)], res.chosen[(t, m)]
            if cell is not None:
                n_done = sum(c.status == "done" for c in group)
                n_seeds = res.n_seeds(t, m)
                row.append(
                    cell.lr_text
                    + (f" (of {n_done})" if n_done > 1 else "")
                    + (f", {n_seeds} seeds" if n_seeds > 1 else "")
                )
            elif any(c.status == "failed" for c in group):
                row.append("failed")
            else:
                row.append("missing")
        rows.append(row)
    return header, rows


def write_results(res: Results, out: Path) -> dict[str, Path]:
    """results.csv (wide: methods x tasks), results.md, cells.csv (every candidate and seed)
    and items.csv (the chosen cells' per-item test scores)."""
    paths = {"results_csv": out / "results.csv", "results_md": out / "results.md"}
    with paths["results_csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", *res.tasks, "mean", *[f"lr_{t}" for t in res.tasks]])
        if any(res.base(t) is not None for t in res.tasks):
            base = [res.base(t) for t in res.tasks]
            w.writerow(
                [
                    "base",
                    *[csv_num(v) for v in base],
                    csv_num(res.average(base)),
                    *["" for _ in base],
                ]
            )
        for m in res.methods:
            lrs = []
            for t in res.tasks:
                cell = res.chosen[(t, m)]
                lrs.append(";".join(f"{k}={v:g}" for k, v in cell.lrs.items()) if cell else "")
            w.writerow(
                [m, *[csv_num(res.score(t, m)) for t in res.tasks], csv_num(res.mean(m)), *lrs]
            )
    header, rows = results_table(res)
    lines = [
        "# Results",
        "",
        "Test-split headline metric per task, in points (percent), the mean over the chosen "
        "learning rate's seeds; the learning rate of every cell was picked on the validation "
        "split of the grid's seed.",
        "",
        *md_table(header, rows),
        "",
    ]
    paths["results_md"].write_text("\n".join(lines))
    paths["cells_csv"] = out / "cells.csv"
    with paths["cells_csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "task",
                "method",
                "candidate",
                "seed",
                "lrs",
                "status",
                "chosen",
                "headline_metric",
                "validation",
                "test",
                "steps",
                "final_loss",
                "tokens_per_s",
                "peak_memory_mb",
                "wall_seconds",
                "cpu_seconds",
                "error",
            ]
        )
        for (t, m), group in res.groups.items():
            seeded = [c for c in res.seeded if (c.task, c.method) == (t, m)]
            for c in group + seeded:
                s = c.summary or {}
                w.writerow(
                    [
                        t,
                        m,
                        c.label,
                        "" if c.seed is None else c.seed,
                        ";".join(f"{k}={v:g}" for k, v in c.lrs.items()),
                        c.status,
                        int(c in res.replicas[(t, m)]),
                        c.headline or "",
                        csv_num(c.shown("validation")),
                        csv_num(c.shown("after")),
                        s.get("steps", ""),
                        csv_num(s.get("final_loss")),
                        csv_num(s.get("tokens_per_s")),
                        csv_num(s.get("peak_memory_mb")),
                        csv_num(s.get("wall_seconds")),
                        csv_num(c.cpu_seconds),
                        c.error or "",
                    ]
                )
    paths["items_csv"] = out / "items.csv"
    with paths["items_csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "method", "seed", "item", "score"])
        for (t, m), cells in res.replicas.items():
            for c in cells:
                for item, score in sorted((cell_items(c) or {}).items()):
                    w.writerow([t, m, "" if c.seed is None else c.seed, item, f"{score / 100:g}"])
    return paths


def csv_num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else ""


# -- the claims section ----------------------------------------------------------------------------
def _interval_cells(d: Difference) -> list[str]:
    """The difference, its 95% interval, half-width and seed count, as table cells."""
    pd = d.paired
    if pd is None:
        return [pts(d.value, sign=True), "n/a", "n/a", "n/a"]
    return [
        f"{pd.mean:+.1f}",
        f"[{pd.low:+.1f}, {pd.high:+.1f}]",
        f"{pd.half_width:.1f}",
        str(pd.seeds),
    ]


_INTERVAL_HEADER = ["difference (points)", "95% interval", "half-width", "seeds"]


def floor_lines(res: Results, c: Claims) -> list[str]:
    """Each task's floor, its best method and whether it learned at this budget."""
    rows = []
    for t in res.tasks:
        f = c.floors[t]
        rows.append(
            [
                t,
                f"{f.kind} {pts(f.value)}",
                registry.label(f.best_method) if f.best_method else "n/a",
                pts(f.best),
                pts(None if f.best is None or f.value is None else f.best - f.value, sign=True),
                "yes" if f.learned else "**no**",
            ]
        )
    header = ["task", "floor (points)", "best method", "best", "best - floor", "learned"]
    lines = [
        "### Did each task learn?",
        "",
        f"A task counts as learned when its best method scores at least {LEARNED_POINTS:g} "
        "points above its floor: the chance level of a multiple-choice task, else the untrained "
        "model's score. The claims below are judged on the learned tasks only: where nothing "
        "left the floor, every method ties at it and a tie says nothing about the methods.",
        "",
        *md_table(header, rows),
        "",
    ]
    skipped = [t for t in res.point_tasks() if t not in c.judged]
    if skipped:
        lines += [f"Not judged (did not learn at this budget): {', '.join(skipped)}.", ""]
    return lines


def winner_lines(res: Results, c: Claims) -> list[str]:
    """FFT against LoRA per learned task: the paper's premise that the winner flips."""
    rows = [
        [t, pts(d.score_a), pts(d.score_b), *_interval_cells(d), c.winners[t]]
        for t, d in c.fft_vs_lora.items()
    ]
    header = ["task", "FFT", "LoRA", *_INTERVAL_HEADER, "winner"]
    found = sorted(set(c.winners.values()))
    return [
        "### FFT against LoRA",
        "",
        "FFT - LoRA per task. Winner: FFT or LoRA where the whole interval lies on its side of "
        f"0; 'LoRA matches' where LoRA is at most {CLAIM_TOLERANCE_POINTS} points behind over the "
        "whole interval; else not resolved.",
        "",
        *md_table(header, rows),
        "",
        "Winners on this grid: " + (", ".join(found) if found else "none judged") + ".",
        "",
    ]


def _verdict_line(claim: str, verdict: dict[str, Any], diffs: dict[str, Difference]) -> str:
    detail = []
    if verdict["failed"]:
        detail.append(
            "failed on " + ", ".join(f"{t} ({diffs[t].value:+.1f})" for t in verdict["failed"])
        )
    if verdict["unresolved"]:
        detail.append("the 95% interval crosses the line on " + ", ".join(verdict["unresolved"]))
    if verdict["missing"]:
        detail.append("missing cells on " + ", ".join(verdict["missing"]))
    if verdict.get("weak_baseline"):
        detail.append(
            "AdaLoRA trails plain LoRA by more than the margin on "
            + ", ".join(verdict["weak_baseline"])
            + ", so a lead over it is not evidence there"
        )
    tail = f" ({'; '.join(detail)})" if detail else ""
    return f"**{claim}: {verdict['verdict']}**{tail}."


def claim_lines(res: Results, c: Claims) -> list[str]:
    """The claims section of report.md: floors, FFT against LoRA, claim 1, claim 2 (with the
    paper's magnitudes and the AdaLoRA check) and the same-size comparison."""
    lines = ["## Paper claims", ""]
    lines += [
        "Every difference below is paired: the methods answered the same test items with the "
        "same training seeds, and the 95% interval is a percentile bootstrap that resamples "
        "seeds and items together (10,000 resamples, seed 0), so it covers training noise as "
        "well as the test sample. Half-width: half the interval's width. With few seeds the "
        "interval errs wide (the spread of the seed means already carries item noise).",
        "",
    ]
    lines += floor_lines(res, c)
    if not c.judged:
        return lines + ["No task learned at this budget: neither claim is judged.", ""]
    lines += winner_lines(res, c)
    rows = []
    for t, d in c.molf_gap.items():
        rows.append([t, pts(d.score_a), f"{registry.label(d.b)} {pts(d.score_b)}"])
        rows[-1] += _interval_cells(d)
    lines += [
        f"### Claim 1: MoLF within {CLAIM_TOLERANCE_POINTS} points of the better of FFT and LoRA",
        "",
        *md_table(["task", "MoLF", "better baseline", *_INTERVAL_HEADER], rows),
        "",
        "Held on a task when the whole interval of MoLF - better baseline lies above "
        f"-{CLAIM_TOLERANCE_POINTS}; failed when it lies at or below.",
        "",
        _verdict_line("Claim 1", c.claim1, c.molf_gap),
        "",
    ]
    rows = []
    for t, d in c.efficient_vs_adaptive.items():
        paper = PAPER_CLAIM2_POINTS.get(res.family(t))
        rows.append([t, pts(d.score_a), pts(d.score_b), *_interval_cells(d)])
        rows[-1] += [pts(paper, sign=True), c.magnitudes[t]]
    lines += [
        "### Claim 2: MoLF-E ahead of AdaLoRA",
        "",
        *md_table(
            ["task", "MoLF-E", "AdaLoRA", *_INTERVAL_HEADER, "paper's lead", "against it"], rows
        ),
        "",
        "Held on a task when the whole interval of MoLF-E - AdaLoRA lies above 0. The paper "
        "reports leads of up to +20 points on Fact and +9 on Med and SQL: 'against it' says "
        "whether this grid's interval lies below that lead, contains it, or lies above it.",
        "",
    ]
    rows = [
        [t, pts(d.score_a), pts(d.score_b), *_interval_cells(d)]
        for t, d in c.adaptive_vs_lora.items()
    ]
    lines += [
        "Is AdaLoRA a fair baseline? It should train about as well as plain LoRA; where its "
        f"score trails LoRA's by more than {CLAIM_TOLERANCE_POINTS} points a lead over it says "
        "little about adaptive LoRA, and claim 2 is not judged there.",
        "",
        *md_table(["task", "AdaLoRA", "LoRA", *_INTERVAL_HEADER], rows),
        "",
        _verdict_line("Claim 2", c.claim2, c.efficient_vs_adaptive),
        "",
    ]
    if c.same_size:
        rows = [
            [d.task, registry.label(d.a), pts(d.score_a), pts(d.score_b)] + _interval_cells(d)
            for d in c.same_size
        ]
        lines += [
            "### What MoLF-E's routing adds over a LoRA of its size",
            "",
            "MoLF-E trains two LoRA experts and routes between them; a plain LoRA of rank "
            "r1 + r2 has the same trainable parameters and updates all of them every step. "
            "No verdict: a side comparison.",
            "",
            *md_table(["task", "method", "score", "same-size LoRA", *_INTERVAL_HEADER], rows),
            "",
        ]
    return lines
