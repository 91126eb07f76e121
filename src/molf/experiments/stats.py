"""Paired statistics for method comparisons on one test set.

Every method of a comparison answers the same test items, so the question "is MoLF within 1.5
points of the better baseline?" is about the per-item differences, not about two independent
scores: an item both methods get right (or both wrong) carries no evidence either way. The
paired standard error uses that and is much smaller than the two binomial errors added up
whenever the methods agree on most items. The bootstrap interval resamples items (not methods),
so it keeps the pairing too and makes no normality assumption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from molf.errors import MolfError


@dataclass(frozen=True)
class PairedDifference:
    """Mean of a - b over the shared items, in the scores' own unit, with its uncertainty."""

    n: int
    mean: float
    se: float
    low: float
    high: float
    level: float

    def excludes_below(self, margin: float) -> bool:
        """Whether the whole interval lies above -margin (a is not worse than b by margin)."""
        return self.low > -margin


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """The paired difference a - b of two methods' per-item scores on the same items.

    `se` is the paired standard error std(d) / sqrt(n); (`low`, `high`) is the percentile
    bootstrap interval of the mean difference at `level` (items resampled with replacement,
    `resamples` times, from a fixed `seed`, so a report rebuilt from the same files repeats it).
    """
    if len(a) != len(b):
        raise MolfError(f"paired difference: {len(a)} scores against {len(b)}; the items differ")
    if len(a) < 2:
        raise MolfError(f"paired difference: needs at least 2 shared items, got {len(a)}")
    if not 0.0 < level < 1.0:
        raise MolfError(f"paired difference: level must be in (0, 1), got {level}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if not np.isfinite(d).all():
        raise MolfError("paired difference: a per-item score is not finite")
    n = d.size
    se = float(d.std(ddof=1) / math.sqrt(n))
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedDifference(n, float(d.mean()), se, float(low), float(high), level)


def align(a: dict[str, float], b: dict[str, float]) -> tuple[list[str], list[float], list[float]]:
    """The items both score maps share (sorted ids) and their scores, for `paired_difference`.

    Refuses maps whose item sets differ: two cells evaluated on different test items cannot be
    paired, and silently dropping items would hide a broken comparison."""
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise MolfError(
            f"paired difference: the test items differ ({len(only_a)} only in the first, e.g. "
            f"{only_a[:3]}; {len(only_b)} only in the second, e.g. {only_b[:3]})"
        )
    ids = sorted(a)
    return ids, [a[i] for i in ids], [b[i] for i in ids]
