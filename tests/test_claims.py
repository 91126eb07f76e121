"""The report's claims (molf.experiments.claims): floors, FFT against LoRA, both paper claims,
on synthetic cells with per-item scores over one or several training seeds."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from molf.experiments.claims import Difference, _magnitude, _winner, claims, difference
from molf.experiments.grid import load_results
from molf.experiments.stats import PairedDifference
from molf.experiments.tables import claim_lines, write_results

TASK_NAMES = {"fact-geo": "fact-geo", "med-icd10": "med-icd10", "sql": "world-sql"}


def _cell(root, task, method, scores, seed=None, before=0.0):
    """A finished cell with per-item scores; seed None: the grid seed's learning-rate candidate,
    else `<method>/seed-<seed>/lr-5e-5`, the chosen candidate trained with another seed."""
    group = root / "cells" / task / method
    d = group / "lr-5e-5" if seed is None else group / f"seed-{seed}" / "lr-5e-5"
    d.mkdir(parents=True)
    summary = {
        "method": method,
        "task": task,
        "headline_metric": "accuracy",
        "before": {"accuracy": before},
        "after": {"accuracy": sum(scores) / len(scores)},
        "validation": {"accuracy": 0.5},
        "n_test_records": len(scores),
        "config": {"lr_lora": 5e-5, "task": TASK_NAMES.get(task, task), "seed": seed or 0},
    }
    (d / "summary.json").write_text(json.dumps(summary))
    items = {f"{i:06d}": float(v) for i, v in enumerate(scores)}
    (d / "test_items.json").write_text(json.dumps({"metric": "accuracy", "items": items}))


def test_claims_are_judged_on_paired_intervals(tmp_path):
    n = 400
    rng = np.random.default_rng(0)
    base = (rng.random(n) < 0.6).astype(float).tolist()
    base[4:8] = [1.0, 1.0, 0.0, 0.0]  # MoLF-E's four extra flips: two gained, two lost
    flip = lambda xs, k: [1.0 - x if i < k else x for i, x in enumerate(xs)]  # noqa: E731
    # fft is the better baseline; MoLF agrees with it on all but 2 items (a paired gap within
    # +-1 point); LoRA is 40 items worse. MoLF-E and AdaLoRA differ on 4 items in both ways
    wrong_first = sorted(range(n), key=lambda i: base[i], reverse=True)
    molf = [1.0 - base[i] if i in wrong_first[:2] else base[i] for i in range(n)]
    lora = [0.0 if i in wrong_first[:40] else base[i] for i in range(n)]
    methods_ = {
        "fft": base,
        "lora": lora,
        "molf": molf,
        "adalora": flip(base, 4),
        "molf-e": flip(base, 8),
    }
    for m, sc in methods_.items():
        _cell(tmp_path, "fact-geo", m, sc)
    res = load_results(tmp_path, ["fact-geo"], list(methods_))
    c = claims(res)
    gap = c.molf_gap["fact-geo"]
    assert gap.b == "fft" and gap.paired.n == n and gap.paired.seeds == 1
    assert gap.paired.mean == pytest.approx(-0.5)  # two items lost, 0.25 points each
    assert gap.paired.low > -1.5 and c.claim1["verdict"] == "HELD"
    assert c.winners["fact-geo"] == "FFT"  # 40 items ahead of LoRA
    # MoLF-E vs AdaLoRA: items 4..7 differ either way; the interval crosses 0
    assert c.claim2["verdict"] == "NOT RESOLVED" and c.claim2["unresolved"] == ["fact-geo"]
    text = "\n".join(claim_lines(res, c))
    assert f"[{gap.paired.low:+.1f}, {gap.paired.high:+.1f}]" in text
    assert "**Claim 1: HELD**." in text and "**Claim 2: NOT RESOLVED**" in text
    # AdaLoRA is 36 points ahead of LoRA here: a fair baseline
    assert c.adaptive_vs_lora["fact-geo"].paired.low > 0 and not c.claim2["weak_baseline"]


def test_claim_2_is_not_judged_against_an_adalora_weaker_than_lora(tmp_path):
    base = [1.0] * 150 + [0.0] * 50
    ada = [0.0 if i < 30 else x for i, x in enumerate(base)]  # 15 points behind LoRA
    methods_ = {
        "fft": base,
        "lora": base,
        "molf": base,
        "adalora": ada,
        "molf-e": base,  # 15 points ahead of AdaLoRA, but only as good as LoRA
        "lora-160": base,
        "molf-e-k2": ada,
    }
    for m, sc in methods_.items():
        _cell(tmp_path, "fact-geo", m, sc)
    # med-icd10: AdaLoRA 4 of 200 items behind LoRA (-2.0), a gap this test set cannot prove,
    # but not "about as well as LoRA" either; sql: 2 items behind (-1.0), fair
    for task, lost in (("med-icd10", 4), ("sql", 2)):
        for m in methods_:
            _cell(tmp_path, task, m, [0.0] * lost + base[lost:] if m == "adalora" else base)
    tasks = ["fact-geo", "med-icd10", "sql"]
    res = load_results(tmp_path, tasks, list(methods_))
    c = claims(res)
    assert c.efficient_vs_adaptive["fact-geo"].paired.low > 0  # MoLF-E is clearly ahead
    assert c.adaptive_vs_lora["fact-geo"].value == -15.0
    med = c.adaptive_vs_lora["med-icd10"].paired
    assert med.low < -1.5 < med.high  # the interval crosses the margin: judged on -2.0 itself
    assert c.claim2["verdict"] == "NOT JUDGED"
    assert c.claim2["weak_baseline"] == ["fact-geo", "med-icd10"]
    # the paper's magnitudes: SQL's +9 lies above MoLF-E's +1.0 lead there; Fact's +20 is
    # inside or above fact-geo's +15 interval, as its upper end says
    assert res.family("sql") == "world-sql" and c.magnitudes["sql"] == "below"
    fact = c.efficient_vs_adaptive["fact-geo"].paired
    assert c.magnitudes["fact-geo"] == ("consistent" if fact.high >= 20 else "below")
    text = "\n".join(claim_lines(res, c))
    assert "AdaLoRA trails plain LoRA by more than the margin on fact-geo, med-icd10" in text
    assert "| sql | 75.0 | 74.0 | +1.0 |" in text and "| +9.0 | below |" in text
    # what the routing adds over a LoRA of MoLF-E's size: one paired row per MoLF-E variant
    assert "## What MoLF-E's routing adds over a LoRA of its size" in text
    assert "| fact-geo | MoLF-E (top-2) | 60.0 | 75.0 | -15.0 |" in text


def test_a_task_that_left_no_floor_is_not_judged(tmp_path):
    # med: 4 options, chance 25; every method at 30 (6 of 20 items): nothing learned
    for m in ("fft", "lora", "molf"):
        _cell(tmp_path, "med-icd10", m, [1.0] * 6 + [0.0] * 14, before=0.3)
    # fact: base 10, FFT 60 and LoRA 30: learned
    _cell(tmp_path, "fact-geo", "fft", [1.0] * 12 + [0.0] * 8, before=0.1)
    _cell(tmp_path, "fact-geo", "lora", [1.0] * 6 + [0.0] * 14, before=0.1)
    _cell(tmp_path, "fact-geo", "molf", [1.0] * 12 + [0.0] * 8, before=0.1)
    res = load_results(tmp_path, ["fact-geo", "med-icd10"], ["fft", "lora", "molf"])
    c = claims(res)
    assert c.floors["med-icd10"].kind == "chance" and c.floors["med-icd10"].value == 25.0
    assert not c.floors["med-icd10"].learned and c.floors["fact-geo"].learned
    assert c.judged == ["fact-geo"] and list(c.molf_gap) == ["fact-geo"]
    assert c.claim1["verdict"] == "HELD"  # judged on fact-geo alone
    text = "\n".join(claim_lines(res, c))
    assert "Not judged (did not learn at this budget): med-icd10." in text
    # nothing learned anywhere: no claim is judged, and the report says so
    for d in (tmp_path / "cells" / "fact-geo").rglob("summary.json"):
        summary = json.loads(d.read_text())
        summary["before"] = {"accuracy": summary["after"]["accuracy"]}
        d.write_text(json.dumps(summary))
    res = load_results(tmp_path, ["fact-geo", "med-icd10"], ["fft", "lora", "molf"])
    text = "\n".join(claim_lines(res, claims(res)))
    assert "No task learned at this budget: neither claim is judged." in text


def test_seeds_and_items_are_resampled_together(tmp_path):
    n = 200
    rng = np.random.default_rng(1)
    lora = (rng.random(n) < 0.5).astype(float)
    # FFT two points ahead of LoRA on seed 0, and by 2 +- 6 points over the three seeds
    shifts = {None: 4, 1: 16, 2: -8}  # items gained (+) or lost (-) against LoRA, per seed
    for seed, shift in shifts.items():
        fft = lora.copy()
        idx = np.flatnonzero(lora == (0.0 if shift > 0 else 1.0))[: abs(shift)]
        fft[idx] = 1.0 - fft[idx]
        _cell(tmp_path, "fact-geo", "fft", fft.tolist(), seed=seed, before=0.05)
        _cell(tmp_path, "fact-geo", "lora", lora.tolist(), seed=seed, before=0.05)
    # FFT has no seed 3, and LoRA's seed 3 is far off its others: it must not move the difference
    _cell(tmp_path, "fact-geo", "lora", (1.0 - lora).tolist(), seed=3, before=0.05)
    res = load_results(tmp_path, ["fact-geo"], ["fft", "lora"])
    assert res.n_seeds("fact-geo", "fft") == 3 and res.n_seeds("fact-geo", "lora") == 4
    assert res.score("fact-geo", "fft") == pytest.approx(100 * (lora.mean() + 12 / 3 / n))
    d = difference(res, "fact-geo", "fft", "lora")
    assert d.paired.seeds == 3  # the seeds both ran
    assert d.paired.mean == pytest.approx(100 * 12 / 3 / n)
    # the value and both scores come from those shared seeds too (LoRA's seed 3 is left out of
    # all three, not only of the interval)
    assert d.value == pytest.approx(d.paired.mean)
    assert d.score_b == pytest.approx(100 * lora.mean())
    assert d.score_a - d.score_b == pytest.approx(d.value)
    lines = "\n".join(claim_lines(res, claims(res)))
    row = f"| fact-geo | {d.score_a:.1f} | {d.score_b:.1f} | {d.value:+.1f} |"
    assert row in lines
    # the interval over seeds and items is wider than the one over seed 0's items alone
    single = load_results(tmp_path, ["fact-geo"], ["fft", "lora"])
    single.replicas = {k: v[:1] for k, v in single.replicas.items()}
    alone = difference(single, "fact-geo", "fft", "lora").paired
    assert alone.seeds == 1 and d.paired.half_width > alone.half_width
    # every replica's items are written for recomputation
    paths = write_results(res, tmp_path)
    with paths["items_csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["seed"]) for r in rows} == {
        ("fft", "0"),
        ("fft", "1"),
        ("fft", "2"),
        ("lora", "0"),
        ("lora", "1"),
        ("lora", "2"),
        ("lora", "3"),
    }
    assert len(rows) == 7 * n


# -- the edges of a difference and of its verdicts -------------------------------------------------
def _paired(low: float, high: float) -> PairedDifference:
    return PairedDifference(n=10, mean=(low + high) / 2, se=1.0, low=low, high=high, level=0.95)


def test_above_reads_the_interval_with_strict_ends():
    d = lambda low, high: Difference("t", "a", "b", (low + high) / 2, _paired(low, high))  # noqa: E731
    assert d(0.1, 2.0).above(0.0) is True
    assert d(0.0, 2.0).above(0.0) is None  # touching the line from above is not above it
    assert d(-2.0, 0.0).above(0.0) is False  # at or below: the whole interval <= the line
    assert d(-2.0, 0.1).above(0.0) is None
    assert Difference("t", "a", "b", 0.0).above(0.0) is False  # unpaired: the value itself
    assert Difference("t", "a", "b", 0.1).above(0.0) is True
    assert Difference("t", "a", "b", None).above(0.0) is None


def test_winner_and_magnitude_at_their_edges():
    def w(low, high):
        return _winner(Difference("t", "fft", "lora", (low + high) / 2, _paired(low, high)))

    assert w(0.1, 3.0) == "FFT" and w(-3.0, -0.1) == "LoRA"
    assert w(-1.0, 1.4) == "LoRA matches" and w(-1.0, 1.5) == "not resolved"
    assert w(-3.0, 0.0) == "LoRA matches"  # high == 0 is not below 0
    assert _winner(Difference("t", "fft", "lora", -0.5)) == "LoRA"
    assert _winner(Difference("t", "fft", "lora", 0.0)) == "not resolved"
    assert _winner(Difference("t", "fft", "lora", None)) == "n/a"

    def m(low, high):
        return _magnitude(Difference("t", "e", "a", (low + high) / 2, _paired(low, high)), 9.0)

    assert m(1.0, 8.9) == "below" and m(9.1, 12.0) == "above" and m(1.0, 9.0) == "consistent"
    assert m(9.0, 12.0) == "consistent"
    assert _magnitude(Difference("t", "e", "a", 9.5), 9.0) == "above"
    assert _magnitude(Difference("t", "e", "a", 9.0), 9.0) == "below"
    assert _magnitude(Difference("t", "e", "a", 5.0), None) == "n/a"


def test_a_difference_without_per_item_scores_is_the_scores_difference(tmp_path):
    for m, scores in (("fft", [1.0, 1.0, 0.0, 0.0]), ("lora", [1.0, 0.0, 0.0, 0.0])):
        _cell(tmp_path, "fact-geo", m, scores, before=0.0)
    for items in (tmp_path / "cells").rglob("test_items.json"):
        items.unlink()
    res = load_results(tmp_path, ["fact-geo"], ["fft", "lora"])
    d = difference(res, "fact-geo", "fft", "lora")
    assert (d.task, d.a, d.b, d.paired) == ("fact-geo", "fft", "lora", None)
    assert (d.score_a, d.score_b, d.value) == (50.0, 25.0, 25.0)
    missing = difference(res, "fact-geo", None, "lora")
    assert (missing.task, missing.a, missing.b, missing.value) == ("fact-geo", "?", "lora", None)
    assert difference(res, "fact-geo", "fft", "molf").value is None  # molf has no cell


def test_a_paired_difference_is_repeatable_and_needs_two_items(tmp_path):
    _cell(tmp_path, "fact-geo", "fft", [1.0, 0.0], before=0.0)
    _cell(tmp_path, "fact-geo", "lora", [0.0, 0.0], before=0.0)
    res = load_results(tmp_path, ["fact-geo"], ["fft", "lora"])
    d = difference(res, "fact-geo", "fft", "lora")
    assert d.paired is not None and d.paired.n == 2  # two items are enough to pair
    from molf.experiments.stats import paired_difference_seeds

    assert d.paired == paired_difference_seeds([[100.0, 0.0]], [[0.0, 0.0]], seed=0)
    assert difference(res, "fact-geo", "fft", "lora") == d


def test_claim_1_takes_the_better_baseline_and_names_its_verdicts(tmp_path):
    rng = np.random.default_rng(5)
    base = (rng.random(200) < 0.5).astype(float)
    lora = base.copy()
    lora[np.flatnonzero(base == 0)[:40]] = 1.0  # LoRA 20 points ahead of FFT: the better one
    molf = base.copy()
    molf[np.flatnonzero(base == 1)[:30]] = 0.0  # MoLF 15 points behind FFT, 35 behind LoRA
    for m, scores in (("fft", base), ("lora", lora), ("molf", molf)):
        _cell(tmp_path, "fact-geo", m, scores.tolist(), before=0.0)
    res = load_results(tmp_path, ["fact-geo"], ["fft", "lora", "molf"])
    c = claims(res)
    gap = c.molf_gap["fact-geo"]
    assert (gap.a, gap.b) == ("molf", "lora") and gap.value == pytest.approx(-35.0)
    assert c.claim1["verdict"] == "NOT HELD" and c.winners["fact-geo"] == "LoRA"
    assert c.claim2["verdict"] == "NOT JUDGED"  # no MoLF-E or AdaLoRA cells
    # the paired interval is seeded (seed 0): rebuilding the report repeats it exactly
    from molf.experiments.stats import paired_difference_seeds

    again = paired_difference_seeds([100 * molf], [100 * lora], seed=0)
    assert gap.paired == again
    assert gap.paired != paired_difference_seeds([100 * molf], [100 * lora], seed=1)
