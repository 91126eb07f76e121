"""The answer page's figure and table: every method's test score per task, with a 95% interval
that resamples seeds and items together, read from committed comparison directories (their
`items.csv` and `results.csv`), so the page shows what the reports hold and nothing else.

    python -m molf.experiments.answer OUT_DIR DIR=LABEL [DIR=LABEL ...]

writes OUT_DIR/answer.png (one panel per task and directory, methods as rows, the untrained
model's score as a dashed line) and OUT_DIR/answer.md (the same numbers as a table).
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from molf.errors import MolfError
from molf.experiments.stats import paired_difference_seeds

__all__ = ["Score", "method_scores", "plot_answer", "write_answer"]

# the order methods take in a panel, top to bottom; others follow in their file order (each
# method is shown by its registry label, coloured by its role in the paper's claims)
ORDER = ("fft", "lora", "molf", "molf-pfn", "hybrid", "lora-other", "lora-160", "adalora")


# the baselines (FFT, LoRA) in one colour, the mixtures (MoLF, MoLF-E) in another, others a third
_COLORS = {"full": "C1", "lora": "C1", "mixture": "C0", "efficient": "C0"}


def _role(method: str) -> str:
    from molf.train import methods

    known = methods.REGISTRY.get(method)
    return known.claim_roles[0] if known is not None and known.claim_roles else ""


def _label(method: str) -> str:
    from molf.train import methods

    return methods.label(method)


@dataclass(frozen=True)
class Score:
    """One method's test score on one task of one directory, in points."""

    panel: str
    method: str
    mean: float
    low: float
    high: float
    seeds: int


def read_items(directory: Path) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """{(task, method): {seed: {item id: score in points}}} of a comparison's items.csv."""
    path = directory / "items.csv"
    if not path.is_file():
        raise MolfError(f"answer: {path} is missing (a comparison directory has items.csv)")
    out: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            seeds = out.setdefault((row["task"], row["method"]), {})
            seeds.setdefault(int(row["seed"]), {})[row["item"]] = 100.0 * float(row["score"])
    return out


def floors(directory: Path) -> dict[str, float]:
    """{task: the untrained model's test score} from results.csv's `base` row."""
    with (directory / "results.csv").open() as f:
        for row in csv.DictReader(f):
            if row["method"] == "base":
                return {
                    k: float(v)
                    for k, v in row.items()
                    if k not in ("method", "mean") and v and not k.startswith("lr_")
                }
    return {}


def method_scores(directory: Path, label: str) -> list[Score]:
    """Each (task, method) of a comparison directory: the mean over its seeds and items, and the
    interval of that mean (seeds and items drawn together, as the reports' differences are)."""
    found = read_items(directory)
    scores = []
    for (task, method), seeds in found.items():
        ids = sorted(set.intersection(*(set(v) for v in seeds.values())))
        rows = [[seeds[s][i] for i in ids] for s in sorted(seeds)]
        r = paired_difference_seeds(rows, [[0.0] * len(ids) for _ in rows], seed=0)
        scores.append(Score(f"{task}, {label}", method, r.mean, r.low, r.high, len(rows)))
    rank = {m: i for i, m in enumerate(ORDER)}
    return sorted(scores, key=lambda s: (s.panel, rank.get(s.method, len(ORDER))))


def plot_answer(scores: list[Score], base: dict[str, float], path: Path) -> Path:
    """One panel per task and directory: each method's mean with its interval."""
    from molf.experiments.plots import figure, save

    panels = list(dict.fromkeys(s.panel for s in scores))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = figure(4.6 * cols, 3.4 * rows)
    for j, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, j + 1)
        mine = [s for s in scores if s.panel == panel]
        ys = list(range(len(mine)))[::-1]
        for y, s in zip(ys, mine):
            color = _COLORS.get(_role(s.method), "C2")
            ax.errorbar(
                s.mean,
                y,
                xerr=[[s.mean - s.low], [s.high - s.mean]],
                fmt="o",
                color=color,
                capsize=3,
            )
        ax.set_yticks(ys)
        ax.set_yticklabels([_label(s.method) for s in mine], fontsize=8)
        if panel in base:
            ax.axvline(base[panel], linestyle="--", color="k", linewidth=0.8, label="untrained")
            ax.legend(fontsize=7, loc="lower left")
        ax.set_xlabel("test score (points), 95% interval")
        ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    return save(fig, path)


def write_answer(out: Path, sources: list[tuple[Path, str]]) -> dict[str, Path]:
    """answer.png and answer.md in `out` from the comparison directories `sources`."""
    scores: list[Score] = []
    base: dict[str, float] = {}
    for directory, label in sources:
        scores += method_scores(directory, label)
        base.update({f"{t}, {label}": v for t, v in floors(directory).items()})
    out.mkdir(parents=True, exist_ok=True)
    png = plot_answer(scores, base, out / "answer.png")
    lines = [
        "| task, setting | method | score | 95% interval | seeds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for panel in dict.fromkeys(s.panel for s in scores):
        if panel in base:
            lines.append(f"| {panel} | untrained model | {base[panel]:.1f} | - | - |")
        for s in (s for s in scores if s.panel == panel):
            label = _label(s.method)
            lines.append(
                f"| {panel} | {label} | {s.mean:.1f} | [{s.low:.1f}, {s.high:.1f}] | {s.seeds} |"
            )
    md = out / "answer.md"
    md.write_text("\n".join(lines) + "\n")
    return {"figure": png, "table": md}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for answer.png and answer.md")
    parser.add_argument(
        "sources", nargs="+", help="DIR=LABEL: a comparison directory and its label"
    )
    args = parser.parse_args(argv)
    sources = []
    for item in args.sources:
        directory, _, label = item.partition("=")
        if not label:
            raise SystemExit(f"answer: {item!r}: expected DIR=LABEL")
        sources.append((Path(directory), label))
    paths = write_answer(Path(args.out), sources)
    print(f"written: {paths['figure']} and {paths['table']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
