"""The answer page's figure and table: every method's test score per task, with a 95% interval
that resamples seeds and items together, read from committed comparison directories (their
`items.csv` and `results.csv`), so the page shows what the reports hold and nothing else.

    python -m molf.experiments.answer OUT_DIR DIR=LABEL [DIR=LABEL ...]

writes OUT_DIR/answer.png (one panel per task and label, methods as rows, the untrained model's
score as a dashed line), OUT_DIR/answer.md (the same numbers as a table) and
OUT_DIR/differences.md (the paired differences that decide the answer, per panel).

Directories given the same label are one setting: their methods share a panel and are paired
item by item, so a later grid that adds methods (ablations) sits beside the grid it extends. They
must have scored the same test items: their untrained-model scores must agree, or it is refused.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from molf.errors import MolfError
from molf.experiments.stats import paired_difference_seeds

__all__ = [
    "DIFFERENCES",
    "Score",
    "Shift",
    "differences",
    "merged",
    "method_scores",
    "plot_answer",
    "write_answer",
]

# the order methods take in a panel, top to bottom; others follow in their file order (each
# method is shown by its registry label, coloured by its role in the paper's claims)
ORDER = ("fft", "lora", "molf", "molf-pfn", "hybrid", "lora-other", "lora-160", "adalora")


# the baselines (FFT, LoRA) in one colour, the mixtures (MoLF, MoLF-E) in another, others a third
_COLORS = {"full": "C1", "lora": "C1", "mixture": "C0", "efficient": "C0"}

# the paired differences the answer rests on, a minus b, each shown where both ran: the baselines
# against each other, MoLF against each baseline, each ablation against what it isolates
DIFFERENCES = (
    ("fft", "lora"),
    ("molf", "fft"),
    ("molf", "lora"),
    ("molf-pfn", "fft"),
    ("molf-pfn", "molf"),
    ("hybrid", "molf"),
    ("hybrid", "fft"),
    ("hybrid", "lora"),
    ("lora-other", "lora"),
    ("molf", "lora-other"),
)

Items = dict[tuple[str, str], dict[int, dict[str, float]]]


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


@dataclass(frozen=True)
class Shift:
    """a minus b on one panel, paired over the seeds both ran and the items both scored."""

    panel: str
    a: str
    b: str
    mean: float
    low: float
    high: float
    seeds: int


def read_items(directory: Path) -> Items:
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


# what a comparison's grid.json records that must agree for its items to pair with another's
_SETTING = ("model", "budget", "seed", "overrides")


def _check_same_setting(directories: list[Path], floor: dict[Path, dict[str, float]]) -> None:
    """Refuse directories of one label whose grids ran another model, budget, data seed or
    overrides (a rank-8 grid is not the rank-128 one), or that do not say (no grid.json, or no
    untrained-model row in `floor` to compare the test items by)."""
    settings = {}
    for directory in directories:
        path = directory / "grid.json"
        if not path.is_file() or not floor[directory]:
            raise MolfError(
                f"answer: {directory} has no grid.json or no untrained-model row in results.csv, "
                "so it cannot be shown as one setting with another directory"
            )
        grid = json.loads(path.read_text())
        settings[directory] = {k: grid.get(k) for k in _SETTING}
        settings[directory]["overrides"] = sorted(settings[directory]["overrides"] or [])
    first, *rest = directories
    for directory in rest:
        for key in _SETTING:
            if settings[directory][key] != settings[first][key]:
                raise MolfError(
                    f"answer: {first} and {directory} ran different settings ({key}: "
                    f"{settings[first][key]!r} vs {settings[directory][key]!r}); give each a "
                    "label of its own"
                )


def merged(directories: list[Path]) -> tuple[Items, dict[str, float]]:
    """The items and untrained-model scores of comparison directories of one setting, as one.

    A (task, method) in two of them is refused (which to show?), and so are two directories
    whose untrained model scored a task differently: their test items are not the same."""
    items: Items = {}
    base: dict[str, float] = {}
    seen: dict[str, Path] = {}
    floor = {directory: floors(directory) for directory in directories}
    if len(directories) > 1:
        _check_same_setting(directories, floor)
    for directory in directories:
        for key, seeds in read_items(directory).items():
            if key in items:
                raise MolfError(
                    f"answer: {key[1]} on {key[0]} is in two directories of one setting "
                    f"(the second is {directory}); give each a label of its own"
                )
            items[key] = seeds
        for task, value in floor[directory].items():
            if task in base and abs(base[task] - value) > 0.05:
                raise MolfError(
                    f"answer: {seen[task]} and {directory} disagree on the untrained model's "
                    f"{task} score ({base[task]:.2f} vs {value:.2f}): not the same test items, "
                    "so they cannot share a panel"
                )
            base.setdefault(task, value)
            seen.setdefault(task, directory)
    return items, base


def _matrix(
    seeds: dict[int, dict[str, float]], other: dict[int, dict[str, float]] | None = None
) -> tuple[list[list[float]], list[list[float]]]:
    """Rows per seed (shared seeds when paired), columns per item scored on every such seed."""
    other = seeds if other is None else other
    shared = sorted(set(seeds) & set(other))
    if not shared:
        raise MolfError(
            f"answer: no training seed in common to pair (seeds {sorted(seeds)} and "
            f"{sorted(other)})"
        )
    ids = sorted(set.intersection(*(set(seeds[s]) & set(other[s]) for s in shared)))
    return [[seeds[s][i] for i in ids] for s in shared], [
        [other[s][i] for i in ids] for s in shared
    ]


def _scores(items: Items, label: str) -> list[Score]:
    scores = []
    for (task, method), seeds in items.items():
        rows, _ = _matrix(seeds)
        r = paired_difference_seeds(rows, [[0.0] * len(rows[0]) for _ in rows], seed=0)
        scores.append(Score(f"{task}, {label}", method, r.mean, r.low, r.high, len(rows)))
    rank = {m: i for i, m in enumerate(ORDER)}
    return sorted(scores, key=lambda s: (s.panel, rank.get(s.method, len(ORDER))))


def method_scores(directory: Path, label: str) -> list[Score]:
    """Each (task, method) of a comparison directory: the mean over its seeds and items, and the
    interval of that mean (seeds and items drawn together, as the reports' differences are)."""
    return _scores(read_items(directory), label)


def differences(items: Items, label: str, pairs: tuple[tuple[str, str], ...]) -> list[Shift]:
    """Each pair (a, b) of `pairs` on each task where both ran: a minus b, paired over shared
    seeds and items, with the interval that resamples both together."""
    out = []
    for task in dict.fromkeys(t for t, _ in items):
        for a, b in pairs:
            if (task, a) not in items or (task, b) not in items:
                continue
            xs, ys = _matrix(items[(task, a)], items[(task, b)])
            r = paired_difference_seeds(xs, ys, seed=0)
            out.append(Shift(f"{task}, {label}", a, b, r.mean, r.low, r.high, len(xs)))
    return out


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
    """answer.png, answer.md and differences.md in `out` from the comparison directories
    `sources` (directory, label); directories with one label are merged (see `merged`)."""
    groups: dict[str, list[Path]] = {}
    for directory, label in sources:
        groups.setdefault(label, []).append(directory)
    scores: list[Score] = []
    shifts: list[Shift] = []
    base: dict[str, float] = {}
    for label, directories in groups.items():
        items, floor = merged(directories)
        scores += _scores(items, label)
        shifts += differences(items, label, DIFFERENCES)
        base.update({f"{t}, {label}": v for t, v in floor.items()})
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
    rows = [
        "| task, setting | difference | points | 95% interval | seeds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for d in shifts:
        name = f"{_label(d.a)} - {_label(d.b)}"
        rows.append(
            f"| {d.panel} | {name} | {d.mean:+.1f} | [{d.low:+.1f}, {d.high:+.1f}] | {d.seeds} |"
        )
    diff = out / "differences.md"
    diff.write_text("\n".join(rows) + "\n")
    return {"figure": png, "table": md, "differences": diff}


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
    print(f"written: {paths['figure']}, {paths['table']} and {paths['differences']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
