"""The README's and the docs' code runs, and prints what the page shows.

Every ```python block of README.md and of the pages under docs/ runs as a script in a fresh
interpreter (in a temporary directory, offline, one thread), unless the line before it is
`<!-- not run: REASON -->` (an excerpt that does not run on its own). A plain ``` block that
follows a snippet, before the next code block, is what it prints: each of its lines must appear
in the snippet's standard output, in that order (a page may leave lines out, such as the
Trainer's progress and timings). Lines match when their text is the same and their numbers are
equal: the snippets seed everything, and the pages show what they print with the CPU build of
torch the Makefile pins.

The own-data commands (a bash block after `<!-- tested on a 40-row file: ... -->`) run on a
40-row file with default split settings, as written except for the model (`--model tiny-llama`,
one step: the smollm2-135m run the guide shows takes minutes).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import skip_unless
from tests.runs import child_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# the pages whose code blocks are checked: the README and every page of the docs site
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
_NOT_RUN = re.compile(r"^<!-- not run: .+ -->$")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


@dataclass
class Block:
    lang: str
    text: str
    line: int  # of the opening fence, 1-based
    before: str  # the line before the opening fence
    page: str = "README.md"  # relative to the repository

    @property
    def where(self) -> str:
        return f"{self.page} line {self.line}"


def _page_blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    name = page.relative_to(ROOT).as_posix()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            start, lang = i, lines[i][3:].strip()
            i += 1
            while not lines[i].startswith("```"):
                i += 1
            before = lines[start - 1] if start else ""
            text = "\n".join(lines[start + 1 : i])
            blocks.append(Block(lang, text, start + 1, before, name))
        i += 1
    return blocks


def _blocks() -> list[Block]:
    return [b for page in PAGES for b in _page_blocks(page)]


def _snippets() -> list[tuple[Block, Block | None]]:
    """Each python block that runs, with the plain block showing its output (or None)."""
    found = []
    for page in PAGES:
        found += _page_snippets(_page_blocks(page))
    return found


def _page_snippets(blocks: list[Block]) -> list[tuple[Block, Block | None]]:
    found = []
    for k, block in enumerate(blocks):
        if block.lang != "python" or _NOT_RUN.match(block.before):
            continue
        shown = blocks[k + 1] if k + 1 < len(blocks) and blocks[k + 1].lang == "" else None
        found.append((block, shown))
    return found


def _split(line: str) -> tuple[str, list[float]]:
    return _NUMBER.sub("#", line.strip()), [float(x) for x in _NUMBER.findall(line)]


def _same(expected: str, actual: str) -> bool:
    (text_e, nums_e), (text_a, nums_a) = _split(expected), _split(actual)
    return text_e == text_a and nums_e == nums_a


def assert_shows(expected: str, actual: str) -> None:
    """Every line of `expected` matches a line of `actual`, in order (see the module doc)."""
    lines = actual.splitlines()
    at = 0
    for want in (x for x in expected.splitlines() if x.strip()):
        for k in range(at, len(lines)):
            if _same(want, lines[k]):
                at = k + 1
                break
        else:
            raise AssertionError(f"the page shows {want!r}; the snippet printed:\n{actual}")


def test_the_matcher_takes_the_same_numbers_and_nothing_else():
    assert _same("loss 4.155, fft 45.0%", "loss 4.155, fft 45.0%")
    assert _same("loss 4.150", "loss 4.15")  # the same number, written another way
    assert not _same("loss 4.155", "loss 4.156")
    assert not _same("loss 4.155", "loss 4.5")
    assert not _same("fft 45.0%", "lora 45.0%")
    assert_shows("a 1\nc 3.0", "a 1\nb 2\nc 3\n")
    with pytest.raises(AssertionError):
        assert_shows("c 3\na 1", "a 1\nc 3\n")  # order counts


def test_every_python_block_runs_or_says_why_not():
    python = [b for b in _blocks() if b.lang == "python"]
    run = {b.line for b, _ in _snippets()}
    skipped = [b for b in python if b.line not in run]
    assert all(_NOT_RUN.match(b.before) for b in skipped)
    assert len(run) >= 6  # library, Trainer, TRL, save/reload, GPT-2, QLoRA


@pytest.mark.parametrize("snippet", _snippets(), ids=lambda s: s[0].where)
def test_snippet_prints_what_its_page_shows(snippet, tmp_path):
    code, shown = snippet
    if "bitsandbytes" in code.text or "BitsAndBytesConfig" in code.text:
        skip_unless(importlib.util.find_spec("bitsandbytes") is not None, "bitsandbytes")
    proc = subprocess.run(
        [sys.executable, "-c", code.text],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    if shown is not None:
        assert_shows(shown.text, proc.stdout)


OWN_DATA = "<!-- tested on a 40-row file: tests/test_readme.py -->"


def _own_data_blocks() -> list[Block]:
    """The own-data command blocks, once each (the README and the guide show the same)."""
    found: dict[str, Block] = {}
    for block in _blocks():
        if block.before == OWN_DATA:
            found.setdefault(block.text, block)
    return list(found.values())


def _commands(block: Block) -> list[list[str]]:
    commands = []
    for line in block.text.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == "molf", line
            commands.append(words[1:])
    return commands


def test_the_readme_and_the_guide_show_the_same_own_data_commands():
    pages = {b.page for b in _blocks() if b.before == OWN_DATA}
    assert {"README.md", "docs/guides/own-data.md"} <= pages
    assert len(_own_data_blocks()) == 1


@pytest.mark.parametrize("block", _own_data_blocks(), ids=lambda b: b.where)
def test_the_own_data_commands_work_on_a_40_row_file(block, tmp_path, monkeypatch, capsys):
    from molf.cli import main

    monkeypatch.chdir(tmp_path)
    rows = (ROOT / "examples" / "data" / "capitals_chat.jsonl").read_text().splitlines()
    Path("mydata.jsonl").write_text("\n".join(rows[:40]) + "\n")
    for argv in _commands(block):
        if argv[0] == "train":
            argv = [*argv, "--model", "tiny-llama", "max_steps=1", "progress=false"]
        assert main(argv) == 0, capsys.readouterr().err
        out, err = capsys.readouterr()
        if argv[0] == "train":  # the split line the guide shows
            assert "data: mydata.jsonl: 32 train, 4 validation (n_val unset" in err
        else:  # the run's own 4 test rows, as the guide says
            assert "(4 held-out test records of the run)" in out
    summary = json.loads(Path("runs/sft-mydata-molf/summary.json").read_text())
    assert summary["method"] == "molf"
    assert (summary["n_train_examples"], summary["n_test_records"]) == (32, 4)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# the `small` grid of `make results`: 7 methods x 2 learning rates per task, plus two more seeds
# of the chosen cell for the 5 methods of the paper's claims
SMALL_CELLS_PER_TASK = 7 * 2 + 5 * 2
SMALL_TASKS = ("fact-geo", "med-icd10", "world-sql")


def test_the_docs_stated_defaults_and_costs_are_the_code_s_and_the_results(capsys):
    """Figures the docs state in prose rather than as a snippet's output: the alpha default
    (the library guide) is the code's; the `small` run's finished cells and CPU time (the
    results page), its cost per task and the projection from it (docs/compare.md) are
    docs/results/cells.csv's, and `molf compare --help` quotes that projection."""
    import csv

    from molf.config import DEFAULT_LORA_ALPHA

    library = _one_line((ROOT / "docs" / "guides" / "library.md").read_text())
    results = _one_line((ROOT / "docs" / "evidence" / "results.md").read_text())
    compare_md = _one_line((ROOT / "docs" / "compare.md").read_text())
    assert f"`lora_alphas` (default {DEFAULT_LORA_ALPHA:g} each)" in library
    rows = list(csv.DictReader((ROOT / "docs" / "results" / "cells.csv").open()))
    done = [r for r in rows if r["status"] == "done"]
    seconds = sum(float(r["cpu_seconds"]) for r in done)
    planned = SMALL_CELLS_PER_TASK * len(SMALL_TASKS)
    assert f"{len(done)} of its {planned} cells" in results
    stated = f"{seconds:,.0f} CPU seconds ({seconds / 3600:.1f} CPU hours) in its finished cells"
    assert stated in results
    projected = 0.0
    for task in SMALL_TASKS:
        cpu = [float(r["cpu_seconds"]) for r in done if r["task"] == task]
        mean = sum(cpu) / len(cpu)
        task_total = round(mean * SMALL_CELLS_PER_TASK, -2)
        row = (
            f"| {task} | {len(cpu)} | {mean:,.0f} ({min(cpu):,.0f}-{max(cpu):,.0f}) | "
            f"{SMALL_CELLS_PER_TASK} | {task_total:,.0f} |"
        )
        assert row in compare_md
        projected += task_total
    hours = projected / 3600
    assert f"about {projected:,.0f} CPU seconds ({hours:.1f} CPU hours)" in compare_md
    assert "~2 h" not in results + compare_md
    # `molf compare --help` gives the grid's measured cost and points to where it comes from
    from molf.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = _one_line(capsys.readouterr().out)
    assert "CPU hours as measured, docs/compare.md" in text and "~" not in text
    assert f"{planned} cells, about {hours:.0f} CPU hours" in text
