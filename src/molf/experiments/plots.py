"""The comparison's plots: routing dynamics (the paper's Figures 4-6), loss curves, efficiency.

Matplotlib's object API with the Agg canvas (no pyplot state, no GUI backend): safe in tests and
threads. Every function writes one PNG and returns its path (None when there is nothing to plot).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from molf.experiments.grid import CellRecord, Results
from molf.experiments.routing_stats import TYPE_ORDER, layer_step_matrix
from molf.routing import RoutingLog
from molf.train import methods as registry


def figure(width: float, height: float) -> Any:
    # The object API with the Agg canvas: no pyplot state, no GUI backend, safe in threads/tests.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_share_over_steps(logs: dict[str, RoutingLog], expert: int, title: str, path: Path) -> Path:
    """One line per task: share of active modules routed to `expert` at each step."""
    fig = figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    for task, log in logs.items():
        pts = log.share_over_steps(expert)
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="." if len(pts) < 40 else None,
            label=task,
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("share of modules")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def plot_layer_heatmaps(logs: dict[str, RoutingLog], expert: int, title: str, path: Path) -> Path:
    """Per task: layer depth x step heat-map of the share routed to `expert`."""
    from matplotlib.ticker import MaxNLocator

    fig = figure(4.5 * len(logs) + 1.5, 4.5)
    image = None
    for i, (task, log) in enumerate(logs.items()):
        ax = fig.add_subplot(1, len(logs), i + 1)
        layers, steps, matrix = layer_step_matrix(log, expert)
        if not layers:
            ax.set_title(f"{task}: no layered modules")
            continue
        image = ax.imshow(
            matrix,
            aspect="auto",
            origin="lower",
            vmin=0.0,
            vmax=1.0,
            cmap="viridis",
            interpolation="nearest",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, layers[0] - 0.5, layers[-1] + 0.5),
        )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("layer (0 = nearest the embeddings)")
        ax.set_title(task)
    fig.suptitle(title)
    # fixed margins and a colour-bar axis of its own: tight_layout cannot place a shared bar
    fig.subplots_adjust(top=0.84, bottom=0.14, left=0.08, right=0.86, wspace=0.3)
    if image is not None:
        fig.colorbar(image, cax=fig.add_axes((0.89, 0.14, 0.02, 0.70)), label="share")
    fig.savefig(path)
    return path


def plot_type_shares(shares: dict[str, dict[str, float | None]], title: str, path: Path) -> Path:
    """Grouped bars: module type on x, one bar per task, height = share routed to the expert."""
    types = [t for t in TYPE_ORDER if any(t in s for s in shares.values())]
    types += sorted({t for s in shares.values() for t in s} - set(types))
    fig = figure(max(6, 1.1 * len(types)), 4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(shares))
    for j, (task, s) in enumerate(shares.items()):
        xs = [i + (j - (len(shares) - 1) / 2) * width for i in range(len(types))]
        values = [s.get(t) for t in types]
        bars = ax.bar(xs, [v or 0.0 for v in values], width=width, label=task)
        # every share written on its bar: where this expert won nothing the bars have no
        # height, and the plot must still say 0% rather than look empty
        labels = ["" if v is None else f"{v:.0%}" for v in values]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(types)))
    ax.set_xticklabels(types)
    ax.set_ylim(0, 1.2)  # headroom for the legend
    ax.set_ylabel("share of module-steps")
    ax.set_title(title)
    ax.legend(ncol=len(shares), loc="upper center")
    return save(fig, path)


def _loss_curve(cell: CellRecord) -> tuple[list[int], list[float]]:
    path = cell.directory / "metrics.jsonl"
    steps, losses = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            loss = rec.get("loss")
            if rec.get("skipped") or not isinstance(loss, (int, float)) or not math.isfinite(loss):
                continue
            steps.append(int(rec["step"]))
            losses.append(float(loss))
    return steps, losses


def plot_loss_curves(res: Results, path: Path) -> Path | None:
    """Per task: the training loss of each method's chosen candidate."""
    fig = figure(5 * len(res.tasks), 4)
    any_line = False
    for i, t in enumerate(res.tasks):
        ax = fig.add_subplot(1, len(res.tasks), i + 1)
        for m in res.methods:
            cell = res.chosen[(t, m)]
            if cell is None:
                continue
            steps, losses = _loss_curve(cell)
            if steps:
                any_line = True
                ax.plot(steps, losses, label=f"{registry.label(m)} (lr {cell.lr_text})")
        ax.set_title(t)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return save(fig, path) if any_line else None


def plot_efficiency(res: Results, path: Path) -> Path | None:
    """Two panels: tokens/s and peak memory per method, one bar per task."""
    fig = figure(max(8, 2 * len(res.methods)), 4)
    panels = (("tokens_per_s", "training tokens / s"), ("peak_memory_mb", "peak memory (MB)"))
    width = 0.8 / max(1, len(res.tasks))
    found = False
    for p, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, p + 1)
        for j, t in enumerate(res.tasks):
            values = []
            for m in res.methods:
                cell = res.chosen[(t, m)]
                v = (cell.summary or {}).get(key) if cell else None
                found = found or isinstance(v, (int, float))
                values.append(v if isinstance(v, (int, float)) else 0.0)
            xs = [i + (j - (len(res.tasks) - 1) / 2) * width for i in range(len(res.methods))]
            ax.bar(xs, values, width=width, label=t)
        ax.set_xticks(range(len(res.methods)))
        ax.set_xticklabels([registry.label(m) for m in res.methods])
        ax.set_ylabel(label)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)  # headroom for the legend
        ax.legend(fontsize=8, ncol=len(res.tasks))
    return save(fig, path) if found else None


# -- the routing sweep (`molf routing-sweep`) ------------------------------------------------
def _tasks(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in rows))


def _line_key(row: dict[str, Any]) -> tuple[str, float]:
    """A MoLF sweep row's line: (routing score, learning-rate ratio)."""
    return (row.get("score") or "epd", row["ratio"])


def _lines(rows: list[dict[str, Any]]) -> list[tuple[str, float]]:
    return sorted({_line_key(r) for r in rows if r["role"] == "mixture"})


def _line_label(key: tuple[str, float], lines: list[tuple[str, float]]) -> str:
    score, ratio = key
    text = f"lr_lora / lr_fft = {ratio:g}"
    return text if {s for s, _ in lines} == {"epd"} else f"{score.upper()}, {text}"


def _molf(rows: list[dict[str, Any]], task: str, key: tuple[str, float]) -> list[dict[str, Any]]:
    found = [
        r for r in rows if r["task"] == task and r["role"] == "mixture" and _line_key(r) == key
    ]
    return sorted(found, key=lambda r: r["alpha"])


def plot_alpha(means: list[dict[str, Any]], cells: list[dict[str, Any]], path: Path) -> Path:
    """Per task, against alpha (log scale): top, the share of module updates routed to FFT, one
    line per learning-rate ratio; bottom, the test score of each seed (dots) and the mean
    (line), with FFT's and LoRA's mean scores as horizontal references."""
    tasks = _tasks(means)
    fig = figure(4.6 * len(tasks), 7.0)
    keys = _lines(means)
    for j, task in enumerate(tasks):
        top = fig.add_subplot(2, len(tasks), j + 1)
        bottom = fig.add_subplot(2, len(tasks), len(tasks) + j + 1)
        for ratio in keys:
            line = _molf(means, task, ratio)
            xs = [r["alpha"] for r in line]
            label = _line_label(ratio, keys)
            top.plot(xs, [100 * (r.get("share") or 0) for r in line], marker="o", label=label)
            (handle,) = bottom.plot(xs, [r.get("test") for r in line], marker="o", label=label)
            seeds = _molf(cells, task, ratio)
            bottom.scatter(
                [r["alpha"] for r in seeds],
                [r.get("test") for r in seeds],
                s=12,
                color=handle.get_color(),
                alpha=0.5,
            )
        for role, style, name in (("full", "--", "FFT"), ("lora", ":", "LoRA")):
            ref = [r for r in means if r["task"] == task and r["role"] == role]
            if ref and ref[0].get("test") is not None:
                bottom.axhline(ref[0]["test"], linestyle=style, color="k", label=name)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.set_xlabel("lora_alpha")
        top.set_ylim(-3, 103)
        top.set_ylabel("module updates routed to FFT (%)")
        top.set_title(task)
        bottom.set_ylabel("test score (points)")
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    return save(fig, path)


def plot_types(means: list[dict[str, Any]], path: Path) -> Path:
    """Per task and learning-rate ratio: module type x alpha heat-map of the FFT share."""
    import numpy as np

    tasks = _tasks(means)
    ratios = _lines(means)
    fig = figure(3.6 * len(ratios) * len(tasks) + 1.0, 3.6)
    image = None
    k = 0
    for task in tasks:
        for ratio in ratios:
            k += 1
            line = _molf(means, task, ratio)
            ax = fig.add_subplot(1, len(ratios) * len(tasks), k)
            if not line:
                continue
            matrix = np.array(
                [
                    [
                        (r.get(f"share_{t}") if r.get(f"share_{t}") is not None else np.nan)
                        for r in line
                    ]
                    for t in TYPE_ORDER
                ]
            )
            image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(line)))
            ax.set_xticklabels([f"{r['alpha']:g}" for r in line])
            ax.set_yticks(range(len(TYPE_ORDER)))
            ax.set_yticklabels(TYPE_ORDER)
            ax.set_xlabel("lora_alpha")
            ax.set_title(f"{task}, {_line_label(ratio, ratios)}", fontsize=8)
            for (i, jj), v in np.ndenumerate(matrix):
                if np.isfinite(v):
                    ax.text(
                        jj,
                        i,
                        f"{100 * v:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="w" if v < 0.5 else "k",
                    )
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.8, label="share routed to FFT")
    fig.savefig(path)
    return path


def plot_molf_e(means: list[dict[str, Any]], path: Path) -> Path | None:
    """MoLF-E at equal alpha and at equal scale: the rank-32 expert's share and the score."""
    rows = [r for r in means if r["role"] == "efficient"]
    if not rows:
        return None
    tasks = _tasks(rows)
    fig = figure(4.2 * len(tasks), 3.6)
    for j, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), j + 1)
        mine = [r for r in rows if r["task"] == task]
        xs = range(len(mine))
        ax.bar(
            [x - 0.2 for x in xs],
            [100 * (r.get("share") or 0) for r in mine],
            width=0.4,
            label="updates to rank 32 (%)",
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [r.get("test") or 0 for r in mine],
            width=0.4,
            label="test score (points)",
        )
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["variant"].removeprefix("molf-e-") for r in mine])
        ax.set_ylim(0, 110)
        ax.set_title(f"MoLF-E, {task}")
        ax.legend(fontsize=8)
    return save(fig, path)


def plot_sweep(
    means: list[dict[str, Any]], cells: list[dict[str, Any]], out: Path
) -> dict[str, Path]:
    """Every plot the routing sweep's report shows, by name."""
    paths: dict[str, Path] = {}
    if any(r["role"] == "mixture" for r in means):
        paths["share and score against alpha"] = plot_alpha(means, cells, out / "sweep_alpha.png")
        paths["FFT share per module type"] = plot_types(means, out / "sweep_types.png")
    molf_e = plot_molf_e(means, out / "sweep_molf_e.png")
    if molf_e is not None:
        paths["MoLF-E: equal alpha against equal scale"] = molf_e
    return paths
