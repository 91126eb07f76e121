"""`molf compare --seeds`: every training seed of a cell answers the same test items (same ids,
same prompts), and every task's per-item scores average to its headline metric, so that the
report's paired differences pair what they claim to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from molf.cli import main
from molf.experiments.runner import config_from_dict
from molf.train.prepare import task_and_splits

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["fact-geo", "med-icd10", "world-sql"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds") / "grid"
    argv = ["compare", "--budget", "smoke", "--tasks", ",".join(TASKS)]
    argv += ["--methods", "lora", "--lr-grid", "off", "--seeds", "2", "--seed-methods", "lora"]
    argv += ["--jobs", "0", "--output-dir", str(out)]
    assert main(argv) == 0
    return out


def _replicas(out: Path, task: str) -> list[Path]:
    cells = sorted((out / "cells" / task / "lora").rglob("summary.json"))
    return [c.parent for c in cells]


@pytest.mark.parametrize("task", TASKS)
def test_seed_replicas_answer_the_same_items(grid, task):
    cells = _replicas(grid, task)
    assert len(cells) == 2  # the chosen candidate and its seed-1 replica
    configs = [yaml.safe_load((c / "config.yaml").read_text()) for c in cells]
    assert {c["seed"] for c in configs} == {0, 1} and {c["data_seed"] for c in configs} <= {0, None}
    items = [json.loads((c / "test_items.json").read_text())["items"] for c in cells]
    assert items[0].keys() == items[1].keys() and len(items[0]) >= 2
    # the same prompts behind the same ids: each replica's own config rebuilds the same split
    splits = [task_and_splits(config_from_dict(c))[1].test for c in configs]
    assert splits[0] == splits[1] and len(splits[0]) == len(items[0])


@pytest.mark.parametrize("task", TASKS)
def test_per_item_scores_average_to_the_headline(grid, task):
    for cell in _replicas(grid, task):
        summary = json.loads((cell / "summary.json").read_text())
        data = json.loads((cell / "test_items.json").read_text())
        assert data["metric"] == summary["headline_metric"]
        scores = list(data["items"].values())
        assert sum(scores) / len(scores) == pytest.approx(
            summary["after"][data["metric"]], abs=1e-9
        ), cell


def test_own_data_scores_items_only_with_a_generation_metric(tmp_path):
    """sft's headline is the token-weighted loss unless a generation metric is asked for: then
    the per-item hits average to it; with the loss alone it writes no per-item scores (and a
    comparison on own data reports point differences without intervals)."""
    data = ROOT / "examples" / "data" / "capitals_chat.jsonl"
    base = ["train", "lora", "--model", "tiny-llama", "--task", "sft", "--data", str(data)]
    base += ["n_train=8", "n_val=2", "n_test=6", "max_steps=1", "max_length=64", "progress=false"]
    base += ["eval_before=false", "max_new_tokens=4"]
    assert main([*base, "--output-dir", str(tmp_path / "loss")]) == 0
    assert not (tmp_path / "loss" / "test_items.json").exists()
    out = tmp_path / "hits"
    assert main([*base, "generation_metric=contains", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    data = json.loads((out / "test_items.json").read_text())
    assert data["metric"] == summary["headline_metric"] == "contains"
    scores = list(data["items"].values())
    assert len(scores) == 6
    assert sum(scores) / len(scores) == pytest.approx(summary["after"]["contains"], abs=1e-9)
