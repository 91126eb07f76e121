"""The paper's tasks: knowledge injection (`fact`), medical MCQ (`med`) and text-to-SQL (`sql`).

Each task module defines a `Task` object with:
  - `name`, `headline` (the metric the comparison table reports), `sources` (source names);
  - `build(source, data_path, seed, n_train, n_val, n_test) -> TaskSplits`;
  - `evaluate(model, tokenizer, records, batch_size) -> dict[str, float]`.

Users name a task either by an embedded source (`fact-geo`, `med-icd10`, `spider-dev`), by an
upstream source (`counterfact`, `medmcqa`, `gretel`) with a data path or hub id, or by the task
name with a data path (`fact` + a CounterFact JSON).
"""

from __future__ import annotations

import importlib
from typing import Any

from molf.errors import MolfError
from molf.tasks.common import Example, TaskSplits

__all__ = ["Example", "TaskSplits", "SOURCES", "DEFAULT_SOURCE", "get_task", "build_task"]

# source name -> task name
SOURCES: dict[str, str] = {
    "fact-geo": "fact",
    "counterfact": "fact",
    "med-icd10": "med",
    "medmcqa": "med",
    "spider-dev": "sql",
    "gretel": "sql",
}
# the upstream source a bare task name means when the user gives a data path
DEFAULT_SOURCE: dict[str, str] = {"fact": "counterfact", "med": "medmcqa", "sql": "gretel"}
_EMBEDDED = {"fact": "fact-geo", "med": "med-icd10", "sql": "spider-dev"}


def get_task(name: str) -> Any:
    """The Task object for a task name (`fact`, `med`, `sql`) or a source name."""
    task_name = SOURCES.get(name, name)
    if task_name not in DEFAULT_SOURCE:
        known = ", ".join(sorted(set(SOURCES) | set(DEFAULT_SOURCE)))
        raise MolfError(f"unknown task '{name}' (known: {known})")
    module = importlib.import_module(f"molf.tasks.{task_name}")
    return module.TASK


def resolve_source(name: str, data_path: str | None) -> str:
    """The source a task spec means: bare task names use the embedded source unless data is given."""
    if name in SOURCES:
        return name
    task = get_task(name).name
    return DEFAULT_SOURCE[task] if data_path else _EMBEDDED[task]


def build_task(
    name: str,
    data_path: str | None = None,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int = 64,
    n_test: int = 128,
) -> tuple[Any, TaskSplits]:
    """Build a task's splits; raises MolfError (one line) on bad names, files or records."""
    task = get_task(name)
    source = resolve_source(name, data_path)
    splits = task.build(source, data_path, seed, n_train, n_val, n_test)
    if not splits.train:
        raise MolfError(f"task '{name}': no training examples left after filtering")
    if not splits.test:
        raise MolfError(f"task '{name}': no test records left after filtering")
    return task, splits
