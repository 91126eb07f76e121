"""Paired statistics for method comparisons on one test set, over one or several seeds.

Every method of a comparison answers the same test items, so the question "is MoLF within 1.5
points of the better baseline?" is about the per-item differences, not about two independent
scores: an item both methods get right (or both wrong) carries no evidence either way. The
paired standard error uses that and is much smaller than the two binomial errors added up
whenever the methods agree on most items. The bootstrap interval resamples items (not methods),
so it keeps the pairing too and makes no normality assumption.

With several training seeds (`paired_difference_seeds`) the bootstrap resamples seeds and items
together: each resample draws seeds with replacement and items with replacement and averages
the per-item differences over both, so the interval covers how much a method's score moves from
one training run to the next, not only which items the test sample happened to hold.
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
    seeds: int = 1

    @property
    def half_width(self) -> float:
        """Half the interval's width: how far, give or take, the mean could move."""
        return (self.high - self.low) / 2.0

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


def paired_difference_seeds(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    *,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """The paired difference a - b over seeds and items: `a[s][i]` is the score of seed s (of
    method a) on item i, and b is laid out the same way (seed s of both methods is paired, as
    is item i). One seed is `paired_difference`.

    The mean is over every (seed, item); the interval is the percentile bootstrap that draws
    seeds and items with replacement in every resample (the same items for every drawn seed),
    and `se` the bootstrap standard deviation. With one seed this is the item bootstrap, whose
    `se` is close to the paired standard error."""
    if len(a) != len(b) or not a:
        raise MolfError(f"paired difference: {len(a)} seeds against {len(b)}; pair them first")
    if len(a) == 1:
        return paired_difference(a[0], b[0], level=level, resamples=resamples, seed=seed)
    try:
        d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    except ValueError:
        raise MolfError(
            "paired difference: the seeds answered different numbers of items"
        ) from None
    if d.ndim != 2 or d.shape[1] < 2:
        raise MolfError("paired difference: needs at least 2 shared items per seed")
    if not 0.0 < level < 1.0:
        raise MolfError(f"paired difference: level must be in (0, 1), got {level}")
    if not np.isfinite(d).all():
        raise MolfError("paired difference: a per-item score is not finite")
    n_seeds, n = d.shape
    rng = np.random.default_rng(seed)
    items = rng.integers(0, n, size=(resamples, n))
    seeds = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    # each seed's mean over each resample's items, then the drawn seeds' average of those
    per_seed = np.stack([d[s][items].mean(axis=1) for s in range(n_seeds)])  # [seeds, resamples]
    means = per_seed[seeds, np.arange(resamples)[:, None]].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedDifference(
        n, float(d.mean()), float(means.std(ddof=1)), float(low), float(high), level, n_seeds
    )


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
