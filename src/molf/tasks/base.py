"""What a task is, and the registry that finds one by name.

A task turns a data source into training examples and held-out records, and scores a model on
such records. Adding one is one module in `molf/tasks/` that defines the task and calls
`register_task` at import; `molf.tasks.get_task` imports the package's modules to find it.

The loop talks to a task through two calls:

    task, splits = build_task(name, data, seed, n_train, n_val, n_test, options)
    ... train on splits.train (a list of `Example`) ...
    metrics = task.evaluate(model, tokenizer, splits.validation, batch_size)  # any time, any split

`evaluate` leaves the model's train/eval mode as it found it, so it may run mid-training;
`task.headline` names the metric to compare runs or checkpoints by, and
`lower_is_better(task.headline)` which way it points.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from molf.errors import MolfError
from molf.tasks.common import TaskSplits, ensure_pad_token

__all__ = [
    "DEFAULT_N_TEST",
    "DEFAULT_N_VAL",
    "GENERATION_METRICS",
    "Task",
    "TaskBase",
    "TaskEntry",
    "TaskOptions",
    "TaskRequest",
    "lower_is_better",
    "refuse_data",
    "register_task",
    "registered",
]

GENERATION_METRICS = ("none", "exact_match", "contains")
# Split sizes of a task that does not size its own splits, when a run leaves them unset (null).
DEFAULT_N_VAL = 32
DEFAULT_N_TEST = 64
# Metrics where a smaller value is the better model (every other metric is a score to raise).
_LOWER_IS_BETTER = frozenset({"loss", "perplexity"})


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of `metric` is better (loss, perplexity), for choosing the best
    checkpoint or learning rate; scores such as accuracy or exact match are higher-is-better."""
    return metric in _LOWER_IS_BETTER


@dataclass(frozen=True)
class TaskRequest:
    """Which data a task builds splits from, and how large the splits are.

    `source` is one of the task's source names (e.g. `fact-geo` or `counterfact`); `data` a path
    or hub id where the source takes one. `n_train=None` keeps every training example left.
    `n_val` / `n_test` None (unset) reach only a task registered with `sizes_splits` (the
    others get DEFAULT_N_VAL / DEFAULT_N_TEST from `build_task`): it sizes them from its data.
    `evaluation_only`: no training split is wanted (`molf eval`); such a task may then make every
    row a test record when no size is given."""

    source: str
    data: str | None = None
    seed: int = 0
    n_train: int | None = None
    n_val: int | None = 64
    n_test: int | None = 128
    evaluation_only: bool = False


def refuse_data(request: TaskRequest, instead: str) -> None:
    """Refuse a data path for an embedded source that reads none, naming the source that does."""
    if request.data:
        raise MolfError(f"{request.source} is embedded and takes no data path (use '{instead}')")


@dataclass(frozen=True)
class TaskOptions:
    """Settings beyond the split sizes. The names are `TrainConfig` keys, so a run config maps
    onto them one to one (`from_config`); `max_length` applies to every task, the others only to
    the tasks that declare them (`TaskEntry.options`), and setting one for another task is an
    error rather than silently ignored."""

    max_length: int = 256
    val_data: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None
    messages_field: str | None = None
    text_field: str | None = None
    generation_metric: str = "none"
    max_new_tokens: int | None = None
    train_split: str | None = None
    val_split: str | None = None
    test_split: str | None = None

    def __post_init__(self) -> None:
        if self.generation_metric not in GENERATION_METRICS:
            raise MolfError(
                f"config key 'generation_metric': must be one of {', '.join(GENERATION_METRICS)}"
                f", got {self.generation_metric!r}"
            )
        for key in ("max_length", "max_new_tokens"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise MolfError(f"config key '{key}': must be > 0, got {value}")

    @classmethod
    def from_config(cls, config: Any) -> TaskOptions:
        """The options a run config holds (any object with attributes of these names)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(config, n) for n in names if hasattr(config, n)})

    def set_names(self) -> list[str]:
        """The task-specific options given a value other than their default."""
        default = TaskOptions()
        return [
            f.name
            for f in dataclasses.fields(self)
            if f.name != "max_length" and getattr(self, f.name) != getattr(default, f.name)
        ]


@runtime_checkable
class Task(Protocol):
    """A task: builds splits from a source, scores a model on held-out records.

    `headline` is the metric a comparison reports (`lower_is_better(headline)` says which way it
    points). Given an `items` dict, `evaluate` also fills it with each record's score on the
    headline (`item_id(i)` -> score, the headline being their mean) for paired comparisons.
    A multiple-choice task may also set `chance_level` (the headline a guess scores), which the
    comparison report takes as the floor a trained model must leave.
    Validation and test records are task-specific dicts that only the task's `evaluate` reads."""

    name: str
    headline: str
    sources: tuple[str, ...]

    def build(self, request: TaskRequest) -> TaskSplits: ...

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        records: list[dict[str, Any]],
        batch_size: int = 16,
        items: dict[str, float] | None = None,
    ) -> dict[str, float]: ...


class TaskBase:
    """What every built-in task's `evaluate` does around its scoring: refuse an empty split,
    give the tokenizer a pad token (batched scoring needs one), score in eval mode and give the
    model its train/eval mode back, so that evaluation may run mid-training. A task subclass
    implements `score` with `evaluate`'s arguments."""

    name: str

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        records: list[dict[str, Any]],
        batch_size: int = 16,
        items: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """The task's metrics on `records` (`items`, when given, gets each record's headline)."""
        if not records:
            raise MolfError(f"{self.name}: no records to evaluate")
        ensure_pad_token(tokenizer)
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            return self.score(model, tokenizer, records, batch_size, items)
        finally:
            model.train(was_training)

    def score(
        self,
        model: Any,
        tokenizer: Any,
        records: list[dict[str, Any]],
        batch_size: int,
        items: dict[str, float] | None,
    ) -> dict[str, float]:
        raise NotImplementedError(f"task {self.name!r} does not implement score()")


def item_id(index: int) -> str:
    """The id of the `index`-th record of an evaluated split, for per-item scores: every method
    of a comparison answers the same split in the same order (the split is a function of the
    seed and sizes), so the position names the item. Zero-padded, so ids sort as positions."""
    return f"{index:06d}"


@dataclass(frozen=True)
class TaskEntry:
    """One registered task: how to get it and which names select it.

    `embedded` is the source a bare task name means without data (None: data is required),
    `with_data` the one it means with a data path; `options` the `TaskOptions` the task reads;
    `configure` makes a task for given options (None: the task reads none and is shared);
    `sizes_splits`: the task takes unset (None) split sizes and sizes the splits from its data."""

    task: Task
    embedded: str | None = None
    with_data: str | None = None
    options: frozenset[str] = frozenset()
    configure: Callable[[TaskOptions], Task] | None = None
    sizes_splits: bool = False

    @property
    def name(self) -> str:
        return self.task.name

    def make(self, options: TaskOptions) -> Task:
        """The task for `options`; a MolfError for an option this task does not read."""
        foreign = [n for n in options.set_names() if n not in self.options]
        if foreign:
            readers = sorted(e.name for e in _REGISTRY.values() if foreign[0] in e.options)
            by = f" (only {', '.join(readers)} does)" if readers else ""
            raise MolfError(f"task '{self.name}' does not read '{foreign[0]}'{by}")
        return self.configure(options) if self.configure is not None else self.task


_REGISTRY: dict[str, TaskEntry] = {}


def register_task(
    task: Task,
    *,
    embedded: str | None = None,
    with_data: str | None = None,
    options: tuple[str, ...] = (),
    configure: Callable[[TaskOptions], Task] | None = None,
    sizes_splits: bool = False,
) -> Task:
    """Make `task` findable by its name and its sources; returns it (for `TASK = register_task(...)`).

    A name already taken by another task is an error: two modules claiming one name would
    otherwise depend on import order."""
    known = {f.name for f in dataclasses.fields(TaskOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"task '{task.name}': unknown options {unknown}")
    for source in (embedded, with_data):
        if source is not None and source not in task.sources:
            raise ValueError(f"task '{task.name}': '{source}' is not one of its sources")
    taken = {s: e.name for e in _REGISTRY.values() for s in (e.name, *e.task.sources)}
    for name in (task.name, *task.sources):
        if taken.get(name, task.name) != task.name:
            raise ValueError(f"task '{task.name}': name '{name}' is taken by '{taken[name]}'")
    _REGISTRY[task.name] = TaskEntry(
        task, embedded, with_data, frozenset(options), configure, sizes_splits
    )
    return task


def registered() -> dict[str, TaskEntry]:
    """The registered tasks by name (a copy)."""
    return dict(_REGISTRY)
