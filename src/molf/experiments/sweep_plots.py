"""The routing sweep's plots (`molf routing-sweep`): share and score against alpha, the share per
module type, MoLF-E's two scalings. Matplotlib's object API with the Agg canvas (no pyplot state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from molf.experiments.report import _figure, _save

TYPE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")


def _tasks(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in rows))


def _molf(rows: list[dict[str, Any]], task: str, ratio: float) -> list[dict[str, Any]]:
    found = [
        r for r in rows if r["task"] == task and r["role"] == "mixture" and r["ratio"] == ratio
    ]
    return sorted(found, key=lambda r: r["alpha"])


def plot_alpha(means: list[dict[str, Any]], cells: list[dict[str, Any]], path: Path) -> Path:
    """Per task, against alpha (log scale): top, the share of module updates routed to FFT, one
    line per learning-rate ratio; bottom, the test score of each seed (dots) and the mean
    (line), with FFT's and LoRA's mean scores as horizontal references."""
    tasks = _tasks(means)
    fig = _figure(4.6 * len(tasks), 7.0)
    ratios = sorted({r["ratio"] for r in means if r["role"] == "mixture"})
    for j, task in enumerate(tasks):
        top = fig.add_subplot(2, len(tasks), j + 1)
        bottom = fig.add_subplot(2, len(tasks), len(tasks) + j + 1)
        for ratio in ratios:
            line = _molf(means, task, ratio)
            xs = [r["alpha"] for r in line]
            label = f"lr_lora / lr_fft = {ratio:g}"
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
    return _save(fig, path)


def plot_types(means: list[dict[str, Any]], path: Path) -> Path:
    """Per task and learning-rate ratio: module type x alpha heat-map of the FFT share."""
    import numpy as np

    tasks = _tasks(means)
    ratios = sorted({r["ratio"] for r in means if r["role"] == "mixture"})
    fig = _figure(3.6 * len(ratios) * len(tasks) + 1.0, 3.6)
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
            ax.set_title(f"{task}, ratio {ratio:g}", fontsize=9)
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
    fig = _figure(4.2 * len(tasks), 3.6)
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
    return _save(fig, path)


def plot_all(
    means: list[dict[str, Any]], cells: list[dict[str, Any]], out: Path
) -> dict[str, Path]:
    """Every plot the sweep report shows, by name."""
    paths: dict[str, Path] = {}
    if any(r["role"] == "mixture" for r in means):
        paths["share and score against alpha"] = plot_alpha(means, cells, out / "sweep_alpha.png")
        paths["FFT share per module type"] = plot_types(means, out / "sweep_types.png")
    molf_e = plot_molf_e(means, out / "sweep_molf_e.png")
    if molf_e is not None:
        paths["MoLF-E: equal alpha against equal scale"] = molf_e
    return paths
