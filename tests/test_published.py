"""Every figure the evidence pages quote comes from a committed result file: the numbers in the
answer page and the rank page are found in (or recomputed from) the reports and per-item scores
under docs/, and the cost figures in the performance page's measurements."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from molf.experiments.answer import read_items
from molf.experiments.stats import align, paired_difference_seeds

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REPORTS = [
    DOCS / d / "report.md"
    for d in (
        "results",
        "results-fact-geo-6seeds",
        "results-rank8",
        "results-rank8-alpha8",
        "results-planted",
    )
]


def _items(directory: str) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    return read_items(DOCS / directory)


def _difference(directory: str, task: str, a: str, b: str) -> str:
    """a - b on `task` over the seeds both ran, as the reports print it."""
    return _difference_across(directory, a, directory, b, task)


def _difference_across(dir_a: str, method_a: str, dir_b: str, method_b: str, task: str) -> str:
    """`_difference` between two directories whose cells share the split (same seed, sizes)."""
    a, b = _items(dir_a)[(task, method_a)], _items(dir_b)[(task, method_b)]
    xs, ys = [], []
    for s in sorted(set(a) & set(b)):
        _, x, y = align(a[s], b[s])
        xs.append(x)
        ys.append(y)
    r = paired_difference_seeds(xs, ys, seed=0)
    return f"{r.mean:+.1f} [{r.low:+.1f}, {r.high:+.1f}]"


def test_the_rank_page_s_alpha_8_figures_are_its_run_s():
    page = _one_line(DOCS / "evidence" / "rank.md")
    report = (DOCS / "results-rank8-alpha8" / "report.md").read_text()
    assert "| MoLF | 74.5 |" in (DOCS / "results-rank8-alpha8" / "results.md").read_text()
    assert "| fact-geo | 76 | 38.8% |" in report and "38.8% of its updates" in page
    for other, shown in (
        ("molf", "+8.1 [+2.6, +14.1]"),
        ("lora", "+1.8 [-5.5, +8.9]"),
        ("fft", "-9.1 [-15.6, -2.9]"),
        ("hybrid", "-4.9 [-9.6, -0.8]"),
    ):
        got = _difference_across("results-rank8-alpha8", "molf", "results-rank8", other, "fact-geo")
        assert got == shown, other
        value, interval = shown.split(" ", 1)
        assert f"{value.lstrip('+-')} {interval}" in page, other


def _one_line(path: Path) -> str:
    return " ".join(path.read_text().split())


def test_the_rank_page_s_figures_are_the_rank_8_run_s():
    page = _one_line(DOCS / "evidence" / "rank.md")
    report = (DOCS / "results-rank8" / "report.md").read_text()
    for method, score in (("FFT", "83.6"), ("LoRA", "72.7"), ("MoLF", "66.4")):
        assert f"| {method} | {score} |" in report
        assert f"| {score} |" in page
    assert "| base model (no training) | 18.8 |" in report
    fft_lora = _difference("results-rank8", "fact-geo", "fft", "lora")
    molf_fft = _difference("results-rank8", "fact-geo", "molf", "fft")
    assert fft_lora == "+10.9 [+3.1, +19.3]"
    assert molf_fft == "-17.2 [-25.0, -9.9]"
    assert "+10.9 points, [+3.1, +19.3]" in page and "17.2 points, [-25.0, -9.9]" in page
    assert "| fact-geo | 76 | 0.0% |" in report and "0.0% of its module updates" in page
    assert "| fact-geo | 76 | 99.9% |" in report and "99.9% of its module updates" in page
    for method, score in (
        ("Fixed hybrid", "79.4"),
        ("LoRA + embeddings/norms", "66.1"),
        ("MoLF (PFN)", "83.6"),
    ):
        assert f"| {method} | {score} |" in report and f"| {score} |" in page
    for a, b, shown in (
        ("molf", "lora-other", "+0.3 [+0.0, +1.6]"),
        ("hybrid", "molf", "+13.0 [+5.7, +20.8]"),
        ("hybrid", "lora", "+6.8 [+1.6, +12.5]"),
        ("hybrid", "fft", "-4.2 [-10.9, +2.1]"),
        ("lora-other", "lora", "-6.5 [-15.9, +2.6]"),
        ("molf-pfn", "fft", "+0.0 [+0.0, +0.0]"),
        ("molf-pfn", "molf", "+17.2 [+9.9, +25.0]"),
    ):
        assert _difference("results-rank8", "fact-geo", a, b) == shown, (a, b)
        value, interval = shown.split(" ", 1)
        assert f"{value.lstrip('+')} {interval}" in page or f"{value} {interval}" in page


def test_every_interval_on_the_answer_page_is_in_a_committed_report():
    """...or on the rank page, whose figures the test above recomputes from the items."""
    page = (DOCS / "should-i-use-molf.md").read_text()
    pages = [DOCS / "evidence" / "rank.md", DOCS / "evidence" / "planted.md"]
    pages.append(DOCS / "evidence" / "differences.md")  # recomputed by the answer test below
    reports = " ".join(p.read_text() for p in [*REPORTS, *pages])
    intervals = re.findall(r"\[[+-]\d+\.\d, [+-]\d+\.\d\]", page)
    assert len(intervals) >= 6
    for interval in intervals:
        assert interval in reports, interval


@pytest.mark.parametrize(
    "figure", ["1.377x", "1.291x", "1.071x", "1.059x", "1986.6 MiB", "1539.4 MiB"]
)
def test_the_answer_page_s_costs_are_the_performance_page_s(figure):
    page = (DOCS / "should-i-use-molf.md").read_text()
    performance = (DOCS / "performance.md").read_text().replace("**", "")
    number = figure.split()[0].rstrip("x")
    assert number in page
    assert number in performance, figure


def _table_rows(page: str, header: str) -> list[list[str]]:
    """The cells of each row of the markdown table under `header` in `page`."""
    assert header in page
    rows = []
    for line in page[page.index(header) :].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _answer_sources() -> list[tuple[Path, str]]:
    """The Makefile's ANSWER_SOURCES: the comparison directories the answer page's figure reads."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("ANSWER_SOURCES :="))
    sources = []
    for item in shlex.split(line.split(":=", 1)[1]):
        directory, _, label = item.partition("=")
        sources.append((ROOT / directory, label))
    return sources


def test_the_answer_figure_and_table_are_the_committed_reports_(tmp_path):
    """docs/evidence/answer.md (and its figure) is what `make answer` computes from the committed
    comparison directories, and the answer page shows the figure and quotes the table."""
    from molf.experiments.answer import write_answer

    sources = _answer_sources()
    assert len(sources) >= 3 and all((d / "items.csv").is_file() for d, _ in sources)
    write_answer(tmp_path, sources)
    committed = DOCS / "evidence" / "answer.md"
    assert (tmp_path / "answer.md").read_text() == committed.read_text()
    shifts = DOCS / "evidence" / "differences.md"
    assert (tmp_path / "differences.md").read_text() == shifts.read_text()
    assert (DOCS / "evidence" / "answer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (DOCS / "should-i-use-molf.md").read_text()
    assert "](evidence/answer.png)" in page
    # the page's summary table: each score is the figure table's, panel by panel
    scores = {}
    for line in committed.read_text().splitlines()[2:]:
        panel, method, score = (c.strip() for c in line.strip("|").split("|")[:3])
        scores[(panel, method)] = score
    panels = {"planted full-rank teacher, rank 8": "full-s0.3, rank 8, synthetic"}
    header = "| task, setting | FFT | LoRA | MoLF | MoLF (PFN) | Fixed hybrid | LoRA + embeddings/norms |"
    methods = [c.strip() for c in header.strip("|").split("|")[1:]]
    checked = 0
    for cells in _table_rows(page, header):
        panel = panels.get(cells[0], cells[0])
        for method, shown in zip(methods, cells[1:]):
            if shown != "-":
                assert shown.split()[0] == scores[(panel, method)], (panel, method)
                checked += 1
    assert checked >= 15
    assert "74.5 at alpha 8" in page and scores[("fact-geo, rank 8, alpha 8", "MoLF")] == "74.5"


def test_the_results_notes_give_molf_e_s_seed_0_scores_from_its_items():
    """The committed report's MoLF-E vs LoRA-160 rows show MoLF-E's three-seed mean beside a
    seed-0 difference; the notes give the seed-0 scores, recomputed here from items.csv, and the
    report's differences are seed 0's."""
    notes = _one_line(DOCS / "results" / "README.md")
    report = (DOCS / "results" / "report.md").read_text()
    items = _items("results")
    tasks = ("fact-geo", "med-icd10", "world-sql")
    seed0 = [sum(items[(t, "molf-e")][0].values()) / len(items[(t, "molf-e")][0]) for t in tasks]
    said = "are {:.1f} on fact-geo, {:.1f} on med-icd10 and {:.1f} on world-sql".format(*seed0)
    assert said in notes
    for t in tasks:
        value, interval = _difference("results", t, "molf-e", "lora-160").split(" ", 1)
        row = next(r for r in report.splitlines() if r.startswith(f"| {t} | MoLF-E | "))
        assert f"| {value} | {interval} |" in row


def test_the_planted_attempts_table_is_its_runs_():
    """Each row of docs/results-planted/attempts.md is its run's committed summary and config."""
    import json

    import yaml

    folder = DOCS / "results-planted" / "attempts"
    page = (DOCS / "results-planted" / "attempts.md").read_text()
    runs = [d for d in sorted(folder.iterdir()) if (d / "summary.json").is_file()]
    assert len(runs) >= 9
    for d in runs:
        s = json.loads((d / "summary.json").read_text())
        c = yaml.safe_load((d / "config.yaml").read_text())
        lr = c["lr_fft"] if c["method"] == "fft" else c["lr_lora"]
        n = "all" if c["n_train"] is None else c["n_train"]
        scores = [100 * s[k]["agreement"] for k in ("before", "after", "validation")]
        row = f"| {d.name} | {Path(c['data']).name} | {c['method']} | {n} | {c['epochs']:g} | "
        row += f"{lr:g} | " + " | ".join(f"{v:.1f}" for v in scores) + " |"
        assert row in page, row


def test_every_attempt_on_the_lora_search_page_is_its_report_s_row():
    """Each row of docs/evidence/lora-search.md is the "FFT against LoRA" row of the report it
    links: the same task, scores, difference, interval and number of seeds."""
    page = (DOCS / "evidence" / "lora-search.md").read_text()
    header = (
        "| mechanism | task, setting | FFT | LoRA | FFT - LoRA | 95% interval | seeds | report |"
    )
    checked = 0
    for cells in _table_rows(page, header):
        task = cells[1].split(",")[0]
        link = re.fullmatch(r"\[[^]]+\]\(\.\./([^)]+)\)", cells[7])
        assert link, cells[7]
        report = (DOCS / link.group(1)).read_text()
        table = report[report.index("### FFT against LoRA") :]
        want = f"| {task} | {' | '.join(cells[2:6])} | "
        row = next((r for r in table.splitlines() if r.startswith(want)), None)
        assert row is not None, want
        assert row.split("|")[7].strip() == cells[6], (task, cells[6])
        checked += 1
    assert checked >= 9


def _chosen_seed_0(directory: str, task: str, method: str) -> str:
    """The test score of `method`'s chosen learning rate at seed 0, as the reports round it."""
    import csv

    with open(DOCS / directory / "cells.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if (r["task"], r["method"]) == (task, method)]
    (row,) = [r for r in rows if r["seed"] == "0" and r["chosen"] == "1"]
    return f"{float(row['test']):.1f}"


def test_the_lora_search_page_s_scarcity_figures_are_the_cells_():
    page = _one_line(DOCS / "evidence" / "lora-search.md")
    for task, full in (("med-icd10", "results-rank8-med"), ("world-sql", "results-rank8-sql")):
        few = [_chosen_seed_0("results-scarce32", task, m) for m in ("fft", "lora")]
        many = [_chosen_seed_0(full, task, m) for m in ("fft", "lora")]
        assert f"on {task} {few[0]} and {few[1]} against {many[0]} and {many[1]}" in page


def test_the_lora_search_page_s_volume_figures_are_the_cells_():
    page = _one_line(DOCS / "evidence" / "lora-search.md")
    for method in ("fft", "lora"):
        few, many = (
            _chosen_seed_0(d, "fact-geo", method) for d in ("results", "results-volume608")
        )
        assert f"from {few} to {many}" in page
