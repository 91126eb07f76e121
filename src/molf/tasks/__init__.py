"""Tasks: the paper's three (`fact`, `med`, `sql`) and supervised fine-tuning on your own data
(`sft`).

Users name a task by an embedded source (`fact-geo`, `med-icd10`, `spider-dev`), by an upstream
source (`counterfact`, `medmcqa`, `gretel`) with a data path or hub id, or by the task name
(`fact` alone means its embedded source, `fact` with data its upstream one; `sft` needs data).
`molf.tasks.base` defines what a task is; each task module registers itself there at import.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import pkgutil

from molf._files import looks_like_path
from molf.errors import MolfError
from molf.tasks.base import (
    DEFAULT_N_TEST,
    DEFAULT_N_VAL,
    Task,
    TaskEntry,
    TaskOptions,
    TaskRequest,
    lower_is_better,
    register_task,
    registered,
)
from molf.tasks.common import Example, TaskSplits

__all__ = [
    "Example",
    "Task",
    "TaskOptions",
    "TaskRequest",
    "TaskSplits",
    "build_task",
    "get_task",
    "lower_is_better",
    "register_task",
    "resolve_source",
    "task_names",
]


@functools.cache
def _import_task_modules() -> None:
    """Import every module of this package once: task modules register themselves at import."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def _entry(name: str) -> TaskEntry:
    _import_task_modules()
    entries = registered()
    for entry in entries.values():
        if name == entry.name or name in entry.task.sources:
            return entry
    known = ", ".join(task_names())
    hint = f"; for your own data use --task sft --data {name}" if looks_like_path(name) else ""
    close = difflib.get_close_matches(name, task_names(), n=1)
    if close and not hint:
        hint = f"; did you mean '{close[0]}'?"
    raise MolfError(f"unknown task '{name}' (known: {known}){hint}")


def task_names() -> list[str]:
    """Every name `get_task` accepts: task names and their sources, sorted."""
    _import_task_modules()
    return sorted({n for e in registered().values() for n in (e.name, *e.task.sources)})


def get_task(name: str, options: TaskOptions | None = None) -> Task:
    """The task for a task or source name, made for `options` (which it must read)."""
    return _entry(name).make(options or TaskOptions())


def resolve_source(name: str, data_path: str | None) -> str:
    """The source a task spec means: a source name itself; a bare task name its embedded source
    without data and its upstream source with data."""
    entry = _entry(name)
    if name != entry.name:
        return name
    source = entry.with_data if data_path else entry.embedded
    if source is None:
        need = "needs a data path (--data)" if data_path is None else "takes no data path"
        raise MolfError(f"task '{name}' {need}")
    return source


def build_task(
    name: str,
    data_path: str | None = None,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = 64,
    n_test: int | None = 128,
    options: TaskOptions | None = None,
    *,
    evaluation_only: bool = False,
) -> tuple[Task, TaskSplits]:
    """The task and its splits; raises MolfError (one line) on bad names, files or records.

    `n_val` / `n_test` None: the task's own sizes where it sizes its splits from its data
    (`sft`), else DEFAULT_N_VAL / DEFAULT_N_TEST. `evaluation_only` (`molf eval`): no training
    examples are needed."""
    entry = _entry(name)
    task = entry.make(options or TaskOptions())
    if not entry.sizes_splits:
        n_val = DEFAULT_N_VAL if n_val is None else n_val
        n_test = DEFAULT_N_TEST if n_test is None else n_test
    source = resolve_source(name, data_path)
    request = TaskRequest(source, data_path, seed, n_train, n_val, n_test, evaluation_only)
    splits = task.build(request)
    if not splits.train and not evaluation_only:
        raise MolfError(f"task '{name}': no training examples left after filtering")
    if not splits.test:
        raise MolfError(f"task '{name}': no test records left after filtering")
    return task, splits
