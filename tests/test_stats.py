"""Paired statistics of the comparison report (molf.experiments.stats)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from molf.errors import MolfError
from molf.experiments.stats import align, paired_difference, paired_difference_seeds


def test_paired_error_is_the_std_of_differences():
    a = [1, 1, 0, 1, 0, 1, 1, 0]
    b = [1, 0, 0, 1, 0, 1, 0, 0]
    d = np.array(a, float) - np.array(b, float)
    r = paired_difference(a, b)
    assert r.n == 8
    assert r.mean == pytest.approx(0.25)
    assert r.se == pytest.approx(d.std(ddof=1) / math.sqrt(8))
    assert r.low <= r.mean <= r.high


def test_agreeing_methods_have_a_much_smaller_paired_error_than_independent_ones():
    rng = np.random.default_rng(1)
    a = (rng.random(400) < 0.6).astype(float)
    b = a.copy()
    flip = rng.choice(400, size=12, replace=False)  # the methods disagree on 3% of the items
    b[flip] = 1 - b[flip]
    paired = paired_difference(a, b).se
    independent = math.sqrt(a.mean() * (1 - a.mean()) / 400 + b.mean() * (1 - b.mean()) / 400)
    assert paired < independent / 3


def test_identical_scores_give_a_zero_width_interval():
    r = paired_difference([1, 0, 1, 1], [1, 0, 1, 1])
    assert (r.mean, r.se, r.low, r.high) == (0.0, 0.0, 0.0, 0.0)
    assert r.excludes_below(0.015)


def test_bootstrap_is_repeatable_and_covers_the_mean():
    rng = np.random.default_rng(2)
    a, b = rng.random(50), rng.random(50)
    r1, r2 = paired_difference(a, b, seed=3), paired_difference(a, b, seed=3)
    assert r1 == r2
    assert r1.low < r1.mean < r1.high
    # the percentile interval is close to mean +- 1.96 se for a sum of 50 bounded values
    assert r1.high - r1.low == pytest.approx(2 * 1.96 * r1.se, rel=0.15)


def test_excludes_below_reads_the_lower_end():
    r = paired_difference([1, 1, 1, 0] * 10, [1, 1, 0, 0] * 10)
    assert r.excludes_below(0.0)
    r = paired_difference([1, 1, 0, 0] * 10, [1, 1, 1, 0] * 10)
    assert not r.excludes_below(0.1)


@pytest.mark.parametrize(
    "a, b, match",
    [
        ([1, 0], [1], "2 scores against 1"),
        ([1], [1], "at least 2"),
        ([1, float("nan")], [1, 0], "not finite"),
    ],
)
def test_bad_input_is_named(a, b, match):
    with pytest.raises(MolfError, match=match):
        paired_difference(a, b)


def test_align_pairs_by_item_and_refuses_different_items():
    ids, a, b = align({"q2": 1.0, "q1": 0.0}, {"q1": 1.0, "q2": 1.0})
    assert (ids, a, b) == (["q1", "q2"], [0.0, 1.0], [1.0, 1.0])
    with pytest.raises(MolfError, match="test items differ"):
        align({"q1": 1.0}, {"q2": 1.0})


def test_seed_and_item_bootstrap():
    rng = np.random.default_rng(4)
    a = [(rng.random(300) < 0.7).astype(float) for _ in range(3)]
    b = [(rng.random(300) < 0.6).astype(float) for _ in range(3)]
    r = paired_difference_seeds(a, b)
    d = np.asarray(a) - np.asarray(b)
    assert r.seeds == 3 and r.n == 300 and r.mean == pytest.approx(d.mean())
    assert r.low < r.mean < r.high and r.half_width == pytest.approx((r.high - r.low) / 2)
    assert paired_difference_seeds(a, b) == r  # repeatable
    # one seed is the item bootstrap
    assert paired_difference_seeds(a[:1], b[:1]) == paired_difference(a[0], b[0])
    # seeds that disagree widen the interval: the same items, one seed shifted by 20 points
    shifted = [x.copy() for x in a]
    shifted[2][: int(0.2 * 300)] = 1.0
    shifted[0][: int(0.2 * 300)] = 0.0
    assert paired_difference_seeds(shifted, b).half_width > r.half_width
    with pytest.raises(MolfError, match="seeds against"):
        paired_difference_seeds(a, b[:2])
    with pytest.raises(MolfError, match="different numbers of items"):
        paired_difference_seeds([a[0], a[1][:10]], [b[0], b[1][:10]])


# -- against a slow, obvious bootstrap --------------------------------------------------------------
def _brute_force(d: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """The seed-and-item bootstrap written out: each resample draws seeds with replacement and
    items with replacement, the same items for every drawn seed, and averages d over them."""
    rng = np.random.default_rng(seed)
    n_seeds, n = d.shape
    means = []
    for _ in range(resamples):
        seeds = [int(rng.integers(0, n_seeds)) for _ in range(n_seeds)]
        items = [int(rng.integers(0, n)) for _ in range(n)]
        per_seed = [sum(d[s, i] for i in items) / n for s in seeds]
        means.append(sum(per_seed) / n_seeds)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def _items_never_resampled(d: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = d.mean(axis=1)[rng.integers(0, d.shape[0], size=(resamples, d.shape[0]))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def _items_drawn_per_seed(d: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n_seeds, n = d.shape
    means = [
        np.mean(
            [d[s][rng.integers(0, n, size=n)].mean() for s in rng.integers(0, n_seeds, n_seeds)]
        )
        for _ in range(resamples)
    ]
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def _agrees(interval: tuple[float, float], reference: tuple[float, float]) -> bool:
    """Within Monte Carlo error of the reference (bounds within 1.5 points, half-widths within
    10%): a few thousand resamples pin a 95% interval's ends to about half a point here."""
    (low, high), (ref_low, ref_high) = interval, reference
    widths = (high - low) / (ref_high - ref_low)
    return abs(low - ref_low) <= 1.5 and abs(high - ref_high) <= 1.5 and 0.9 <= widths <= 1.1


def _three_seeds_of_items() -> np.ndarray:
    """Per-item differences in points, 3 seeds x 200 items, whose items matter (each item's
    difference is much the same on every seed) and whose seeds disagree a little."""
    rng = np.random.default_rng(7)
    n = 200
    item = rng.normal(0.0, 1.0, n)
    base = (rng.random(n) < 0.5).astype(float)
    runs = [
        (item + rng.normal(0.0, 0.5, n) + shift > 0.3).astype(float) for shift in (0, 0.2, -0.2)
    ]
    return 100.0 * (np.stack(runs) - base)


def test_the_seed_bootstrap_matches_a_brute_force_one_and_its_faults_do_not():
    d = _three_seeds_of_items()
    r = paired_difference_seeds(list(d), list(np.zeros_like(d)))
    reference = _brute_force(d, resamples=4000, seed=1)
    assert r.mean == pytest.approx(d.mean())
    assert _agrees((r.low, r.high), reference), ((r.low, r.high), reference)
    # the two faults this test exists for: items never resampled, or drawn afresh per seed
    assert not _agrees(_items_never_resampled(d, 4000, 2), reference)
    assert not _agrees(_items_drawn_per_seed(d, 4000, 3), reference)


def test_exact_cases_of_the_seed_bootstrap():
    rng = np.random.default_rng(0)
    a = [(rng.random(50) < 0.6).astype(float) * 100 for _ in range(3)]
    same = paired_difference_seeds(a, a)
    assert (same.mean, same.low, same.high, same.se) == (0.0, 0.0, 0.0, 0.0)
    shifted = paired_difference_seeds([x + 5.0 for x in a], a)
    assert shifted.mean == pytest.approx(5.0)
    assert shifted.low == pytest.approx(5.0) and shifted.high == pytest.approx(5.0)
    assert shifted.se == pytest.approx(0.0, abs=1e-9)


def _committed_items() -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    from pathlib import Path

    from molf.experiments.answer import read_items

    return read_items(Path(__file__).resolve().parents[1] / "docs" / "results")


@pytest.mark.parametrize(
    "task,a,b,shown",
    [
        ("med-icd10", "fft", "lora", "| -0.3 | [-2.8, +2.3] | 2.6 | 3 |"),
        ("med-icd10", "molf", "lora", "| -0.9 | [-3.6, +1.8] | 2.7 | 3 |"),
        ("med-icd10", "molf-e", "adalora", "| -1.0 | [-3.4, +1.4] | 2.4 | 3 |"),
    ],
)
def test_the_committed_report_s_intervals_come_from_its_items(task, a, b, shown):
    """The published report's paired intervals are recomputed from the committed per-item
    scores (docs/results/items.csv) exactly: any change to the bootstrap's numbers shows."""
    from pathlib import Path

    items = _committed_items()
    seeds = sorted(set(items[(task, a)]) & set(items[(task, b)]))
    xs, ys = [], []
    for s in seeds:
        _, x, y = align(items[(task, a)][s], items[(task, b)][s])
        xs.append(x)
        ys.append(y)
    r = paired_difference_seeds(xs, ys, seed=0)
    row = f"| {r.mean:+.1f} | [{r.low:+.1f}, {r.high:+.1f}] | {r.half_width:.1f} | {r.seeds} |"
    assert row == shown
    report = (Path(__file__).resolve().parents[1] / "docs" / "results" / "report.md").read_text()
    assert f"| {task} |" in report and shown in report


def test_every_item_and_seed_can_be_drawn():
    # only item 0 differs: a bootstrap that never draws item 0 would give [0, 0]
    one_seed = paired_difference([100.0, 0.0], [0.0, 0.0])
    assert (one_seed.low, one_seed.high) == (0.0, 100.0)
    two_seeds = paired_difference_seeds([[100.0, 0.0], [100.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]])
    assert (two_seeds.low, two_seeds.high) == (0.0, 100.0)
    # only seed 0 differs: a bootstrap that never draws seed 0 would give [0, 0]
    by_seed = paired_difference_seeds([[100.0, 100.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]])
    assert (by_seed.low, by_seed.high) == (0.0, 100.0)


def test_settings_reach_the_one_seed_case_and_the_result():
    rng = np.random.default_rng(3)
    a, b = (rng.random(40) < 0.6).astype(float), (rng.random(40) < 0.5).astype(float)
    for kwargs in ({"seed": 5}, {"level": 0.5}, {"resamples": 300}):
        assert paired_difference_seeds([a], [b], **kwargs) == paired_difference(a, b, **kwargs)
    assert paired_difference_seeds([a], [b], seed=5) != paired_difference_seeds([a], [b], seed=0)
    assert paired_difference(a, b).level == 0.95
    assert paired_difference_seeds([a, b], [b, a], level=0.8).level == 0.8
    # another level is another pair of percentiles: 80% against the brute force too
    d = _three_seeds_of_items()
    r = paired_difference_seeds(list(d), list(np.zeros_like(d)), level=0.8)
    rng2 = np.random.default_rng(11)
    means = []
    for _ in range(4000):
        seeds = rng2.integers(0, 3, 3)
        items = rng2.integers(0, d.shape[1], d.shape[1])
        means.append(np.mean([d[s, items].mean() for s in seeds]))
    assert _agrees((r.low, r.high), tuple(np.quantile(means, [0.1, 0.9])))


@pytest.mark.parametrize("level", [0.0, 1.0, 1.5])
def test_a_level_outside_0_1_is_refused(level):
    with pytest.raises(MolfError, match=r"level must be in \(0, 1\)"):
        paired_difference([1.0, 0.0], [0.0, 0.0], level=level)
    with pytest.raises(MolfError, match=r"level must be in \(0, 1\)"):
        paired_difference_seeds([[1.0, 0.0]] * 2, [[0.0, 0.0]] * 2, level=level)


def test_input_problems_are_named():
    two = paired_difference_seeds([[1.0, 0.0]] * 2, [[0.0, 0.0]] * 2)  # two items are enough
    assert two.n == 2 and two.seeds == 2
    with pytest.raises(MolfError, match="needs at least 2 shared items per seed"):
        paired_difference_seeds([[1.0], [0.0]], [[0.0], [0.0]])
    with pytest.raises(MolfError, match="a per-item score is not finite"):
        paired_difference_seeds([[1.0, math.nan]] * 2, [[0.0, 0.0]] * 2)
    with pytest.raises(MolfError, match="a per-item score is not finite"):
        paired_difference([1.0, math.inf], [0.0, 0.0])
    with pytest.raises(MolfError, match="the seeds answered different numbers of items"):
        paired_difference_seeds([[1.0, 0.0], [1.0, 0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0, 0.0]])


def test_excludes_below_is_strict_at_the_margin():
    at = paired_difference([0.0, 0.0], [1.5, 1.5])  # low == high == -1.5
    assert at.low == -1.5 and not at.excludes_below(1.5) and at.excludes_below(1.6)


def _comparison(where, rows, base, overrides=()):
    """A minimal comparison directory: items.csv rows (task, method, seed, item, score), the
    untrained model's scores in results.csv and the grid's settings in grid.json."""
    import json

    where.mkdir()
    grid = {"model": "m", "budget": "small", "seed": 0, "overrides": list(overrides)}
    (where / "grid.json").write_text(json.dumps(grid))
    lines = ["task,method,seed,item,score"] + [",".join(map(str, r)) for r in rows]
    (where / "items.csv").write_text("\n".join(lines) + "\n")
    tasks = sorted(base)
    header = ",".join(["method", *tasks, "mean"])
    values = ",".join(["base", *(f"{base[t]:.4f}" for t in tasks), "0"])
    (where / "results.csv").write_text(f"{header}\n{values}\n")
    return where


def test_directories_of_one_setting_share_a_panel_and_are_paired_item_by_item(tmp_path):
    """A grid of ablations beside the grid it extends: same label, one panel, paired
    differences across the two files; a method in both, or a different untrained score, is
    refused (the items would not be the same)."""
    from molf.experiments.answer import DIFFERENCES, differences, merged, write_answer

    first = [
        ("t", m, s, f"{i:02d}", int(i % 2 == 0))
        for m in ("molf", "lora")
        for s in (0, 1)
        for i in range(10)
    ]
    # the hybrid gets exactly the items MoLF missed on seed 1: +50 points on seed 1, 0 on seed 0
    later = [
        ("t", "hybrid", s, f"{i:02d}", int(i % 2 == 0 or s == 1)) for s in (0, 1) for i in range(10)
    ]
    a = _comparison(tmp_path / "a", first, {"t": 20.0})
    b = _comparison(tmp_path / "b", later, {"t": 20.0})
    items, base = merged([a, b])
    assert base == {"t": 20.0} and {m for _, m in items} == {"molf", "lora", "hybrid"}
    (shift,) = [d for d in differences(items, "x", DIFFERENCES) if (d.a, d.b) == ("hybrid", "molf")]
    assert (shift.b, shift.mean, shift.seeds) == ("molf", 25.0, 2)
    # a quarter of the resamples draw seed 0 twice (a difference of exactly 0)
    assert shift.low == 0.0 and shift.high > 25.0
    paths = write_answer(tmp_path / "out", [(a, "x"), (b, "x")])
    assert "| t, x | Fixed hybrid - MoLF | +25.0 |" in paths["differences"].read_text()
    assert paths["table"].read_text().count("| t, x | untrained model |") == 1
    with pytest.raises(MolfError, match="in two directories of one setting"):
        merged([a, _comparison(tmp_path / "c", first[:10], {"t": 20.0})])
    with pytest.raises(MolfError, match="not the same test items"):
        merged([a, _comparison(tmp_path / "d", later, {"t": 21.0})])
    other = _comparison(tmp_path / "e", later, {"t": 20.0}, overrides=["lora_rank=8"])
    with pytest.raises(
        MolfError, match=r"different settings \(overrides: \[\] vs \['lora_rank=8'\]\)"
    ):
        merged([a, other])
    (b / "grid.json").unlink()
    with pytest.raises(MolfError, match="has no grid.json"):
        merged([a, b])
    apart = {("t", "hybrid"): {5: {"00": 1.0}}, ("t", "molf"): {0: {"00": 1.0}}}
    with pytest.raises(
        MolfError, match=r"no training seed in common to pair \(seeds \[5\] and \[0\]\)"
    ):
        differences(apart, "x", DIFFERENCES)
