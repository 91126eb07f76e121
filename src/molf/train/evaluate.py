"""`molf eval`: a task's held-out metrics for a base model, a saved model or a PEFT adapter."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from molf._files import looks_like_path
from molf.errors import MolfError
from molf.tasks import TaskOptions, build_task

TASK_OPTIONS = frozenset(f.name for f in dataclasses.fields(TaskOptions))


def parse_task_options(items: list[str]) -> dict[str, Any]:
    """`key=value` task options from the command line (`generation_metric=exact_match`), typed
    as the `molf train` keys of the same names."""
    from molf.train.config import typed_value

    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in TASK_OPTIONS:
            raise MolfError(
                f"'{item}': expected a task option as key=value ({', '.join(sorted(TASK_OPTIONS))})"
            )
        options[key] = typed_value(key, raw)
    return options


def evaluate_path(
    model: str,
    task: str,
    data: str | None = None,
    seed: int | None = None,
    n_test: int | None = None,
    batch_size: int = 16,
    trust_remote_code: bool = False,
    *,
    n_val: int | None = None,
    options: dict[str, Any] | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Load `model` (embedded name, path or hub id) and score it on `task`'s test split.

    A directory written by `molf train` carries `molf_run.json`: for the run's own task and data
    its seed, split sizes and task options are the defaults, so the test split is the one the run
    held out. Other data is scored whole: for `sft` every row is a test record (only its test
    rows, if it names some), unless `n_test` / `n_val` ask for the split `molf train` would make
    with those sizes. `options` are task options (`generation_metric`, `test_split`, ...) over
    the run's; `threads` sets torch's CPU threads; `progress` shows a progress bar.
    """
    import torch

    from molf.train.models import load_model
    from molf.train.prepare import evaluate, pick_device

    for flag, value in (("--batch-size", batch_size), ("--threads", threads)):
        if value is not None and value <= 0:
            raise MolfError(f"{flag}: must be > 0, got {value}")
    if n_test is not None and n_test <= 0:
        raise MolfError(f"--n-test: must be > 0, got {n_test}")
    if n_val is not None and n_val < 0:
        raise MolfError(f"--n-val: must be >= 0, got {n_val}")
    unknown = sorted(set(options or {}) - TASK_OPTIONS)
    if unknown:
        raise MolfError(f"'{unknown[0]}': not a task option ({', '.join(sorted(TASK_OPTIONS))})")
    if looks_like_path(model) and not Path(model).expanduser().exists():
        raise MolfError(f"--model {model}: no such file or directory")
    info: dict[str, Any] = {}
    run_info = Path(model) / "molf_run.json"
    if run_info.is_file():
        info = json.loads(run_info.read_text())
    same_task = task == info.get("task")
    same_run = same_task and (data is None or _same_data(data, info.get("data")))
    seed = seed if seed is not None else info.get("seed", 0)
    data = data if data is not None else info.get("data")
    saved: dict[str, Any] = {}
    if info.get("task_options") is not None and same_task:
        saved = dict(info["task_options"])
        if not same_run:
            # another file: its fields and splits are the user's to name, not the run's
            keep = ("max_length", "generation_metric", "max_new_tokens")
            saved = {k: v for k, v in saved.items() if k in keep}
    try:
        task_options = TaskOptions(**(saved | (options or {})))
    except TypeError as e:
        raise MolfError(f"{run_info}: unreadable task_options ({e})") from None
    if same_run:
        n_val = n_val if n_val is not None else info.get("n_val")
        n_test = n_test if n_test is not None else info.get("n_test")
    task_obj, splits = build_task(
        task,
        data,
        seed,
        info.get("n_train", 256),
        n_val,
        n_test,
        task_options,
        evaluation_only=not same_run,
    )
    if threads is not None:
        torch.set_num_threads(threads)
    lm, tokenizer = load_model(model, trust_remote_code=trust_remote_code)
    lm.to(pick_device())
    metrics = evaluate(
        task_obj, lm, tokenizer, splits.test, batch_size, progress="eval" if progress else None
    )
    return {
        "task": task,
        "model": model,
        "n_records": len(splits.test),
        "records": _which_records(len(splits.test), same_run, splits.info.get("note")),
        "seed": seed,
        "metrics": metrics,
    }


def _which_records(n: int, same_run: bool, note: str | None) -> str:
    """Which records were scored, in words: the run's held-out test rows, or what the data gave."""
    if same_run:
        return f"{n} held-out test records of the run"
    if note and "are test records" in note:  # a file scored whole (molf.tasks.sft)
        return note.split(": ", 1)[1] if ": " in note else note
    return f"{n} test records"


def _same_data(given: str, recorded: str | None) -> bool:
    """Whether `given` names the run's own data: the same string, or the same file."""
    if recorded is None:
        return False
    if given == recorded:
        return True
    a, b = Path(given).expanduser(), Path(recorded).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()
