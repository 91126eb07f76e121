"""Running the cells of a `molf compare` grid: in this process, or each in a process of its own.

A cell that raises gets its error written to its `FAILED` file and the grid goes on. Run in
processes (`--jobs N`), a cell's peak memory is its own, and a cell whose process dies is marked
FAILED with the exit status -- except one killed by SIGKILL while other cells ran (the OOM killer,
when cells that each fit do not fit together): that one runs again, alone, after the others. Run
in this process (`--jobs 0`), a RUNNING marker left behind means the process died inside that
cell: it is retried once, then marked FAILED.

`python -m molf.experiments.runner --cell <compare_job.json>` is the body of one cell process.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from molf._files import write_json_atomic
from molf.experiments.grid import (
    CELL_META,
    FAILED,
    JOB_SPEC,
    RUNNING,
    SUMMARY,
    Cell,
    choose,
    config_mismatch,
    is_done,
    read_cell,
    read_summary,
)
from molf.train.config import TrainConfig, load_config
from molf.train.run_dir import clear_run_dir, mark_run_dir, record, remove_recorded


@dataclass
class Outcome:
    """What happened to a cell in this invocation."""

    cell: Cell
    status: str  # done | skipped (done before) | failed | skipped-failed
    seconds: float = 0.0
    error: str | None = None
    summary: dict[str, Any] | None = field(default=None, repr=False)


def _cell_meta(cell: Cell) -> dict[str, Any]:
    return {"task": cell.task, "method": cell.method, "lrs": cell.lrs, "label": cell.directory.name}


def _drop_running(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / RUNNING).unlink()


def _mark_failed(directory: Path, reason: str, details: str | None = None) -> None:
    """Record why a cell failed (its first line is what the report shows); it no longer runs."""
    (directory / FAILED).write_text(reason + "\n" + (f"\n{details}" if details else ""))
    record(directory, FAILED)
    _drop_running(directory)


def _reset_peak_memory() -> None:
    """Make the next cell's peak-memory figure its own, not the process's lifetime peak."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # Linux: writing 5 resets the peak resident set size (VmHWM, which ru_maxrss reports)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def run_cell(cell: Cell, skip_failed: bool = False) -> Outcome:
    """Run one cell unless it is done; record a failure instead of raising (interrupts excepted)."""
    from molf.train.loop import Interrupted, run

    d = cell.directory
    summary = read_summary(d)
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
            _mark_failed(d, msg)
            return Outcome(cell, "failed", error=msg)
    if (d / "config.yaml").exists() and not (d / SUMMARY).exists():
        old = yaml.safe_load((d / "config.yaml").read_text()) or {}
        if config_mismatch(old, cell.config.to_dict()):
            # a leftover of another config: its checkpoints cannot be resumed
            clear_run_dir(d)
    mark_run_dir(d)
    write_json_atomic(d / CELL_META, _cell_meta(cell))
    write_json_atomic(d / RUNNING, {"attempts": attempts + 1, "pid": os.getpid()})
    record(d, CELL_META, RUNNING)
    with contextlib.suppress(FileNotFoundError):
        (d / FAILED).unlink()
    _reset_peak_memory()
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        summary = run(cell.config, resume="auto")
    except (Interrupted, KeyboardInterrupt):
        _drop_running(d)
        raise
    except Exception as e:  # noqa: BLE001 - one failed cell must not stop the grid
        msg = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
        _mark_failed(d, msg, traceback.format_exc())
        del e
        gc.collect()
        return Outcome(cell, "failed", time.perf_counter() - t0, error=msg)
    seconds = time.perf_counter() - t0
    # CPU seconds (all threads) say what a cell costs even when the machine is shared
    meta = _cell_meta(cell) | {"cpu_seconds": round(time.process_time() - cpu0, 1)}
    write_json_atomic(d / CELL_META, meta)
    _drop_running(d)
    gc.collect()
    return Outcome(cell, "done", seconds, summary=summary)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `to_dict()` output (None values survive, unlike keywords)."""
    nulls = [f"{k}=null" for k, v in values.items() if v is None]
    return load_config(None, nulls, **{k: v for k, v in values.items() if v is not None})


@contextlib.contextmanager
def _sigint_not_ignored() -> Iterator[None]:
    """Let a child started inside this block take SIGINT even if this process ignores it.

    An ignored signal stays ignored through exec: `nohup molf compare ... &` from a script starts
    us with SIGINT ignored, and a cell process would then drop the SIGINT that asks it to
    checkpoint and stop until its training loop installs a handler. A signal received before
    that would be lost, and the grid would wait for the cell to finish instead."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        with contextlib.suppress(ValueError):  # not the main thread: leave it
            signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGINT, signal.SIG_IGN)


def _launch(cell: Cell, threads: int | None) -> subprocess.Popen:
    """Start `python -m molf.experiments.runner --cell <spec>` for one cell; its output goes to
    log.txt."""
    d = cell.directory
    mark_run_dir(d)
    spec = {
        "task": cell.task,
        "method": cell.method,
        "lrs": cell.lrs,
        "threads": threads,
        "config": cell.config.to_dict(),
    }
    write_json_atomic(d / JOB_SPEC, spec)
    record(d, JOB_SPEC, "log.txt")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with (d / "log.txt").open("ab") as log, _sigint_not_ignored():
        return subprocess.Popen(
            [sys.executable, "-m", "molf.experiments.runner", "--cell", str(d / JOB_SPEC)],
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
    _mark_failed(cell.directory, msg)
    return Outcome(cell, "failed", seconds, error=msg)


def run_in_subprocesses(
    cells: list[Cell],
    jobs: int,
    threads: int | None,
    skip_failed: bool,
    starting: Callable[[int], None],
    record: Callable[[int, Outcome], None],
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
                if is_done(cell):
                    record(i, Outcome(cell, "skipped", summary=read_summary(cell.directory)))
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
                    _drop_running(cells[i].directory)
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
    """Body of a cell process: run the cell described by a compare_job.json (see `_launch`)."""
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


def prune_models(cells: list[Cell], keep: str) -> None:
    """Drop `final/` (merged weights, adapters) of the cells the report does not need."""
    if keep == "all":
        return
    group = [read_cell(c.directory, c.task, c.method) for c in cells]
    chosen = choose(group) if keep == "chosen" else None
    if keep == "chosen" and any(r.status != "done" for r in group):
        return  # the choice may still change
    for r in group:
        if r.status == "done" and r is not chosen and (r.directory / "final").exists():
            remove_recorded(r.directory, "final")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--cell":
        sys.exit(_cell_main(sys.argv[2]))
    sys.exit(
        "usage: python -m molf.experiments.runner --cell <compare_job.json> (or use `molf compare`)"
    )
