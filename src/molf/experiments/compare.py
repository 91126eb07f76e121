"""`molf compare`: run every method on every task under one budget, then write the report.

    molf compare --tasks fact-geo,med-icd10,spider-dev --methods fft,lora,adalora,molf,molf-e \\
        --budget small

Cells. One cell is one `molf.train.run` of (task, method, learning rate) in
`<out>/cells/<task>/<method>/lr-<x>/`. A cell is done when its summary.json exists; done cells
are skipped, so the grid is resumable (an interrupted cell resumes from its last checkpoint, if
any). A cell that raises gets its error written to `<cell>/FAILED` and the grid goes on; failed
cells are retried on the next invocation (`--skip-failed` keeps them as they are). With
`--jobs N` (N >= 1) every cell runs in its own process, N at a time: its peak memory is its own,
and a cell whose process dies is marked FAILED with the exit status -- except one killed by
SIGKILL while other cells ran (the OOM killer, when cells that each fit do not fit together):
that one runs again, alone, after the others.
With `--jobs 0` cells run inside this process; a RUNNING marker left behind means the process
died inside that cell: it is retried once, then marked FAILED.
A finished cell whose config differs from what the grid now asks for is refused: use a new
`--output-dir`.

Fairness. Within a task every method gets the same data (split seed), the same number of
optimizer steps and the same evaluation. Learning rates come from a per-method grid; every
candidate is trained with the full budget and the one with the best *validation* headline metric
is reported (ties: lower final training loss); the test split never takes part in the choice.
Chosen values go into results.csv/md. An LR key given as an override (`lr_lora=1e-4`) fixes it
and removes the grid of the methods that use it; `--lr-grid off` uses each grid's first value;
`--lr-grid fft=1e-4/5e-5,lora=5e-4` replaces grids.

Budgets (`BUDGETS`):

* `smoke`: `tiny-llama` (random init), 8 training examples, 2 validation and 3 test records,
  3 steps of batch 4, rank 8 (MoLF-E: 4 and 8), one thread. A 2-value grid for LoRA only, to
  exercise the selection. 18 cells, about 1-4 s each on one core (the SQL cells are the slow
  ones: 128-token greedy generations of a random model that never stops early). For the tests.

* `small`: `smollm2-135m` on CPU (2 cores), batch 8 (no accumulation), cosine, warmup 0.1,
  rank 128, MoLF-E ranks 32/128, max_length 256; two cells at a time, one thread each (on a
  busy 2-core machine two-thread torch loses most of its time spin-waiting; single-threaded
  parts -- generation, AdaLoRA's rank bookkeeping, saving -- keep the other core busy).
  Grids (the paper's, cut to 2 values; with <= 44 steps the smallest FFT value is the least
  likely to win): FFT {1e-4, 5e-5}, LoRA and MoLF-E {5e-4, 5e-5}, AdaLoRA {5e-3, 5e-4} and
  MoLF {1e-4, 5e-5} for both experts. AdaLoRA's grid is moved up a decade: peft starts its
  singular values E at zero and scales the update by alpha / (current rank), so in ~40 steps
  at the paper's values it barely leaves the untrained model's score; 5e-3 gives it a fair
  chance and 5e-4, the paper's top value, stays in the grid. The paper runs MoLF untuned at
  5e-5, a value set for 2 epochs of thousands of steps; at ~40 steps FFT's 1e-4 wins, so a
  MoLF held to 5e-5 would be compared with an FFT that got the better LR (measured on
  fact-geo: FFT 87.5 at 1e-4, 75.0 at 5e-5; MoLF 71.9 at 5e-5). MoLF gets FFT's two values
  instead; its 5e-5 cell stays in the report's candidate table (`--lr-grid molf=5e-5`
  reproduces the paper's protocol). So 10 candidates per task, 30 cells.

  Cost arithmetic, from one-thread CPU seconds measured on this machine (per optimizer step of
  8 sequences: fwd + bwd + optimizer; evaluation per record, base model):

  | task       | train/val/test | epochs | steps | s/step fft lora ada molf molf-e | eval s/rec |
  | ---------- | -------------- | ------ | ----- | ------------------------------- | ---------- |
  | fact-geo   | 88/24/64       | 4      | 44    |  1.9  1.4  3.2  3.0  1.6        | 0.53       |
  | med-icd10  | 128/32/128     | 2      | 32    |  8.3  7.5  9.1  9.3  7.7        | 0.23       |
  | spider-dev | 96/16/48       | 2      | 24    | 21.5 22.6 26.8 27.0 22.8        | 1.6        |

  (fact-geo: n_train = the test + validation rewrites, which are always trained on, see
  molf.tasks.fact; spider-dev sequences are cut to 256 tokens.) Per task: training =
  (2 fft + 2 lora + 2 adalora + 2 molf + 2 molf-e) x s/step x steps; scoring = 10 x (val +
  test) x eval s + one untrained-model test evaluation; ~20 s per cell to start, load and save:

    fact-geo    22.2 s x 44 =   977 s + eval 10 x  88 x 0.53 +  64 x 0.53 =  500 s + 200 = 1,677 s
    med-icd10   83.8 s x 32 = 2,682 s + eval 10 x 160 x 0.23 + 128 x 0.23 =  397 s + 200 = 3,279 s
    spider-dev 241.4 s x 24 = 5,794 s + eval 10 x  64 x 1.6  +  48 x 1.6  = 1101 s + 200 = 7,095 s

  Total ~12,000 CPU seconds; two cells at a time on 2 cores: ~6,000 s = 1.7 h, ~2 h if the two
  processes slow each other by 20% (memory bandwidth). Check on fact-geo, full cells under load:
  FFT 116 and LoRA 102 CPU seconds against 151 and 129 estimated, so the table errs high.
  Cheaper: `--lr-grid off` (15 cells, ~0.9 h), or `--tasks fact-geo,med-icd10` (spider-dev is
  60% of the cost). A machine shared with other work stretches wall time, not CPU time (the
  report gives both).

* `paper`: the paper's setting for GPU users (method.md section 1): `google/gemma-3-1b-pt` unless
  `--model` names another (Qwen/Qwen2.5-1.5B, Qwen/Qwen2.5-3B), batch 8 x 4, 2 epochs, cosine,
  warmup 0.1, rank 128, MoLF-E 32/128, the paper's full grids: FFT {1e-4, 5e-5, 2e-5}, LoRA,
  AdaLoRA and MoLF-E {5e-4, 5e-5}, MoLF 5e-5. All training records (n_train null), 200
  validation and 500 test records (our choice), max_length 1024, float32 weights.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from molf._files import write_json_atomic
from molf.errors import MolfError
from molf.experiments.report import (
    CELL_META,
    FAILED,
    LR_KEYS,
    RUNNING,
    choose,
    format_lr,
    lr_label,
    package_versions,
    read_cell,
    write_report,
)
from molf.train.config import METHODS, TrainConfig, load_config

# Keys compare sets per cell; users pick them with --tasks/--methods/--model/--seed/--data.
_RESERVED = ("method", "task", "model", "output_dir", "seed", "data")
# Config keys that may differ between a finished cell and the grid asking for it.
_IGNORED_KEYS = {"output_dir", "progress", "eval_before", "logger"}
JOB_SPEC = "compare_job.json"


@dataclass(frozen=True)
class Budget:
    """A grid's size: the default model, TrainConfig values for every cell and per task family
    (fact, med, sql), the learning-rate grid of each method (first value = the default), the
    torch thread count per cell (None: leave torch's) and how many cells run at a time in their
    own processes (0: one at a time inside this process)."""

    name: str
    model: str
    settings: dict[str, Any]
    per_task: dict[str, dict[str, Any]]
    lr_grids: dict[str, tuple[float, ...]]
    threads: int | None = None
    jobs: int = 0


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
        lr_grids={
            "fft": (1e-3,),
            "lora": (1e-3, 1e-4),
            "adalora": (1e-3,),
            "molf": (1e-3,),
            "molf-e": (1e-3,),
        },
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
            "fact": {"n_train": 88, "n_val": 24, "n_test": 64, "epochs": 4.0},
            "med": {"n_train": 128, "n_val": 32, "n_test": 128, "epochs": 2.0},
            "sql": {"n_train": 96, "n_val": 16, "n_test": 48, "epochs": 2.0},
        },
        lr_grids={
            "fft": (1e-4, 5e-5),
            "lora": (5e-4, 5e-5),
            "adalora": (5e-3, 5e-4),
            "molf": (1e-4, 5e-5),
            "molf-e": (5e-4, 5e-5),
        },
        # two cells at a time with one thread each keeps both cores busy through the
        # single-threaded parts (generation, AdaLoRA's rank bookkeeping, saving)
        threads=1,
        jobs=2,
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
        lr_grids={
            "fft": (1e-4, 5e-5, 2e-5),
            "lora": (5e-4, 5e-5),
            "adalora": (5e-4, 5e-5),
            "molf": (5e-5,),
            "molf-e": (5e-4, 5e-5),
        },
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
        return f"{self.task}/{self.method}/{self.directory.name}"


@dataclass
class Outcome:
    """What happened to a cell in this invocation."""

    cell: Cell
    status: str  # done | skipped (done before) | failed | skipped-failed
    seconds: float = 0.0
    error: str | None = None
    summary: dict[str, Any] | None = field(default=None, repr=False)


# -- planning ------------------------------------------------------------------------------------
def _split_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise MolfError(f"--{what}: empty list")
    if len(set(items)) != len(items):
        raise MolfError(f"--{what}: '{text}' names an item twice")
    return items


def parse_lr_grid(spec: str | None, budget: Budget) -> dict[str, tuple[float, ...]]:
    """The grids to use: the budget's, 'off' (each grid's first value) or 'm=v1/v2,...' edits."""
    grids = dict(budget.lr_grids)
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
        if method not in METHODS:
            known = ", ".join(METHODS)
            raise MolfError(
                f"--lr-grid entry '{entry}': unknown method '{method}' (known: {known})"
            )
        try:
            parsed = tuple(float(v) for v in values.split("/") if v.strip())
        except ValueError:
            raise MolfError(
                f"--lr-grid entry '{entry}': learning rates must be numbers like 5e-5"
            ) from None
        if not parsed or any(not v > 0 for v in parsed):
            raise MolfError(f"--lr-grid entry '{entry}': give one or more learning rates > 0")
        grids[method] = tuple(dict.fromkeys(parsed))
    return grids


def _parse_data(items: list[str] | None, tasks: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise MolfError(f"--data '{item}': expected task=path (e.g. counterfact=cf.json)")
        task, path = (x.strip() for x in item.split("=", 1))
        if task not in tasks:
            raise MolfError(
                f"--data '{item}': task '{task}' is not in --tasks ({', '.join(tasks)})"
            )
        out[task] = path
    return out


def plan_grid(
    budget: str,
    tasks: list[str],
    methods: list[str],
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
    for m in methods:
        if m not in METHODS:
            raise MolfError(f"--methods: unknown method '{m}' (known: {', '.join(METHODS)})")
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
    for task in tasks:
        family = get_task(task).name
        first_of_task = True
        for method in methods:
            lr_keys = LR_KEYS[method]
            grid = grids.get(method) or (5e-5,)
            if any(k in user_keys for k in lr_keys):
                grid = grid[:1]  # the override decides; the other tied key keeps the default
            for lr in grid:
                values = {**b.settings, **b.per_task.get(family, {})}
                values.update({k: lr for k in lr_keys})
                values = {k: v for k, v in values.items() if k not in user_keys}
                if "eval_before" not in user_keys:
                    # the untrained model is scored once per task, not once per cell
                    values["eval_before"] = first_of_task
                nulls = [f"{k}=null" for k, v in values.items() if v is None]
                explicit = {k: v for k, v in values.items() if v is not None}
                explicit.update(
                    method=method,
                    task=task,
                    model=model or b.model,
                    seed=seed,
                    data=(data or {}).get(task),
                    output_dir=str(root / task / method / "lr-pending"),
                )
                try:
                    cfg = load_config(None, nulls + overrides, **explicit)
                except MolfError as e:
                    raise MolfError(f"cell {task}/{method} (lr {format_lr(lr)}): {e}") from None
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


def _config_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str | None:
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
        path = c.directory / "summary.json"
        if not path.exists():
            continue
        try:
            old = json.loads(path.read_text()).get("config") or {}
        except ValueError:
            continue  # unreadable: treated as not finished when it is run
        diff = _config_mismatch(old, c.config.to_dict())
        if diff:
            raise MolfError(
                f"{path}: this finished cell was run with a different config ({diff}); "
                "use another --output-dir, or delete the cell to rerun it"
            )


# -- running ---------------------------------------------------------------------------------------
def _reset_peak_memory() -> None:
    """Make the next cell's peak-memory figure its own, not the process's lifetime peak."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # Linux: writing 5 resets the peak resident set size (VmHWM, which ru_maxrss reports)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _headline_text(summary: dict[str, Any]) -> str:
    h = summary.get("headline_metric")
    val = (summary.get("validation") or {}).get(h)
    test = (summary.get("after") or {}).get(h)
    parts = [f"{h}:"]
    if isinstance(val, (int, float)):
        parts.append(f"validation {100 * val:.1f}")
    if isinstance(test, (int, float)):
        parts.append(f"test {100 * test:.1f}")
    return " ".join(parts)


def run_cell(cell: Cell, skip_failed: bool = False) -> Outcome:
    """Run one cell unless it is done; record a failure instead of raising (interrupts excepted)."""
    from molf.train.loop import Interrupted, run

    d = cell.directory
    if (d / "summary.json").exists():
        try:
            summary = json.loads((d / "summary.json").read_text())
        except ValueError:
            summary = None
        if summary is not None:
            return Outcome(cell, "skipped", summary=summary)
    if skip_failed and (d / FAILED).exists():
        return Outcome(cell, "skipped-failed", error=read_cell(d, cell.task, cell.method).error)
    attempts = 0
    if (d / RUNNING).exists():
        attempts = int((json.loads((d / RUNNING).read_text() or "{}") or {}).get("attempts", 1))
        if attempts >= 2:
            msg = (
                f"the process died {attempts} times inside this cell without an error "
                "(killed? out of memory?)"
            )
            (d / FAILED).write_text(msg + "\n")
            (d / RUNNING).unlink()
            return Outcome(cell, "failed", error=msg)
    if (d / "config.yaml").exists() and not (d / "summary.json").exists():
        old = yaml.safe_load((d / "config.yaml").read_text()) or {}
        if _config_mismatch(old, cell.config.to_dict()):
            shutil.rmtree(d)  # a leftover of another config: its checkpoints cannot be resumed
    d.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        d / CELL_META,
        {"task": cell.task, "method": cell.method, "lrs": cell.lrs, "label": d.name},
    )
    write_json_atomic(d / RUNNING, {"attempts": attempts + 1, "pid": os.getpid()})
    with contextlib.suppress(FileNotFoundError):
        (d / FAILED).unlink()
    _reset_peak_memory()
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        summary = run(cell.config, resume="auto")
    except (Interrupted, KeyboardInterrupt):
        with contextlib.suppress(FileNotFoundError):
            (d / RUNNING).unlink()
        raise
    except Exception as e:  # noqa: BLE001 - one failed cell must not stop the grid
        msg = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
        (d / FAILED).write_text(msg + "\n\n" + traceback.format_exc())
        with contextlib.suppress(FileNotFoundError):
            (d / RUNNING).unlink()
        del e
        gc.collect()
        return Outcome(cell, "failed", time.perf_counter() - t0, error=msg)
    seconds = time.perf_counter() - t0
    # CPU seconds (all threads) say what a cell costs even when the machine is shared
    meta = {"task": cell.task, "method": cell.method, "lrs": cell.lrs, "label": d.name}
    meta["cpu_seconds"] = round(time.process_time() - cpu0, 1)
    write_json_atomic(d / CELL_META, meta)
    with contextlib.suppress(FileNotFoundError):
        (d / RUNNING).unlink()
    gc.collect()
    return Outcome(cell, "done", seconds, summary=summary)


def _is_done(cell: Cell) -> bool:
    return (cell.directory / "summary.json").exists()


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `to_dict()` output (None values survive, unlike keywords)."""
    nulls = [f"{k}=null" for k, v in values.items() if v is None]
    return load_config(None, nulls, **{k: v for k, v in values.items() if v is not None})


def _launch(cell: Cell, threads: int | None) -> subprocess.Popen:
    """Start `python -m molf.experiments.compare --cell <spec>` for one cell; its output goes to log.txt."""
    d = cell.directory
    d.mkdir(parents=True, exist_ok=True)
    spec = {
        "task": cell.task,
        "method": cell.method,
        "lrs": cell.lrs,
        "threads": threads,
        "config": cell.config.to_dict(),
    }
    write_json_atomic(d / JOB_SPEC, spec)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with (d / "log.txt").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "molf.experiments.compare", "--cell", str(d / JOB_SPEC)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            # own session: a terminal's Ctrl-C reaches only us, and we pass on exactly one
            # SIGINT (a second one would make the cell stop without its checkpoint)
            start_new_session=True,
        )


def _collect(cell: Cell, code: int, seconds: float) -> Outcome:
    """The outcome of a finished cell process, from what it left on disk."""
    rec = read_cell(cell.directory, cell.task, cell.method)
    if rec.status == "done":
        return Outcome(cell, "done", seconds, summary=rec.summary)
    if rec.status == "failed" and code == 1:
        return Outcome(cell, "failed", seconds, error=rec.error)
    log = cell.directory / "log.txt"
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    msg = f"the cell's process {how} without a result" + (
        f" (last output: {tail[0][:200]})" if tail else ""
    )
    (cell.directory / FAILED).write_text(msg + "\n")
    with contextlib.suppress(FileNotFoundError):
        (cell.directory / RUNNING).unlink()
    return Outcome(cell, "failed", seconds, error=msg)


def _run_in_subprocesses(
    cells: list[Cell],
    jobs: int,
    threads: int | None,
    skip_failed: bool,
    starting: Any,
    record: Any,
) -> None:
    """Run up to `jobs` cells at a time, each in a fresh process (own memory peak, and a crash
    or OOM kill takes down one cell, not the grid). A cell killed by SIGKILL while it shared the
    machine with other cells (the kernel's OOM killer: two cells that each fit can together
    exceed the memory) is not failed: it runs again, alone, after the others. Killed alone, it
    fails. On Ctrl-C or SIGTERM the running cells get SIGINT, write a checkpoint and stop; the
    next invocation resumes them."""
    queue = list(range(len(cells)))
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    solo: list[int] = []  # killed next to other cells: retried one at a time at the end
    alone = False
    old_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread: keep the default
        signal.signal(signal.SIGTERM, on_term)
    try:
        while queue or running or solo:
            if not queue and not running:  # the shared phase is over
                queue, solo, alone = solo, [], True
            while queue and len(running) < (1 if alone else jobs):
                i = queue.pop(0)
                cell = cells[i]
                if _is_done(cell):
                    summary = json.loads((cell.directory / "summary.json").read_text())
                    record(i, Outcome(cell, "skipped", summary=summary))
                elif skip_failed and (cell.directory / FAILED).exists():
                    rec = read_cell(cell.directory, cell.task, cell.method)
                    record(i, Outcome(cell, "skipped-failed", error=rec.error))
                else:
                    starting(i)
                    running[i] = (_launch(cell, threads), time.perf_counter())
            for i, (proc, t0) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[i]
                if code in (130, 143):
                    raise KeyboardInterrupt
                if code == -signal.SIGKILL and jobs > 1 and not alone:
                    with contextlib.suppress(FileNotFoundError):
                        (cells[i].directory / RUNNING).unlink()
                    print(
                        f"{cells[i].key}: killed (SIGKILL, most likely out of memory) while "
                        "other cells ran; it runs again alone after them",
                        flush=True,
                    )
                    solo.append(i)
                    continue
                record(i, _collect(cells[i], code, time.perf_counter() - t0))
            if running:
                time.sleep(0.5)
    except BaseException:
        for proc, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for proc, _ in running.values():
            try:
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, old_term)


def _cell_main(spec_path: str) -> int:
    """Body of a cell process: run the cell described by a compare_job.json."""
    import warnings

    import torch

    from molf.train.loop import Interrupted

    warnings.filterwarnings("ignore", category=FutureWarning)
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    cell = Cell(spec["task"], spec["method"], spec["lrs"], config_from_dict(spec["config"]))
    try:
        outcome = run_cell(cell)
    except Interrupted as e:
        return e.code
    except KeyboardInterrupt:
        return 130
    return 0 if outcome.status in ("done", "skipped") else 1


def _prune_models(cells: list[Cell], keep: str) -> None:
    """Drop `final/` (merged weights, adapters) of the cells the report does not need."""
    if keep == "all":
        return
    group = [read_cell(c.directory, c.task, c.method) for c in cells]
    chosen = choose(group) if keep == "chosen" else None
    if keep == "chosen" and any(r.status != "done" for r in group):
        return  # the choice may still change
    for r in group:
        if r.status == "done" and r is not chosen and (r.directory / "final").exists():
            shutil.rmtree(r.directory / "final", ignore_errors=True)


@dataclass
class CompareResult:
    """The grid of one `compare` call: planned cells, what happened to each, the report files."""

    output_dir: Path
    cells: list[Cell]
    outcomes: list[Outcome]
    paths: dict[str, Path]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in ("failed", "skipped-failed")]


def format_plan(cells: list[Cell]) -> str:
    """One line per cell: where it runs and the settings that decide its cost."""
    lines = []
    for c in cells:
        cfg = c.config
        steps = f"max_steps {cfg.max_steps}" if cfg.max_steps else f"epochs {cfg.epochs:g}"
        lrs = ", ".join(f"{k}={format_lr(v)}" for k, v in c.lrs.items())
        lines.append(
            f"{c.key}: {cfg.model}, n_train {cfg.n_train}, n_val {cfg.n_val}, n_test {cfg.n_test}, "
            f"{steps}, batch {cfg.batch_size}x{cfg.grad_accum}, {lrs}"
            + (", eval_before" if cfg.eval_before else "")
            + (" [done]" if (c.directory / "summary.json").exists() else "")
        )
    return "\n".join(lines)


def _command(
    budget: str,
    model: str,
    tasks: list[str],
    methods: list[str],
    out: Path,
    seed: int,
    overrides: list[str],
    lr_grid: str | None,
    data: dict[str, str] | None,
) -> str:
    parts = ["molf compare", f"--budget {budget}", f"--model {shlex.quote(model)}"]
    parts += [f"--tasks {','.join(tasks)}", f"--methods {','.join(methods)}"]
    parts += [f"--output-dir {shlex.quote(str(out))}", f"--seed {seed}"]
    if lr_grid:
        parts.append(f"--lr-grid {shlex.quote(lr_grid)}")
    parts += [f"--data {shlex.quote(f'{t}={p}')}" for t, p in (data or {}).items()]
    return " ".join(parts + [shlex.quote(o) for o in overrides])


def compare(
    budget: str = "small",
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    model: str | None = None,
    output_dir: str | Path | None = None,
    seed: int = 0,
    overrides: list[str] | None = None,
    lr_grid: str | None = None,
    data: dict[str, str] | None = None,
    threads: int | None = None,
    jobs: int | None = None,
    keep_models: str = "chosen",
    skip_failed: bool = False,
    report_only: bool = False,
    command: str | None = None,
) -> CompareResult:
    """Run (or resume) the grid, then write the report (see the module docstring).

    `report_only` rebuilds the report from the cells on disk without running anything.
    """
    import torch

    tasks = list(tasks or ["fact-geo", "med-icd10", "spider-dev"])
    methods = list(methods or list(METHODS))
    b = BUDGETS.get(budget)
    if b is None:
        raise MolfError(f"--budget: must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if keep_models not in ("all", "chosen", "none"):
        raise MolfError(f"--keep-models: must be all, chosen or none, got {keep_models!r}")
    if threads is not None and threads <= 0:
        raise MolfError(f"--threads: must be > 0, got {threads}")
    if jobs is not None and jobs < 0:
        raise MolfError(f"--jobs: must be >= 0, got {jobs}")
    overrides = list(overrides or [])
    out = Path(output_dir or f"runs/compare-{budget}")
    cells = plan_grid(budget, tasks, methods, out, model, seed, overrides, lr_grid, data)
    check_finished(cells)
    model_name = cells[0].config.model if cells else (model or b.model)
    command = command or _command(
        budget, model_name, tasks, methods, out, seed, overrides, lr_grid, data
    )
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "grid.json"
    state: dict[str, Any] = {}
    if state_path.exists():
        with contextlib.suppress(ValueError):
            state = json.loads(state_path.read_text()) or {}
    if report_only and state.get("command"):
        command = state["command"]  # the report describes the run that made the cells
    state.update(
        command=command,
        budget=budget,
        model=model_name,
        seed=seed,
        tasks=tasks,
        methods=methods,
        overrides=overrides,
        lr_grids={m: list(g) for m, g in parse_lr_grid(lr_grid, b).items() if m in methods},
    )
    state.setdefault("cells", {})
    state.setdefault("invocations", [])
    invocation: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
        "cells_run": 0,
    }
    if not report_only:  # the report names the versions the cells were trained with
        invocation["versions"] = package_versions()
    state["invocations"].append(invocation)
    write_json_atomic(state_path, state)

    outcomes: list[Outcome] = []
    old_threads = torch.get_num_threads()
    n_threads = threads or b.threads
    n_jobs = b.jobs if jobs is None else jobs
    if not report_only:
        invocation.update(jobs=n_jobs, threads=n_threads)
    try:
        if n_threads:
            torch.set_num_threads(n_threads)
        if not report_only:
            how = f"{n_jobs} at a time in subprocesses" if n_jobs else "one at a time"
            print(
                f"molf compare: {len(cells)} cells ({how}), {budget} budget, {model_name}, "
                f"in {out}",
                flush=True,
            )
            pending = set(range(len(cells)))

            def record(i: int, outcome: Outcome) -> None:
                cell = cells[i]
                label = f"[{i + 1}/{len(cells)}] {cell.key}"
                outcomes.append(outcome)
                entry: dict[str, Any] = {"status": outcome.status}
                if outcome.status == "done":
                    invocation["cells_run"] += 1
                    entry["seconds"] = round(outcome.seconds, 1)
                    print(
                        f"{label}: done in {outcome.seconds:.0f} s, "
                        f"{_headline_text(outcome.summary or {})}",
                        flush=True,
                    )
                elif outcome.status == "skipped":
                    print(f"{label}: done before, skipped", flush=True)
                    entry = state["cells"].get(cell.key) or {"status": "done"}
                else:
                    entry["error"] = outcome.error
                    print(f"{label}: FAILED: {outcome.error}", flush=True)
                state["cells"][cell.key] = entry
                write_json_atomic(state_path, state)
                pending.discard(i)
                group = [
                    j for j, c in enumerate(cells) if (c.task, c.method) == (cell.task, cell.method)
                ]
                if not any(j in pending for j in group):
                    _prune_models([cells[j] for j in group], keep_models)

            def starting(i: int) -> None:
                print(f"[{i + 1}/{len(cells)}] {cells[i].key}: running", flush=True)

            if n_jobs:
                _run_in_subprocesses(cells, n_jobs, n_threads, skip_failed, starting, record)
            else:
                for i, cell in enumerate(cells):
                    if not _is_done(cell):
                        starting(i)
                    record(i, run_cell(cell, skip_failed=skip_failed))
    finally:
        torch.set_num_threads(old_threads)
        invocation["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        write_json_atomic(state_path, state)
    notes = []
    if invocation["cells_run"]:  # how this invocation ran its cells (earlier ones: see above)
        if n_jobs:
            notes.append(f"cells run {n_jobs} at a time, each in its own process")
        if n_threads:
            notes.append(f"torch threads per cell: {n_threads}")
    if keep_models != "all":
        kept = "the chosen candidate of each pair" if keep_models == "chosen" else "no cell"
        notes.append(f"model weights (final/) kept for: {kept}")
    paths = write_report(
        out,
        tasks,
        methods,
        {
            "command": command,
            "model": model_name,
            "budget": budget,
            "seed": seed,
            "wall_seconds": time.perf_counter() - t_start,
            "report_only": report_only,
            "notes": notes,
            "invocations": state["invocations"],
        },
    )
    result = CompareResult(out, cells, outcomes, paths)
    print(
        f"report: {paths['report']}"
        + (f" ({len(result.failed)} cells failed)" if result.failed else ""),
        flush=True,
    )
    return result


def run_compare(args: argparse.Namespace) -> int:
    """`molf compare`: exit status 0 when every cell finished, 1 when some failed."""
    tasks = _split_list(args.tasks, "tasks")
    methods = _split_list(args.methods, "methods")
    data = _parse_data(getattr(args, "data", None), tasks)
    if getattr(args, "plan", False):
        out = Path(args.output_dir or f"runs/compare-{args.budget}")
        cells = plan_grid(
            args.budget,
            tasks,
            methods,
            out,
            args.model,
            args.seed,
            list(args.overrides or []),
            getattr(args, "lr_grid", None),
            data,
        )
        print(format_plan(cells))
        print(f"{len(cells)} cells")
        return 0
    result = compare(
        budget=args.budget,
        tasks=tasks,
        methods=methods,
        model=args.model,
        output_dir=args.output_dir,
        seed=args.seed,
        overrides=list(args.overrides or []),
        lr_grid=getattr(args, "lr_grid", None),
        data=data,
        threads=getattr(args, "threads", None),
        jobs=getattr(args, "jobs", None),
        keep_models=getattr(args, "keep_models", "chosen"),
        skip_failed=getattr(args, "skip_failed", False),
        report_only=getattr(args, "report_only", False),
    )
    return 1 if result.failed else 0


if __name__ == "__main__":
    # `python -m molf.experiments.compare --cell <compare_job.json>`: one cell, started by _launch
    if len(sys.argv) == 3 and sys.argv[1] == "--cell":
        sys.exit(_cell_main(sys.argv[2]))
    sys.exit(
        "usage: python -m molf.experiments.compare --cell <compare_job.json> (or use `molf compare`)"
    )
