"""`molf compare`: run every method on every task under one budget, then write the report.

    molf compare --tasks fact-geo,med-icd10,world-sql \\
        --methods fft,lora,lora-160,adalora,molf,molf-e,molf-e-k2 \\
        --budget small

docs/compare.md describes the protocol (fairness, budgets, how each learning rate is chosen) and
the report. The pieces: `molf.experiments.grid` plans the cells and reads them back,
`molf.experiments.runner` runs them, `molf.experiments.report` writes the tables and plots; this
module ties them to the command line and records each invocation in `<out>/grid.json`.
"""

from __future__ import annotations

import argparse
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molf._files import check_directory_path, write_json_atomic
from molf.errors import MolfError
from molf.experiments import runner
from molf.experiments.grid import (
    BUDGETS,
    Cell,
    check_finished,
    format_lr,
    is_done,
    parse_lr_grid,
    plan_grid,
    read_json,
    seed_cells,
    task_labels,
)
from molf.experiments.report import package_versions, write_report
from molf.experiments.runner import Outcome
from molf.tasks import lower_is_better
from molf.train import methods as registry


# -- the command line ------------------------------------------------------------------------------
def _split_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise MolfError(f"--{what}: empty list")
    if len(set(items)) != len(items):
        raise MolfError(f"--{what}: '{text}' names an item twice")
    return items


def _parse_data(items: list[str] | None, tasks: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise MolfError(f"--data '{item}': expected task=path (e.g. counterfact=cf.json)")
        task, path = (x.strip() for x in item.split("=", 1))
        if task not in tasks:
            raise MolfError(
                f"--data '{item}': task '{task}' is not in --tasks ({', '.join(tasks)})"
            )
        out[task] = path
    return out


def _headline_text(summary: dict[str, Any]) -> str:
    h = summary.get("headline_metric")
    val = (summary.get("validation") or {}).get(h)
    test = (summary.get("after") or {}).get(h)
    loss_like = isinstance(h, str) and lower_is_better(h)

    def shown(v: float) -> str:  # a score in points, a loss-like metric as is
        return f"{v:.3f}" if loss_like else f"{100 * v:.1f}"

    parts = [f"{h}:"]
    if isinstance(val, (int, float)):
        parts.append(f"validation {shown(val)}")
    if isinstance(test, (int, float)):
        parts.append(f"test {shown(test)}")
    return " ".join(parts)


@dataclass
class CompareResult:
    """The grid of one `compare` call: planned cells, what happened to each, the report files."""

    output_dir: Path
    cells: list[Cell]
    outcomes: list[Outcome]
    paths: dict[str, Path]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in ("failed", "skipped-failed")]


def format_plan(cells: list[Cell]) -> str:
    """One line per cell: where it runs and the settings that decide its cost."""
    lines = []
    for c in cells:
        cfg = c.config
        steps = f"max_steps {cfg.max_steps}" if cfg.max_steps else f"epochs {cfg.epochs:g}"
        lrs = ", ".join(f"{k}={format_lr(v)}" for k, v in c.lrs.items())
        lines.append(
            f"{c.key}: {cfg.model}, n_train {cfg.n_train}, n_val {cfg.n_val}, n_test {cfg.n_test}, "
            f"{steps}, batch {cfg.batch_size}x{cfg.grad_accum}, {lrs}"
            + (", eval_before" if cfg.eval_before else "")
            + (" [done]" if is_done(c) else "")
        )
    return "\n".join(lines)


def _command(
    budget: str,
    model: str,
    tasks: list[str],
    methods: list[str],
    out: Path,
    seed: int,
    overrides: list[str],
    lr_grid: str | None,
    data: dict[str, str] | None,
    seeds: int | None = None,
    seed_methods: list[str] | None = None,
) -> str:
    parts = ["molf compare", f"--budget {budget}", f"--model {shlex.quote(model)}"]
    parts += [f"--tasks {','.join(tasks)}", f"--methods {','.join(methods)}"]
    parts += [f"--output-dir {shlex.quote(str(out))}", f"--seed {seed}"]
    if seeds is not None:
        parts.append(f"--seeds {seeds}")
    if seed_methods:
        parts.append(f"--seed-methods {','.join(seed_methods)}")
    if lr_grid:
        parts.append(f"--lr-grid {shlex.quote(lr_grid)}")
    parts += [f"--data {shlex.quote(f'{t}={p}')}" for t, p in (data or {}).items()]
    return " ".join(parts + [shlex.quote(o) for o in overrides])


def _check_options(
    b: Any,
    methods: list[str],
    keep_models: str,
    threads: int | None,
    jobs: int | None,
    seeds: int | None,
    seed_methods: list[str] | None,
) -> tuple[int, list[str]]:
    """Refuse bad options before anything runs; returns (seeds, methods that get them)."""
    if keep_models not in ("all", "chosen", "none"):
        raise MolfError(f"--keep-models: must be all, chosen or none, got {keep_models!r}")
    if threads is not None and threads <= 0:
        raise MolfError(f"--threads: must be > 0, got {threads}")
    if jobs is not None and jobs < 0:
        raise MolfError(f"--jobs: must be >= 0, got {jobs}")
    n_seeds = b.seeds if seeds is None else seeds
    if n_seeds < 1:
        raise MolfError(f"--seeds: must be >= 1, got {n_seeds}")
    if seed_methods is None:
        seed_methods = [m for m in methods if registry.in_claims(m)]
    unknown = [m for m in seed_methods if m not in methods]
    if unknown:
        raise MolfError(
            f"--seed-methods: '{unknown[0]}' is not in --methods ({', '.join(methods)})"
        )
    return n_seeds, seed_methods


@dataclass
class _Session:
    """One invocation of a grid: its record in grid.json, and how it runs cells."""

    state_path: Path
    state: dict[str, Any]
    invocation: dict[str, Any]
    jobs: int
    threads: int | None
    keep_models: str
    skip_failed: bool
    outcomes: list[Outcome]

    def save(self) -> None:
        write_json_atomic(self.state_path, self.state)

    def record(self, batch: list[Cell], i: int, outcome: Outcome, pending: set[int]) -> None:
        """Print and store what happened to cell `i`; prune a pair's models once it is done."""
        cell = batch[i]
        label = f"[{i + 1}/{len(batch)}] {cell.key}"
        self.outcomes.append(outcome)
        entry: dict[str, Any] = {"status": outcome.status}
        if outcome.status == "done":
            self.invocation["cells_run"] += 1
            entry["seconds"] = round(outcome.seconds, 1)
            print(
                f"{label}: done in {outcome.seconds:.0f} s, "
                f"{_headline_text(outcome.summary or {})}",
                flush=True,
            )
        elif outcome.status == "skipped":
            print(f"{label}: done before, skipped", flush=True)
            entry = self.state["cells"].get(cell.key) or {"status": "done"}
        else:
            entry["error"] = outcome.error
            print(f"{label}: FAILED: {outcome.error}", flush=True)
        self.state["cells"][cell.key] = entry
        self.save()
        pending.discard(i)
        group = [j for j, c in enumerate(batch) if (c.task, c.method) == (cell.task, cell.method)]
        if not any(j in pending for j in group):
            runner.prune_models([batch[j] for j in group], self.keep_models)

    def run(self, batch: list[Cell]) -> None:
        """Run `batch` (finished cells are skipped), in subprocesses or in this process."""
        pending = set(range(len(batch)))

        def record(i: int, outcome: Outcome) -> None:
            self.record(batch, i, outcome, pending)

        def starting(i: int) -> None:
            print(f"[{i + 1}/{len(batch)}] {batch[i].key}: running", flush=True)

        if self.jobs:
            runner.run_in_subprocesses(
                batch, self.jobs, self.threads, self.skip_failed, starting, record
            )
            return
        for i, cell in enumerate(batch):
            if not is_done(cell):
                starting(i)
            record(i, runner.run_cell(cell, skip_failed=self.skip_failed))


def _grids_json(grids: dict[str, tuple[Any, ...]], methods: list[str]) -> dict[str, list[Any]]:
    """The learning-rate grids of `methods` as grid.json records them (a per-key candidate,
    lr_fft and lr_lora of MoLF say, is a list)."""
    return {
        m: [list(lr) if isinstance(lr, tuple) else lr for lr in g]
        for m, g in grids.items()
        if m in methods
    }


def _open_state(
    out: Path, command: str, report_only: bool, settings: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """grid.json updated with this invocation's settings, the new invocation's record, and the
    command the report names (the one that made the cells, for --report-only)."""
    state: dict[str, Any] = read_json(out / "grid.json") or {}
    if report_only and state.get("command"):
        command = state["command"]  # the report describes the run that made the cells
    state.update(command=command, **settings)
    state.setdefault("cells", {})
    state.setdefault("invocations", [])
    invocation: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
        "cells_run": 0,
    }
    if not report_only:  # the report names the versions the cells were trained with
        invocation["versions"] = package_versions()
    state["invocations"].append(invocation)
    return state, invocation, command


def _output_dir(output_dir: str | Path | None, budget: str) -> Path:
    """The grid's directory: new, empty, or one a grid wrote (its grid.json)."""
    out = Path(output_dir or f"runs/compare-{budget}")
    check_directory_path(out, "--output-dir")
    if out.is_dir() and any(out.iterdir()) and not (out / "grid.json").exists():
        # its report files would replace whatever of the user's has the same name
        raise MolfError(
            f"--output-dir {out}: not a molf compare directory (no grid.json) and not empty; "
            "give a new or empty directory"
        )
    return out


def _run_grid(
    session: _Session,
    cells: list[Cell],
    report_only: bool,
    n_seeds: int,
    seed_methods: list[str],
    seed: int,
    budget: str,
    model_name: str,
    out: Path,
) -> None:
    """The learning-rate candidates, then (once each pair's choice is final) the chosen ones
    with more seeds; torch's thread count is the session's for the duration."""
    import torch

    old_threads = torch.get_num_threads()
    try:
        if session.threads:
            torch.set_num_threads(session.threads)
        if report_only:
            return
        session.invocation.update(jobs=session.jobs, threads=session.threads)
        how = f"{session.jobs} at a time in subprocesses" if session.jobs else "one at a time"
        print(
            f"molf compare: {len(cells)} cells ({how}), {budget} budget, {model_name}, in {out}",
            flush=True,
        )
        session.run(cells)
        extra = seed_cells(cells, n_seeds, seed_methods)
        if extra:
            check_finished(extra)
            print(
                f"molf compare: {len(extra)} cells train the chosen learning rates with "
                f"seeds {seed + 1}-{seed + n_seeds - 1}",
                flush=True,
            )
            session.run(extra)
    finally:
        torch.set_num_threads(old_threads)


def _notes(
    invocation: dict[str, Any], n_jobs: int, n_threads: int | None, keep_models: str
) -> list[str]:
    """How this invocation ran its cells (earlier ones: see the invocations) and what it kept."""
    notes = []
    if invocation["cells_run"]:
        if n_jobs:
            notes.append(f"cells run {n_jobs} at a time, each in its own process")
        if n_threads:
            notes.append(f"torch threads per cell: {n_threads}")
    if keep_models != "all":
        kept = "the chosen candidate of each pair" if keep_models == "chosen" else "no cell"
        notes.append(f"model weights (final/) kept for: {kept}")
    return notes


def compare(
    budget: str = "small",
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    model: str | None = None,
    output_dir: str | Path | None = None,
    seed: int = 0,
    overrides: list[str] | None = None,
    lr_grid: str | None = None,
    data: dict[str, str] | None = None,
    threads: int | None = None,
    jobs: int | None = None,
    seeds: int | None = None,
    seed_methods: list[str] | None = None,
    keep_models: str = "chosen",
    skip_failed: bool = False,
    report_only: bool = False,
    command: str | None = None,
) -> CompareResult:
    """Run (or resume) the grid, then write the report (docs/compare.md).

    The learning-rate candidates run first; once a pair's choice is final, its chosen candidate
    runs again with `seeds` - 1 more training seeds (`seed_methods`, default: the methods of the
    paper's claims). `report_only` rebuilds the report from the cells on disk, running nothing.
    """
    tasks = list(tasks or ["fact-geo", "med-icd10", "world-sql"])
    methods = list(methods or registry.names())
    b = BUDGETS.get(budget)
    if b is None:
        raise MolfError(f"--budget: must be one of {', '.join(BUDGETS)}, got {budget!r}")
    n_seeds, seed_methods = _check_options(
        b, methods, keep_models, threads, jobs, seeds, seed_methods
    )
    overrides = list(overrides or [])
    out = _output_dir(output_dir, budget)
    cells = plan_grid(budget, tasks, methods, out, model, seed, overrides, lr_grid, data)
    check_finished(cells)
    model_name = cells[0].config.model if cells else (model or b.model)
    command = command or _command(
        budget,
        model_name,
        tasks,
        methods,
        out,
        seed,
        overrides,
        lr_grid,
        data,
        n_seeds,
        seed_methods,
    )
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(
        budget=budget,
        model=model_name,
        seed=seed,
        seeds=n_seeds,
        seed_methods=seed_methods,
        tasks=tasks,
        methods=methods,
        overrides=overrides,
        lr_grids=_grids_json(parse_lr_grid(lr_grid, b), methods),
    )
    state, invocation, command = _open_state(out, command, report_only, settings)
    n_threads = threads or b.threads
    n_jobs = b.jobs if jobs is None else jobs
    session = _Session(
        out / "grid.json", state, invocation, n_jobs, n_threads, keep_models, skip_failed, []
    )
    session.save()
    try:
        _run_grid(session, cells, report_only, n_seeds, seed_methods, seed, budget, model_name, out)
    finally:
        invocation["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        session.save()
    paths = write_report(
        out,
        task_labels(tasks),  # a data path's cells and column go by its file name
        methods,
        {
            "command": command,
            "model": model_name,
            "budget": budget,
            "seed": seed,
            "wall_seconds": time.perf_counter() - t_start,
            "report_only": report_only,
            "notes": _notes(invocation, n_jobs, n_threads, keep_models),
            "invocations": state["invocations"],
        },
    )
    result = CompareResult(out, cells, session.outcomes, paths)
    print(
        f"report: {paths['report']}"
        + (f" ({len(result.failed)} cells failed)" if result.failed else ""),
        flush=True,
    )
    return result


def _seed_method_list(args: argparse.Namespace, methods: list[str]) -> list[str]:
    """`--seed-methods`, or the methods that take part in a paper claim."""
    given = getattr(args, "seed_methods", None)
    if given:
        return _split_list(given, "seed-methods")
    return [m for m in methods if registry.in_claims(m)]


def run_compare(args: argparse.Namespace) -> int:
    """`molf compare`: exit status 0 when every cell finished, 1 when some failed."""
    tasks = _split_list(args.tasks, "tasks")
    methods = _split_list(args.methods, "methods")
    data = _parse_data(getattr(args, "data", None), tasks)
    if getattr(args, "plan", False):
        out = Path(args.output_dir or f"runs/compare-{args.budget}")
        cells = plan_grid(
            args.budget,
            tasks,
            methods,
            out,
            args.model,
            args.seed,
            list(args.overrides or []),
            getattr(args, "lr_grid", None),
            data,
        )
        print(format_plan(cells))
        b = BUDGETS[args.budget]
        n_seeds = b.seeds if getattr(args, "seeds", None) is None else args.seeds
        seeded = _seed_method_list(args, methods)
        extra = len({(c.task, c.method) for c in cells if c.method in seeded}) * (n_seeds - 1)
        print(
            f"{len(cells)} cells"
            + (
                f", then {extra} more: the chosen learning rates of {', '.join(seeded)} with "
                f"seeds {args.seed + 1}-{args.seed + n_seeds - 1}"
                if extra
                else ""
            )
        )
        return 0
    result = compare(
        budget=args.budget,
        tasks=tasks,
        methods=methods,
        model=args.model,
        output_dir=args.output_dir,
        seed=args.seed,
        overrides=list(args.overrides or []),
        lr_grid=getattr(args, "lr_grid", None),
        data=data,
        threads=getattr(args, "threads", None),
        jobs=getattr(args, "jobs", None),
        seeds=getattr(args, "seeds", None),
        seed_methods=_seed_method_list(args, methods)
        if getattr(args, "seed_methods", None)
        else None,
        keep_models=getattr(args, "keep_models", "chosen"),
        skip_failed=getattr(args, "skip_failed", False),
        report_only=getattr(args, "report_only", False),
    )
    return 1 if result.failed else 0
