"""`molf compare --tasks PATH`: the grid on a user's file (the sft task, labelled by the file
name), learning rates chosen on the validation loss (lower is better), loss shown as a number."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from molf.cli import main
from molf.experiments.grid import choose, read_cell, task_labels, task_spec
from molf.experiments.report import write_report

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "examples" / "data" / "capitals_chat.jsonl"


def _cell(root: Path, label: str, val: float, test: float) -> Path:
    d = root / "cells" / "mine" / "lora" / label
    d.mkdir(parents=True)
    summary = {
        "method": "lora",
        "task": "sft",
        "headline_metric": "loss",
        "before": {"loss": 4.0},
        "after": {"loss": test, "perplexity": 2.0},
        "validation": {"loss": val},
        "steps": 3,
        "final_loss": 1.0,
        "wall_seconds": 1.0,
        "n_test_records": 3,
        "config": {},
    }
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_a_loss_headline_is_chosen_low_and_shown_as_a_number(tmp_path):
    high = _cell(tmp_path, "lr-1e-3", val=2.5, test=2.25)
    low = _cell(tmp_path, "lr-1e-4", val=1.5, test=1.75)
    assert choose([read_cell(d, "mine", "lora") for d in (high, low)]).directory == low
    paths = write_report(tmp_path, ["mine"], ["lora"], {"command": "x"})
    md = (tmp_path / "results.md").read_text()
    report = paths["report"].read_text()
    assert "| LoRA | 1.750 | n/a |" in report  # the chosen cell's test loss, not 175.0 points
    assert "| base model (no training) | 4.000 | n/a |" in report  # no mean of losses
    assert "mine (loss, lower is better)" in report
    assert "175.0" not in report + md
    assert "Not judged" in report  # the paper's claims are in points
    with (tmp_path / "cells.csv").open() as f:
        rows = {r["candidate"]: r for r in csv.DictReader(f)}
    assert rows["lr-1e-4"]["test"] == "1.7500" and rows["lr-1e-4"]["chosen"] == "1"
    assert rows["lr-1e-3"]["validation"] == "2.5000" and rows["lr-1e-3"]["chosen"] == "0"


def test_task_specs(tmp_path):
    assert task_spec("fact-geo") == ("fact-geo", "fact-geo", None)
    assert task_spec(str(CHAT)) == ("capitals_chat", "sft", str(CHAT))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "capitals_chat.csv").write_text("prompt,completion\nx,y\n")
    twice = [str(CHAT), str(tmp_path / "a" / "capitals_chat.csv")]
    try:
        task_labels(twice)
    except Exception as e:
        assert "would both be labelled 'capitals_chat'" in str(e)
    else:
        raise AssertionError("two files with one label were accepted")
    assert main(["compare", "--plan", "--tasks", str(tmp_path / "nope.jsonl")]) == 2


def test_compare_on_a_path_runs_the_grid_with_routing(tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["compare", "--budget", "smoke", "--tasks", str(CHAT), "--methods", "lora,molf"]
    argv += ["--lr-grid", "lora=1e-2/1e-4,molf=1e-3", "--output-dir", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "capitals_chat/lora/lr-1e-2: done" in printed
    assert "loss: validation" in printed
    cells = out / "cells" / "capitals_chat"
    summaries = {
        d.name: json.loads((d / "summary.json").read_text()) for d in (cells / "lora").iterdir()
    }
    assert {s["task"] for s in summaries.values()} == {"sft"}
    assert all(s["config"]["data"] == str(CHAT) for s in summaries.values())
    val = {name: s["validation"]["loss"] for name, s in summaries.items()}
    best = min(val, key=val.get)
    report = (out / "report.md").read_text()
    lora_row = next(line for line in report.splitlines() if line.startswith("| LoRA |"))
    test_loss = summaries[best]["after"]["loss"]
    assert f"{test_loss:.3f}" in lora_row and best.removeprefix("lr-") in lora_row
    assert "capitals_chat (loss, lower is better)" in report
    assert (out / "routing_molf_steps.png").read_bytes().startswith(b"\x89PNG")
    assert "routing_molf_steps.png" in report
