"""The grid of `molf compare`: budgets, the cells they plan, the cells' on-disk format, and the
choice of each (task, method) pair's learning rate on the validation split.

On disk, one cell is one `molf train` run directory `<out>/cells/<task>/<method>/lr-<x>/`; besides
what the run writes (summary.json, metrics.jsonl, routing.jsonl, final/) the runner keeps there
`compare_cell.json` (task, method, learning rates, CPU seconds), `FAILED` (why it failed) and,
while its process runs, `RUNNING`. A cell is done when its summary.json exists. docs/compare.md
describes the protocol for users.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.train import methods
from molf.train.config import TrainConfig, load_config

SUMMARY = "summary.json"  # written last by `molf train`: its presence marks a finished run
CELL_META = "compare_cell.json"
FAILED = "FAILED"
RUNNING = "RUNNING"
JOB_SPEC = "compare_job.json"
SEED_PREFIX = "seed-"  # <group>/seed-<k>/<lr label>: the chosen candidate trained with seed k
# Keys compare sets per cell; users pick them with --tasks/--methods/--model/--seed/--data.
_RESERVED = ("method", "task", "model", "output_dir", "seed", "data")
# Config keys that may differ between a finished cell and the grid asking for it.
_IGNORED_KEYS = {"output_dir", "progress", "eval_before", "logger"}


@dataclass(frozen=True)
class Budget:
    """A grid's size: the default model, TrainConfig values for every cell and per task family
    (fact, med, sql), the torch thread count per cell (None: leave torch's) and how many cells
    run at a time in their own processes (0: one at a time inside this process). Each method's
    learning-rate grid under a budget is the method's own (`Method.lr_grids[budget.name]`)."""

    name: str
    model: str
    settings: dict[str, Any]
    per_task: dict[str, dict[str, Any]]
    threads: int | None = None
    jobs: int = 0
    seeds: int = 1  # training seeds of each chosen candidate (`--seeds`)

    def lr_grid(self, method: str) -> tuple[methods.LRCandidate, ...]:
        """`method`'s learning-rate candidates under this budget, the default first; a method
        without a grid here tries only its config default (TrainConfig's value)."""
        m = methods.get(method)
        if self.name in m.lr_grids:
            return tuple(m.lr_grids[self.name])
        return (getattr(TrainConfig(), m.lr_keys[0]),)


BUDGETS: dict[str, Budget] = {
    "smoke": Budget(
        name="smoke",
        model="tiny-llama",
        settings={
            "n_train": 8,
            "n_val": 2,
            "n_test": 3,
            "max_steps": 3,
            "batch_size": 4,
            "grad_accum": 1,
            "max_length": 64,
            "lora_rank": 8,
            "molf_e_ranks": (4, 8),
            "eval_batch_size": 8,
            "progress": False,
        },
        per_task={},
        # tiny matrices gain nothing from threads, and OpenMP spin-waiting on a busy machine
        # makes 2 threads 10x slower than 1
        threads=1,
    ),
    "small": Budget(
        name="small",
        model="smollm2-135m",
        settings={
            "batch_size": 8,
            "grad_accum": 1,
            "schedule": "cosine",
            "warmup_ratio": 0.1,
            "max_length": 256,
            "lora_rank": 128,
            "molf_e_ranks": (32, 128),
            "eval_batch_size": 16,
            "max_steps": None,
        },
        per_task={
            # test items for paired claims (docs/compare.md): fact's test rewrites are also
            # trained on (n_train = test + validation); med's evaluation is one cached prompt
            # pass per item and world-sql's a short generation, so their test sets are larger
            "fact": {"n_train": 152, "n_val": 24, "n_test": 128, "epochs": 4.0},
            "med": {"n_train": 256, "n_val": 32, "n_test": 512, "epochs": 2.0},
            "world-sql": {"n_train": 192, "n_val": 32, "n_test": 384, "epochs": 2.0},
            "sql": {"n_train": 96, "n_val": 16, "n_test": 48, "epochs": 2.0},
            # a planted folder (`molf planted`) fixes its own training set
            "planted": {"n_train": None, "n_val": 32, "n_test": 128, "epochs": 2.0},
        },
        # two cells at a time with one thread each keeps both cores busy through the
        # single-threaded parts (generation, AdaLoRA's rank bookkeeping, saving)
        threads=1,
        jobs=2,
        # the claims' cells are trained three times (docs/compare.md, Seeds)
        seeds=3,
    ),
    "paper": Budget(
        name="paper",
        model="google/gemma-3-1b-pt",
        settings={
            "n_train": None,
            "n_val": 200,
            "n_test": 500,
            "epochs": 2.0,
            "max_steps": None,
            "batch_size": 8,
            "grad_accum": 4,
            "schedule": "cosine",
            "warmup_ratio": 0.1,
            "max_length": 1024,
            "lora_rank": 128,
            "molf_e_ranks": (32, 128),
            "eval_batch_size": 32,
        },
        per_task={},
        jobs=1,  # a fresh process per cell gives each its own GPU memory peak
    ),
}


@dataclass
class Cell:
    """One planned run: its config, its directory and the learning rates it tries."""

    task: str
    method: str
    lrs: dict[str, float]
    config: TrainConfig

    @property
    def directory(self) -> Path:
        return self.config.run_dir

    @property
    def key(self) -> str:
        parent = self.directory.parent.name
        seed = f"{parent}/" if parent.startswith(SEED_PREFIX) else ""
        return f"{self.task}/{self.method}/{seed}{self.directory.name}"


def format_lr(value: float) -> str:
    """A short, filename-safe learning rate: 5e-05 -> '5e-5', 0.0001 -> '1e-4'."""
    mantissa, exponent = f"{value:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def lr_label(lrs: dict[str, float]) -> str:
    """A candidate's directory name: 'lr-5e-5', or 'lr-fft1e-4-lora5e-5' when the LRs differ."""
    values = list(lrs.values())
    if values and all(v == values[0] for v in values):
        return f"lr-{format_lr(values[0])}"
    return "lr-" + "-".join(f"{k.removeprefix('lr_')}{format_lr(v)}" for k, v in lrs.items())


# -- planning ------------------------------------------------------------------------------------
def task_spec(entry: str) -> tuple[str, str, str | None]:
    """What one `--tasks` entry means: (label, task name, data path). A task or source name is
    itself; a folder `molf planted` made is the `planted` task on it, labelled by its name; any
    other path (an existing file or directory, or anything that can only be a path) is the `sft`
    task on that data, labelled by its file name without the extension."""
    from molf._files import looks_like_path
    from molf.tasks import task_names
    from molf.tasks.planted import is_planted_dir

    path = Path(entry).expanduser()
    if entry in task_names() and not looks_like_path(entry):
        return entry, entry, None
    if path.exists() or looks_like_path(entry):
        if not path.exists():
            raise MolfError(f"--tasks: no such file or directory: {entry}")
        label = path.name.split(".")[0] if path.is_file() else path.name
        if path.is_dir() and is_planted_dir(path):
            return label, "planted", str(path)
        return label or "data", "sft", str(path)
    return entry, entry, None  # an unknown name: get_task says so, listing the known ones


def task_labels(entries: list[str]) -> list[str]:
    """The labels of `--tasks` entries (cell directories and report columns); two entries with
    one label are refused."""
    labels = [task_spec(e)[0] for e in entries]
    for label in labels:
        if labels.count(label) > 1:
            same = [e for e, lab in zip(entries, labels) if lab == label]
            raise MolfError(
                f"--tasks: {' and '.join(same)} would both be labelled '{label}' (rename a file)"
            )
    return labels


def format_candidate(candidate: methods.LRCandidate) -> str:
    """A learning-rate candidate as `--lr-grid` writes it: '1e-4', or '1e-4:5e-4' per key."""
    if isinstance(candidate, tuple):
        return ":".join(format_lr(v) for v in candidate)
    return format_lr(candidate)


def parse_lr_grid(spec: str | None, budget: Budget) -> dict[str, tuple[methods.LRCandidate, ...]]:
    """The grids to use: the budget's, 'off' (each grid's first value) or 'm=v1/v2,...' edits;
    a candidate 'a:b' gives each of the method's learning-rate keys its own value, in order
    (MoLF: lr_fft:lr_lora)."""
    grids = {m: budget.lr_grid(m) for m in methods.names()}
    if spec is None or spec.strip() in ("", "budget"):
        return grids
    if spec.strip() == "off":
        return {m: g[:1] for m, g in grids.items()}
    for entry in spec.split(","):
        if not entry.strip():
            continue
        if "=" not in entry:
            raise MolfError(f"--lr-grid entry '{entry}': expected method=lr1/lr2, or 'off'")
        method, values = (x.strip() for x in entry.split("=", 1))
        if method not in methods.REGISTRY:
            known = ", ".join(methods.names())
            raise MolfError(
                f"--lr-grid entry '{entry}': unknown method '{method}' (known: {known})"
            )
        keys = methods.get(method).lr_keys
        parsed: list[methods.LRCandidate] = []
        for text in (v.strip() for v in values.split("/")):
            if not text:
                continue
            try:
                numbers = tuple(float(x) for x in text.split(":"))
            except ValueError:
                raise MolfError(
                    f"--lr-grid entry '{entry}': learning rates must be numbers like 5e-5"
                ) from None
            if len(numbers) > 1 and len(numbers) != len(keys):
                raise MolfError(
                    f"--lr-grid entry '{entry}': '{text}' gives {len(numbers)} values; "
                    f"{method} has {len(keys)} learning rates ({':'.join(keys)})"
                )
            if any(not v > 0 for v in numbers):
                raise MolfError(f"--lr-grid entry '{entry}': learning rates must be > 0")
            parsed.append(numbers if len(numbers) > 1 else numbers[0])
        if not parsed:
            raise MolfError(f"--lr-grid entry '{entry}': give one or more learning rates > 0")
        grids[method] = tuple(dict.fromkeys(parsed))
    return grids


def plan_grid(
    budget: str,
    tasks: list[str],
    method_names: list[str],
    output_dir: str | Path,
    model: str | None = None,
    seed: int = 0,
    overrides: list[str] | None = None,
    lr_grid: str | None = None,
    data: dict[str, str] | None = None,
) -> list[Cell]:
    """Every cell of the grid, task-major (so each task's column completes early), configs
    validated before any compute is spent."""
    from molf.tasks import get_task

    if budget not in BUDGETS:
        raise MolfError(f"--budget: must be one of {', '.join(BUDGETS)}, got {budget!r}")
    b = BUDGETS[budget]
    for m in method_names:
        if m not in methods.REGISTRY:
            known = ", ".join(methods.names())
            raise MolfError(f"--methods: unknown method '{m}' (known: {known})")
    overrides = list(overrides or [])
    user_keys = set()
    for item in overrides:
        if "=" not in item:
            raise MolfError(f"override '{item}': expected key=value")
        key = item.split("=", 1)[0].strip()
        if key in _RESERVED:
            raise MolfError(
                f"override '{item}': compare sets '{key}' per cell "
                "(use --tasks, --methods, --model, --seed, --data, --output-dir)"
            )
        user_keys.add(key)
    grids = parse_lr_grid(lr_grid, b)
    root = Path(output_dir) / "cells"
    cells: list[Cell] = []
    task_labels(tasks)
    for entry in tasks:
        task, task_name, path = task_spec(entry)
        family = get_task(task_name).name
        first_of_task = True
        for method in method_names:
            lr_keys = methods.get(method).lr_keys
            grid = grids[method]
            if any(k in user_keys for k in lr_keys):
                grid = grid[:1]  # the override decides; the other tied key keeps the default
            for lr in grid:
                values = {**b.settings, **b.per_task.get(family, {})}
                values.update(methods.lr_values(lr_keys, lr))
                values = {k: v for k, v in values.items() if k not in user_keys}
                if "eval_before" not in user_keys:
                    # the untrained model is scored once per task, not once per cell
                    values["eval_before"] = first_of_task
                nulls = [f"{k}=null" for k, v in values.items() if v is None]
                explicit = {k: v for k, v in values.items() if v is not None}
                explicit.update(
                    method=method,
                    task=task_name,
                    model=model or b.model,
                    seed=seed,
                    data=path or (data or {}).get(task),
                    output_dir=str(root / task / method / "lr-pending"),
                )
                try:
                    cfg = load_config(None, nulls + overrides, **explicit)
                except MolfError as e:
                    raise MolfError(
                        f"cell {task}/{method} (lr {format_candidate(lr)}): {e}"
                    ) from None
                lrs = {k: getattr(cfg, k) for k in lr_keys}
                cfg.output_dir = str(root / task / method / lr_label(lrs))
                if any(c.directory == cfg.run_dir for c in cells):
                    continue  # the same candidate twice (an override collapsed the grid)
                cells.append(Cell(task, method, lrs, cfg))
                first_of_task = False
    for c in cells:
        n_candidates = sum(1 for o in cells if (o.task, o.method) == (c.task, c.method))
        if n_candidates > 1 and c.config.n_val == 0:
            raise MolfError(
                f"cell {c.key}: choosing among {n_candidates} learning rates needs a validation "
                "split, but n_val=0 (set n_val > 0, or use --lr-grid off)"
            )
    return cells


def seed_cells(cells: list[Cell], seeds: int, seed_methods: list[str] | None = None) -> list[Cell]:
    """The cells that train each chosen candidate again with other seeds.

    For every (task, method) of `cells` (methods in `seed_methods`, or all) whose learning-rate
    candidates have all finished, the chosen one (`choose`, on the validation split of the grid's
    seed) is planned again with training seeds grid seed + 1 .. grid seed + seeds - 1. The split
    stays the grid seed's (`data_seed`), so every seed answers the same test items and the
    report can pair them across methods and seeds. Pairs whose choice is not final yet get none.
    """
    if seeds <= 1:
        return []
    groups: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        if c.directory.parent.name.startswith(SEED_PREFIX):
            continue
        groups.setdefault((c.task, c.method), []).append(c)
    out = []
    for (task, method), group in groups.items():
        if seed_methods is not None and method not in seed_methods:
            continue
        records = [read_cell(c.directory, task, method) for c in group]
        if any(r.status != "done" for r in records):
            continue
        chosen = choose(records)
        if chosen is None:
            continue
        base = next(c for c in group if c.directory == chosen.directory)
        first = base.config.seed
        for k in range(1, seeds):
            cfg = dataclasses.replace(
                base.config,
                seed=first + k,
                data_seed=base.config.split_seed,
                eval_before=False,
                output_dir=str(
                    base.directory.parent / f"{SEED_PREFIX}{first + k}" / base.directory.name
                ),
            )
            out.append(Cell(task, method, dict(base.lrs), cfg))
    return out


def config_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first key (other than bookkeeping) whose value differs between two configs' dicts."""
    for key in sorted(set(old) & set(new) - _IGNORED_KEYS):
        a, b = old[key], new[key]
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            return f"{key}: {a!r} there, {b!r} now"
    return None


def check_finished(cells: list[Cell]) -> None:
    """Refuse to reuse a finished cell whose config differs from the one planned now."""
    for c in cells:
        summary = read_summary(c.directory)
        if summary is None:
            continue  # not finished, or unreadable: treated as not finished when it is run
        diff = config_mismatch(summary.get("config") or {}, c.config.to_dict())
        if diff:
            raise MolfError(
                f"{c.directory / SUMMARY}: this finished cell was run with a different config ({diff}); "
                "use another --output-dir, or delete the cell to rerun it"
            )


# -- the cells on disk, and the choice among them -------------------------------------------------
@dataclass
class CellRecord:
    """One learning-rate candidate of one (task, method) pair, as found on disk."""

    task: str
    method: str
    label: str
    directory: Path
    status: str  # done | failed | interrupted (started, never finished)
    summary: dict[str, Any] | None = None
    error: str | None = None
    lrs: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float | None = None
    seed: int | None = None  # the training seed (from the summary's config)

    @property
    def headline(self) -> str | None:
        return self.summary.get("headline_metric") if self.summary else None

    def score(self, split: str = "after") -> float | None:
        """The headline metric on the test split ('after'), 'validation' or 'before' (fraction)."""
        if not self.summary or not self.headline:
            return None
        value = (self.summary.get(split) or {}).get(self.headline)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    @property
    def lower_is_better(self) -> bool:
        """Whether the headline metric is loss-like (the smaller the better)."""
        from molf.tasks import lower_is_better

        return bool(self.headline) and lower_is_better(self.headline or "")

    def shown(self, split: str = "after") -> float | None:
        """`score(split)` as reports show it: points (percent) for a score, as is for a loss."""
        value = self.score(split)
        if value is None or self.lower_is_better:
            return value
        return 100.0 * value

    @property
    def lr_text(self) -> str:
        if not self.lrs:
            return self.label.removeprefix("lr-")
        values = list(self.lrs.values())
        if all(v == values[0] for v in values):
            return format_lr(values[0])
        return ", ".join(f"{k}={format_lr(v)}" for k, v in self.lrs.items())


def read_json(path: Path) -> Any:
    """The JSON value in `path`; None when the file is missing or not (yet) valid JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_done(cell: Cell) -> bool:
    return (cell.directory / SUMMARY).exists()


def read_summary(directory: Path) -> dict[str, Any] | None:
    """A finished cell's summary.json; None when the cell has none (or an unreadable one)."""
    summary = read_json(directory / SUMMARY)
    return summary if isinstance(summary, dict) else None


def read_cell(directory: Path, task: str, method: str) -> CellRecord:
    """The state of one cell directory: done (summary.json), failed (FAILED) or interrupted."""
    meta = read_json(directory / CELL_META) or {}
    summary = read_summary(directory)
    lrs = dict(meta.get("lrs") or {})
    if not lrs and summary:
        config = summary.get("config") or {}
        lr_keys = methods.get(method).lr_keys if method in methods.REGISTRY else ()
        lrs = {k: config[k] for k in lr_keys if k in config}
    record = CellRecord(task, method, directory.name, directory, "interrupted", lrs=lrs)
    cpu = meta.get("cpu_seconds")
    record.cpu_seconds = float(cpu) if isinstance(cpu, (int, float)) else None
    if summary is not None:
        record.status, record.summary = "done", summary
        seed = (summary.get("config") or {}).get("seed")
        record.seed = seed if isinstance(seed, int) else None
    elif (directory / FAILED).exists():
        record.status = "failed"
        text = (directory / FAILED).read_text(errors="replace").strip()
        record.error = text.splitlines()[0] if text else "failed"
    return record


def load_cells(
    out_dir: str | Path, tasks: list[str], method_names: list[str]
) -> tuple[list[CellRecord], list[CellRecord]]:
    """(every learning-rate candidate directory, every other-seed directory) of the given tasks
    and methods under `<out_dir>/cells/`."""
    root = Path(out_dir) / "cells"
    found, seeded = [], []
    for task in tasks:
        for method in method_names:
            group = root / task / method
            if not group.is_dir():
                continue
            for d in sorted(p for p in group.iterdir() if p.is_dir()):
                if d.name.startswith("lr-"):
                    found.append(read_cell(d, task, method))
                elif d.name.startswith(SEED_PREFIX):
                    for lr_dir in sorted(p for p in d.iterdir() if p.name.startswith("lr-")):
                        seeded.append(read_cell(lr_dir, task, method))
    return found, seeded


def choose(candidates: list[CellRecord]) -> CellRecord | None:
    """The candidate with the best validation headline metric (never the test split): the
    highest score, or the lowest loss-like metric (`molf.tasks.lower_is_better`).

    Ties go to the lower final training loss, then the label, so the choice is deterministic.
    A lone finished candidate needs no validation metric; several without one give None.
    """
    done = [c for c in candidates if c.status == "done"]
    if len(done) == 1:
        return done[0]
    scored = [c for c in done if c.score("validation") is not None]
    if not scored:
        return None

    def key(c: CellRecord) -> tuple[float, float, str]:
        loss = (c.summary or {}).get("final_loss")
        loss = loss if isinstance(loss, (int, float)) and math.isfinite(loss) else math.inf
        value = c.score("validation")
        # the best first: the smallest loss-like metric, the largest score
        return (value if c.lower_is_better else -value, loss, c.label)  # type: ignore[operator]

    return min(scored, key=key)


@dataclass
class Results:
    """The grid as read from disk: candidates per (task, method) and the chosen one."""

    tasks: list[str]
    methods: list[str]
    cells: list[CellRecord]
    seeded: list[CellRecord] = field(default_factory=list)
    groups: dict[tuple[str, str], list[CellRecord]] = field(default_factory=dict)
    chosen: dict[tuple[str, str], CellRecord | None] = field(default_factory=dict)
    # the chosen candidate and its finished runs with other seeds, the chosen one first
    replicas: dict[tuple[str, str], list[CellRecord]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for task in self.tasks:
            for method in self.methods:
                group = [c for c in self.cells if c.task == task and c.method == method]
                self.groups[(task, method)] = group
                chosen = choose(group)
                self.chosen[(task, method)] = chosen
                self.replicas[(task, method)] = (
                    []
                    if chosen is None
                    else [chosen]
                    + [
                        c
                        for c in self.seeded
                        if (c.task, c.method, c.label) == (task, method, chosen.label)
                        and c.status == "done"
                    ]
                )

    def score(self, task: str, method: str) -> float | None:
        """Test headline metric of the chosen candidate, in points (percent), averaged over its
        seeds; a loss-like metric (`lower_is_better`) as it is."""
        values = [c.shown("after") for c in self.replicas.get((task, method), [])]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    def n_seeds(self, task: str, method: str) -> int:
        """How many seeds the chosen candidate's score is the mean of."""
        return len(self.replicas.get((task, method), []))

    def lower_is_better(self, task: str) -> bool:
        """Whether the task's headline metric is loss-like (shown as is, the smaller the better)."""
        from molf.tasks import lower_is_better

        return lower_is_better(self.headline(task))

    def point_tasks(self) -> list[str]:
        """The tasks whose headline is a score in points (the ones a mean or a claim is over)."""
        return [t for t in self.tasks if not self.lower_is_better(t)]

    def mean(self, method: str) -> float | None:
        """Mean over tasks, only when every task has a score in points (a loss and a
        percentage do not average)."""
        return self.average([self.score(t, method) for t in self.tasks])

    def average(self, values: list[float | None]) -> float | None:
        """The mean of one value per task: None unless all are present and in points."""
        if len(self.point_tasks()) != len(self.tasks):
            return None
        return mean_of_all(values)

    def _task_name(self, task: str) -> str | None:
        """The registered task (or source) name a column's cells were trained on."""
        for c in self.cells + self.seeded:
            name = ((c.summary or {}).get("config") or {}).get("task")
            if c.task == task and isinstance(name, str):
                return name
        return None

    def family(self, task: str) -> str:
        """The task family of a column (`fact`, `med`, `world-sql`, ...; the label if unknown)."""
        from molf.tasks import get_task

        name = self._task_name(task)
        try:
            return get_task(name).name if name else task
        except MolfError:
            return task

    def chance(self, task: str) -> float | None:
        """The chance level of a multiple-choice task (None for the others)."""
        from molf.tasks import get_task

        name = self._task_name(task)
        try:
            return getattr(get_task(name), "chance_level", None) if name else None
        except MolfError:
            return None

    def headline(self, task: str) -> str:
        for c in self.cells:
            if c.task == task and c.headline:
                return c.headline
        return "headline"

    def n_test(self, task: str) -> int | None:
        """How many test records the task's scores are over (from any finished cell)."""
        for c in self.cells:
            n = (c.summary or {}).get("n_test_records") if c.task == task else None
            if isinstance(n, int) and n > 0:
                return n
        return None

    def base(self, task: str) -> float | None:
        """The untrained model's test headline (points, or a loss as is), from any cell that
        evaluated it."""
        for c in self.cells:
            if c.task == task and c.score("before") is not None:
                return c.shown("before")
        return None


def load_results(out_dir: str | Path, tasks: list[str], method_names: list[str]) -> Results:
    """Read the grid under `out_dir` and pick each pair's learning rate on validation."""
    found, seeded = load_cells(out_dir, tasks, method_names)
    return Results(list(tasks), list(method_names), found, seeded)


def mean_of_all(values: list[float | None]) -> float | None:
    """Mean of the values, None unless every one is present."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]
