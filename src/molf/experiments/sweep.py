"""`molf routing-sweep`: what decides MoLF's routing (issue #20).

The EPD score compares, per module, an expert's learning rate times its per-element preconditioned
descent (docs/method.md section 3). Both factors depend on how the LoRA expert is parameterised:
its scale s = alpha / sqrt(r) multiplies its gradient, and the learning-rate ratio multiplies its
score. The sweep trains the same cell of a comparison budget while moving only those settings,
and measures what the routing did and what the task score became:

  - MoLF at every `--alphas` x `--lr-ratios` (lr_lora = ratio x lr_fft), `--seeds` seeds each;
  - MoLF-E at the reference's equal alpha (scales 2:1 for ranks 32 and 128) and with both experts
    at the same scale (alphas proportional to sqrt(r));
  - FFT and LoRA at their comparison learning rates, the same seeds, as the reference lines MoLF
    should track.

Each cell is an ordinary `molf train` run directory under `<out>/cells/<task>/<variant>/`, run and
resumed like `molf compare`'s (finished cells are skipped). `sweep.csv` and `sweep.md` tabulate
every cell and the mean over seeds; the PNGs plot the FFT share and the score against alpha,
the share per module type, and the first-step check of docs/method.md's derivation
(`molf.experiments.first_step`).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molf._files import check_directory_path, write_json_atomic
from molf.config import DEFAULT_LORA_ALPHA
from molf.errors import MolfError
from molf.experiments import runner
from molf.experiments.grid import (
    BUDGETS,
    Cell,
    format_lr,
    is_done,
    read_cell,
    read_json,
    task_spec,
)
from molf.experiments.routing_stats import TYPE_ORDER, read_routing_log, routing_figures
from molf.train import methods
from molf.train.config import load_config

__all__ = ["SweepPoint", "plan_sweep", "run_sweep", "sweep_rows", "write_sweep_report"]

DEFAULT_ALPHAS = (8.0, 16.0, 32.0, 64.0)
DEFAULT_RATIOS = (1.0, 5.0)
# the learning rates of the `small` comparison: FFT's and MoLF's choice, LoRA's and MoLF-E's
LR_FFT = 1e-4
LR_LORA = 5e-4


@dataclass(frozen=True)
class SweepPoint:
    """One setting of the sweep (a variant), before seeds: method and the values it changes."""

    variant: str
    method: str
    values: dict[str, Any]
    alpha: float | None = None
    ratio: float | None = None
    score: str | None = None


def _num(value: float) -> str:
    return f"{value:g}"


def sweep_points(
    alphas: tuple[float, ...],
    ratios: tuple[float, ...],
    lr_fft: float = LR_FFT,
    lr_lora: float = LR_LORA,
    ranks: tuple[int, int] = (32, 128),
    scores: tuple[str, ...] = ("epd",),
) -> list[SweepPoint]:
    """The variants: FFT and LoRA references, MoLF per (routing score, alpha, ratio), MoLF-E
    (`ranks`) at equal alpha and at equal scale (the lower rank's scale at the default alpha a:
    alpha_i = a sqrt(r_i / r_1)). EPD variants are `molf-a<alpha>-r<ratio>`, others
    `molf-<score>-a<alpha>-r<ratio>`."""
    points = [
        SweepPoint("fft", "fft", {"lr_fft": lr_fft}),
        SweepPoint("lora", "lora", {"lr_lora": lr_lora}),
    ]
    for score in scores:
        prefix = "molf" if score == "epd" else f"molf-{score}"
        for ratio in ratios:
            for alpha in alphas:
                values: dict[str, Any] = {
                    "lora_alpha": alpha,
                    "lr_fft": lr_fft,
                    "lr_lora": lr_fft * ratio,
                }
                if score != "epd":
                    values["score"] = score
                points.append(
                    SweepPoint(
                        f"{prefix}-a{_num(alpha)}-r{_num(ratio)}",
                        "molf",
                        values,
                        alpha,
                        ratio,
                        score,
                    )
                )
    equal_scale = [DEFAULT_LORA_ALPHA * math.sqrt(r / ranks[0]) for r in ranks]
    points.append(
        SweepPoint(
            "molf-e-equal-alpha",
            "molf-e",
            {"lora_alpha": DEFAULT_LORA_ALPHA, "lr_lora": lr_lora},
            DEFAULT_LORA_ALPHA,
        )
    )
    points.append(
        SweepPoint(
            "molf-e-equal-scale",
            "molf-e",
            {"molf_e_alphas": equal_scale, "lr_lora": lr_lora},
        )
    )
    return points


def plan_sweep(
    tasks: list[str],
    out: Path,
    alphas: tuple[float, ...] = DEFAULT_ALPHAS,
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
    seeds: tuple[int, ...] = (0, 1),
    budget: str = "small",
    model: str | None = None,
    overrides: list[str] | None = None,
    scores: tuple[str, ...] = ("epd",),
) -> list[Cell]:
    """Every cell of the sweep: task-major, then seed, then variant (so each seed's picture
    completes early). The splits come from seed 0 for every seed (`data_seed`): seeds vary the
    training (adapter init, dropout, batch order), and every cell answers the same test items."""
    from molf.tasks import get_task

    if budget not in BUDGETS:
        raise MolfError(f"--budget: must be one of {', '.join(BUDGETS)}, got {budget!r}")
    b = BUDGETS[budget]
    cells = []
    # a key=value override is the user's choice: it wins over the budget's settings
    user_keys = {o.split("=", 1)[0].strip() for o in overrides or [] if "=" in o}
    ranks = tuple(b.settings.get("molf_e_ranks", (32, 128)))
    for entry in tasks:
        # a task name, or a data file or directory (the sft task on it, labelled by its stem)
        task, name, data = task_spec(entry)
        family = get_task(name).name
        for seed in seeds:
            for point in sweep_points(alphas, ratios, ranks=ranks, scores=scores):
                values = {**b.settings, **b.per_task.get(family, {}), **point.values}
                values.update(eval_before=False, progress=False)
                values = {k: v for k, v in values.items() if k not in user_keys}
                nulls = [f"{k}=null" for k, v in values.items() if v is None]
                explicit = {k: v for k, v in values.items() if v is not None}
                directory = out / "cells" / task / point.variant / f"seed-{seed}"
                if data is not None:
                    explicit["data"] = data
                explicit.update(
                    method=point.method,
                    task=name,
                    model=model or b.model,
                    seed=seed,
                    data_seed=0,
                    output_dir=str(directory),
                )
                try:
                    cfg = load_config(None, nulls + list(overrides or []), **explicit)
                except MolfError as e:
                    raise MolfError(f"sweep cell {task}/{point.variant}: {e}") from None
                lrs = {k: getattr(cfg, k) for k in ("lr_fft", "lr_lora")}
                cells.append(Cell(task, point.variant, lrs, cfg))
    return cells


# -- reading the cells ----------------------------------------------------------------------------
def _role(method: str) -> str:
    """The method's claim role (`molf.train.methods.ROLES`): full, lora, mixture or efficient."""
    roles = methods.get(method).claim_roles
    return roles[0] if roles else method


def sweep_rows(cells: list[Cell], points: list[SweepPoint]) -> list[dict[str, Any]]:
    """One row per finished cell: its setting, test and validation scores, routing figures."""
    by_variant = {p.variant: p for p in points}
    rows = []
    for cell in cells:
        rec = read_cell(cell.directory, cell.task, cell.method)
        if rec.status != "done":
            continue
        point = by_variant.get(cell.method)
        row: dict[str, Any] = {
            "task": cell.task,
            "variant": cell.method,
            "method": cell.config.method,
            "role": _role(cell.config.method),
            "alpha": point.alpha if point else None,
            "ratio": point.ratio if point else None,
            "score": point.score if point else None,
            "seed": cell.config.seed,
            "test": rec.shown("after"),
            "validation": rec.shown("validation"),
            "metric": rec.headline,
        }
        log = read_routing_log(cell.directory)
        if log is not None:
            row.update(routing_figures(log))
            if cell.config.task == "planted" and cell.config.data:
                from molf.experiments.planted import read_truth, routing_accuracy

                truth = routing_accuracy(log, read_truth(cell.config.data))
                row.update({f"truth_{k}": v for k, v in truth.items()})
        rows.append(row)
    return rows


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows averaged over seeds per (task, variant); `seeds` counts them, `test_sd` is the
    standard deviation of the test score over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["variant"]), []).append(r)
    out = []
    for group in groups.values():
        merged: dict[str, Any] = {
            k: group[0][k] for k in ("task", "variant", "method", "role", "alpha")
        }
        merged.update(ratio=group[0]["ratio"], score=group[0].get("score"))
        merged.update(metric=group[0]["metric"], seeds=len(group))
        keys = {k for r in group for k, v in r.items() if isinstance(v, (int, float))}
        for k in sorted(keys - {"alpha", "ratio", "seed"}):
            values = [r[k] for r in group if isinstance(r.get(k), (int, float))]
            merged[k] = sum(values) / len(values) if values else None
        tests = [r["test"] for r in group if r.get("test") is not None]
        merged["test_sd"] = statistics.stdev(tests) if len(tests) > 1 else None
        out.append(merged)
    return out


# -- the report -----------------------------------------------------------------------------------
def _fmt(value: Any, pct: bool = False, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if pct:
        return f"{100 * value:.0f}%"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(rows: list[dict[str, Any]], with_seed: bool) -> list[str]:
    header = ["task", "variant"] + (["seed"] if with_seed else ["seeds"])
    header += ["test", "sd" if not with_seed else "val", "FFT / rank-32 share", "step 1"]
    header += ["step-1 ratio"] + list(TYPE_ORDER)
    # a planted task's ground truth: full-rank modules' updates to FFT, low-rank ones' to LoRA
    truth = any(r.get("truth_accuracy") is not None for r in rows)
    if truth:
        header += ["full->FFT", "low->LoRA", "right"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = [r["task"], r["variant"], str(r["seed"] if with_seed else r["seeds"])]
        cells += [_fmt(r.get("test")), _fmt(r.get("validation" if with_seed else "test_sd"))]
        cells += [_fmt(r.get("share"), pct=True), _fmt(r.get("share_step1"), pct=True)]
        cells.append(_fmt(r.get("ratio_step1"), digits=2))
        cells += [_fmt(r.get(f"share_{t}"), pct=True) for t in TYPE_ORDER]
        if truth:
            keys = ("truth_full_to_fft", "truth_low_to_lora", "truth_accuracy")
            cells += [_fmt(r.get(k), pct=True) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_sweep_report(
    out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], derivation: list[str]
) -> dict[str, Path]:
    """sweep.csv (every cell), sweep.md (means over seeds, then every cell) and the plots."""
    from molf.experiments import plots

    paths: dict[str, Path] = {}
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in _CSV_FIRST, k))
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in keys})
    paths["csv"] = out / "sweep.csv"
    means = mean_rows(rows)
    figures = plots.plot_sweep(means, rows, out)
    paths.update(figures)
    lines = [
        "# Routing sweep",
        "",
        f"Command: `{meta.get('command', '')}`",
        "",
        "What the routing of MoLF (FFT expert vs LoRA expert) and MoLF-E (rank-32 vs rank-128 "
        "expert) did when only the LoRA scale (alpha) and the learning-rate ratio "
        "lr_lora / lr_fft moved, with FFT and LoRA at their comparison learning rates beside "
        "them. Share: of module updates routed to the first expert (MoLF: FFT; MoLF-E: rank 32), "
        "over the whole run, at step 1 and per module type. Step-1 ratio: median over modules of "
        "score(second expert) / score(first expert) at step 1; above 1 the second expert wins. "
        "Test: the task's headline score in points (mean over seeds; sd: its standard deviation "
        "over seeds).",
        "",
        "## Mean over seeds",
        "",
        *_table(means, with_seed=False),
        "",
    ]
    for name, path in figures.items():
        lines += [f"![{name}]({path.name})", ""]
    if derivation:
        lines += ["## First step: the derivation against the measurement", "", *derivation, ""]
    lines += ["## Every cell", "", *_table(rows, with_seed=True), ""]
    (out / "sweep.md").write_text("\n".join(lines))
    paths["report"] = out / "sweep.md"
    return paths


_CSV_FIRST = ("task", "variant", "method", "alpha", "ratio", "seed", "test", "validation")


# -- the command ----------------------------------------------------------------------------------
def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise MolfError(f"{name}: comma list of numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise MolfError(f"{name}: numbers > 0, got {text!r}")
    return values


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise MolfError(f"{name}: comma list of integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise MolfError(f"{name}: integers >= 0, got {text!r}")
    return values


def run_sweep(args: argparse.Namespace) -> int:
    """`molf routing-sweep`: run (or resume) the cells, then write the report; exit 1 when a
    cell failed."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise MolfError("--tasks: give at least one task")
    alphas = _floats(args.alphas, "--alphas")
    ratios = _floats(args.lr_ratios, "--lr-ratios")
    seeds = _ints(args.seeds, "--seeds")
    out = Path(args.output_dir or f"runs/routing-sweep-{args.budget}")
    check_directory_path(out, "--output-dir")
    # a directory is the sweep's when it holds sweep.json, or nothing but an earlier --predict
    ours = (out / "sweep.json").exists()
    if out.is_dir() and not ours and any(p.name != "predict.md" for p in out.iterdir()):
        raise MolfError(
            f"--output-dir {out}: not a routing-sweep directory (no sweep.json) and not empty; "
            "give a new or empty directory"
        )
    overrides = list(args.overrides or [])
    scores = tuple(s.strip() for s in args.scores.split(",") if s.strip())
    from molf.optim.scores import SCORES

    unknown = [s for s in scores if s not in SCORES]
    if not scores or unknown:
        raise MolfError(f"--scores: comma list of {', '.join(sorted(SCORES))}, got {args.scores!r}")
    cells = plan_sweep(
        tasks, out, alphas, ratios, seeds, args.budget, args.model, overrides, scores
    )
    ranks = tuple(BUDGETS[args.budget].settings.get("molf_e_ranks", (32, 128)))
    points = sweep_points(alphas, ratios, ranks=ranks, scores=scores)
    if getattr(args, "predict", False):
        from molf.experiments.first_step import predict_routing

        out.mkdir(parents=True, exist_ok=True)
        mixture = [c for c in cells if _role(c.config.method) == "mixture"]
        print("\n".join(predict_routing(mixture, out)))
        print(f"written: {out / 'predict.md'}", flush=True)
        return 0
    if args.plan:
        for c in cells:
            print(
                f"{c.task}/{c.method}/{c.directory.name}: {c.config.method}, "
                + ", ".join(f"{k}={format_lr(v)}" for k, v in c.lrs.items())
            )
        print(f"{len(cells)} cells")
        return 0
    command = (
        f"molf routing-sweep --budget {args.budget} --tasks {','.join(tasks)} --alphas "
        f"{args.alphas} --lr-ratios {args.lr_ratios} --seeds {args.seeds} --output-dir {out}"
        + (f" --scores {','.join(scores)}" if scores != ("epd",) else "")
        + (f" --model {args.model}" if args.model else "")
        + "".join(f" {o}" for o in overrides)
    )
    out.mkdir(parents=True, exist_ok=True)
    state = read_json(out / "sweep.json") or {"invocations": []}
    state.update(command=command)
    started = time.perf_counter()
    failed: list[str] = []
    if not args.report_only:
        b = BUDGETS[args.budget]
        jobs = b.jobs if args.jobs is None else args.jobs
        threads = args.threads or b.threads
        state["invocations"].append({"started": time.strftime("%Y-%m-%d %H:%M:%S")})
        write_json_atomic(out / "sweep.json", state)
        print(f"molf routing-sweep: {len(cells)} cells in {out}", flush=True)

        def starting(i: int) -> None:
            print(f"[{i + 1}/{len(cells)}] {cells[i].key}: running", flush=True)

        def record(i: int, outcome: runner.Outcome) -> None:
            status = outcome.status
            if status == "failed":
                failed.append(cells[i].key)
                print(f"[{i + 1}/{len(cells)}] {cells[i].key}: FAILED: {outcome.error}", flush=True)
            elif status == "done":
                print(
                    f"[{i + 1}/{len(cells)}] {cells[i].key}: done in {outcome.seconds:.0f} s",
                    flush=True,
                )

        if jobs:
            runner.run_in_subprocesses(cells, jobs, threads, False, starting, record)
        else:
            for i, cell in enumerate(cells):
                if not is_done(cell):
                    starting(i)
                record(i, runner.run_cell(cell))
        state["invocations"][-1]["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_json_atomic(out / "sweep.json", state)
    rows = sweep_rows(cells, points)
    derivation: list[str] = []
    if not args.no_first_step and rows:
        from molf.experiments.first_step import derivation_check

        mixture = [c for c in cells if _role(c.config.method) == "mixture"]
        derivation = derivation_check(mixture, out)
    paths = write_sweep_report(out, rows, {"command": command}, derivation)
    print(f"report: {paths['report']} ({len(rows)} of {len(cells)} cells finished)", flush=True)
    return 1 if failed else 0
