"""What a comparison grid says about the paper's claims, as numbers and verdicts (no formatting).

Every difference is paired: the methods of a grid answer the same test items (the split is the
grid seed's for every training seed), so a difference is averaged over the (seed, item) pairs
both methods share and its 95% interval comes from resampling seeds and items together
(`molf.experiments.stats.paired_difference_seeds`). A verdict reads the interval.

Before any claim, the floor: a task where no method got at least `LEARNED_POINTS` points past
its floor (the chance level of a multiple-choice task, else the untrained model's score) did
not learn at this budget, and no claim is judged on it. Then:

- who wins between FFT and LoRA per task (the paper's premise: the winner flips);
- claim 1: MoLF within `CLAIM_TOLERANCE_POINTS` of the better of FFT and LoRA on every task;
- claim 2: MoLF-E ahead of AdaLoRA on every task, and how its lead compares with the paper's
  reported magnitudes (`PAPER_CLAIM2_POINTS`), judged only against an AdaLoRA that trains about
  as well as plain LoRA;
- what MoLF-E's routing adds over a plain LoRA of its parameter count (no verdict).

Which method plays which part comes from the method registry (`molf.train.methods.ROLES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from molf.experiments.grid import CellRecord, Results, read_json
from molf.experiments.stats import PairedDifference, align, paired_difference_seeds
from molf.train import methods as registry

__all__ = [
    "CLAIM_TOLERANCE_POINTS",
    "LEARNED_POINTS",
    "PAPER_CLAIM2_POINTS",
    "Difference",
    "Floor",
    "cell_items",
    "claims",
    "difference",
    "floors",
    "standard_error",
]

TEST_ITEMS = "test_items.json"  # per-item headline scores a finished cell writes
CLAIM_TOLERANCE_POINTS = 1.5  # claim 1: MoLF within this many points of max(FFT, LoRA)
LEARNED_POINTS = 15.0  # a task learned when its best method is this far past its floor
# claim 2's reported lead of MoLF-E over adaptive LoRA, per task family ("up to", in points)
PAPER_CLAIM2_POINTS = {"fact": 20.0, "med": 9.0, "sql": 9.0, "world-sql": 9.0}


@dataclass(frozen=True)
class Difference:
    """Method a minus method b on one task, in points: the mean scores' difference and, where
    both kept per-item scores, the paired difference over their shared seeds and items."""

    task: str
    a: str
    b: str
    value: float | None
    paired: PairedDifference | None = None
    # the two methods' scores the value is the difference of: with per-item scores, their means
    # over the seeds both ran (the seeds the interval resamples), else each method's mean score
    score_a: float | None = None
    score_b: float | None = None

    def above(self, line: float) -> bool | None:
        """True when the difference lies above `line` (the whole interval, if there is one),
        False when it lies at or below it, None when the interval crosses it (or no value)."""
        if self.value is None:
            return None
        if self.paired is None:
            return self.value > line
        if self.paired.low > line:
            return True
        if self.paired.high <= line:
            return False
        return None


@dataclass(frozen=True)
class Floor:
    """Where a task's score starts and whether any method left it at this budget."""

    task: str
    kind: str  # "chance" (multiple choice) or "base model"
    value: float | None
    best: float | None
    best_method: str | None

    @property
    def learned(self) -> bool:
        return (
            self.value is not None
            and self.best is not None
            and self.best >= self.value + LEARNED_POINTS
        )


def cell_items(cell: CellRecord | None) -> dict[str, float] | None:
    """A finished cell's per-item test scores on the headline (`test_items.json`), in points
    (0-100); None for a cell without them (a run from before molf wrote them)."""
    if cell is None or cell.status != "done":
        return None
    data = read_json(cell.directory / TEST_ITEMS)
    items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(items, dict) or not items:
        return None
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in items.values()):
        return None
    return {str(k): 100.0 * float(v) for k, v in items.items()}


def seed_items(res: Results, task: str, method: str) -> dict[int, dict[str, float]]:
    """{training seed: per-item test scores} of the chosen candidate's finished runs."""
    out = {}
    for cell in res.replicas.get((task, method), []):
        items = cell_items(cell)
        if items is not None:
            out[cell.seed if cell.seed is not None else -1] = items
    return out


def difference(res: Results, task: str, a: str | None, b: str | None) -> Difference:
    """a minus b on `task`, paired over the seeds both ran: the value, both scores and the
    interval all come from those seeds (a method with an extra seed does not shift the value
    while the interval ignores it). Without per-item scores: the methods' mean scores."""
    if a is None or b is None:
        return Difference(task, a or "?", b or "?", None)
    score_a, score_b = res.score(task, a), res.score(task, b)
    if score_a is None or score_b is None:
        return Difference(task, a, b, None)
    unpaired = Difference(task, a, b, score_a - score_b, None, score_a, score_b)
    items_a, items_b = seed_items(res, task, a), seed_items(res, task, b)
    shared = sorted(set(items_a) & set(items_b))
    if not shared:
        return unpaired
    xs, ys = [], []
    for s in shared:
        _, x, y = align(items_a[s], items_b[s])
        xs.append(x)
        ys.append(y)
    if len(xs[0]) < 2:
        return unpaired
    paired = paired_difference_seeds(xs, ys, seed=0)
    mean_a = sum(map(sum, xs)) / (len(xs) * len(xs[0]))
    mean_b = sum(map(sum, ys)) / (len(ys) * len(ys[0]))
    return Difference(task, a, b, paired.mean, paired, mean_a, mean_b)


def floors(res: Results) -> dict[str, Floor]:
    """Each task's floor and best method (by mean test score)."""
    out = {}
    for t in res.tasks:
        chance = res.chance(t)
        kind, value = (
            ("chance", 100.0 * chance) if chance is not None else ("base model", res.base(t))
        )
        scored = [(res.score(t, m), m) for m in res.methods if res.score(t, m) is not None]
        best, best_method = max(scored) if scored else (None, None)
        out[t] = Floor(t, kind, value, best, best_method)
    return out


def _verdict(diffs: dict[str, Difference], line: float) -> dict[str, Any]:
    """HELD when every task's difference lies above `line`; NOT HELD when one lies at or below;
    NOT RESOLVED when an interval crosses it (and none failed); NOT JUDGED when a task lacks a
    score or there is no task to judge."""
    failed = [t for t, d in diffs.items() if d.above(line) is False]
    unresolved = [t for t, d in diffs.items() if d.value is not None and d.above(line) is None]
    missing = [t for t, d in diffs.items() if d.value is None]
    if failed:
        word = "NOT HELD"
    elif unresolved and not missing:
        word = "NOT RESOLVED"
    elif missing or not diffs:
        word = "NOT JUDGED"
    else:
        word = "HELD"
    return {"verdict": word, "failed": failed, "unresolved": unresolved, "missing": missing}


@dataclass
class Claims:
    """Everything the report's claims section shows."""

    floors: dict[str, Floor]
    judged: list[str]  # the tasks that learned: claims are judged on these only
    fft_vs_lora: dict[str, Difference]
    winners: dict[str, str]
    claim1: dict[str, Any]
    molf_gap: dict[str, Difference]
    claim2: dict[str, Any]
    efficient_vs_adaptive: dict[str, Difference]
    adaptive_vs_lora: dict[str, Difference]
    magnitudes: dict[str, str]
    same_size: list[Difference] = field(default_factory=list)


def _winner(d: Difference) -> str:
    """Who wins between FFT and LoRA on a task, from FFT - LoRA."""
    if d.value is None:
        return "n/a"
    if d.above(0.0) is True:
        return "FFT"
    if (d.paired is not None and d.paired.high < 0.0) or (d.paired is None and d.value < 0):
        return "LoRA"
    if d.paired is not None and d.paired.high < CLAIM_TOLERANCE_POINTS:
        return "LoRA matches"  # LoRA is not behind by more than the claims' margin
    return "not resolved"


def _magnitude(d: Difference, paper: float | None) -> str:
    """Where MoLF-E's lead over AdaLoRA stands against the paper's reported lead."""
    if paper is None or d.value is None:
        return "n/a"
    if d.paired is None:
        return "above" if d.value > paper else "below"
    if d.paired.high < paper:
        return "below"
    if d.paired.low > paper:
        return "above"
    return "consistent"


def claims(res: Results) -> Claims:
    """The floors, the FFT/LoRA winners, both claims and the same-size comparison (module
    docstring), from the grid's chosen cells and their seeds."""
    role = {r: registry.with_role(r, res.methods) for r in registry.ROLES}
    fl = floors(res)
    judged = [t for t in res.point_tasks() if fl[t].learned]
    fft_vs_lora = {t: difference(res, t, role["full"], role["lora"]) for t in judged}
    molf_gap = {}
    for t in judged:
        fft, lora = res.score(t, role["full"] or ""), res.score(t, role["lora"] or "")
        best = None
        if fft is not None and lora is not None:
            best = role["full"] if fft >= lora else role["lora"]
        molf_gap[t] = difference(res, t, role["mixture"], best)
    efficient = {t: difference(res, t, role["efficient"], role["adaptive"]) for t in judged}
    adaptive = {t: difference(res, t, role["adaptive"], role["lora"]) for t in judged}
    claim2 = _verdict(efficient, 0.0)
    # "about as well as LoRA" is judged on the difference itself: a baseline 7 points behind is
    # not about as good even when the test set cannot prove the gap
    weak = [
        t
        for t, d in adaptive.items()
        if d.value is not None
        and d.value < -CLAIM_TOLERANCE_POINTS
        and efficient[t].value is not None
    ]
    claim2["weak_baseline"] = weak
    if weak and claim2["verdict"] != "NOT HELD":
        claim2["verdict"] = "NOT JUDGED"
    same_size = []
    if role["same_size"]:
        for t in res.tasks:
            for r in ("efficient", "efficient_variant"):
                if role[r]:
                    same_size.append(difference(res, t, role[r], role["same_size"]))
    return Claims(
        floors=fl,
        judged=judged,
        fft_vs_lora=fft_vs_lora,
        winners={t: _winner(d) for t, d in fft_vs_lora.items()},
        claim1=_verdict(molf_gap, -CLAIM_TOLERANCE_POINTS),
        molf_gap=molf_gap,
        claim2=claim2,
        efficient_vs_adaptive=efficient,
        adaptive_vs_lora=adaptive,
        magnitudes={
            t: _magnitude(d, PAPER_CLAIM2_POINTS.get(res.family(t))) for t, d in efficient.items()
        },
        same_size=same_size,
    )


def standard_error(points: float | None, n: int | None) -> float | None:
    """Binomial standard error, in points, of a score of `points` percent over n test records:
    how far the same method could land on another test sample of this size."""
    if points is None or not n:
        return None
    p = min(max(points / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)
