"""`molf eval`: a task's held-out metrics for a base model, a saved model or a PEFT adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.tasks import TaskOptions, build_task


def evaluate_path(
    model: str,
    task: str,
    data: str | None = None,
    seed: int | None = None,
    n_test: int | None = None,
    batch_size: int = 16,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Load `model` (embedded name, path or hub id) and score it on `task`'s test split.

    A directory written by `molf train` carries `molf_run.json`: its seed and split sizes are
    the defaults, so the test split is the one the run held out; for the run's own task, its
    task options too (an sft run's fields, validation file and generation metric).
    """
    from molf.train.loop import evaluate
    from molf.train.models import load_model

    info: dict[str, Any] = {}
    run_info = Path(model) / "molf_run.json"
    if run_info.is_file():
        info = json.loads(run_info.read_text())
    if batch_size <= 0:
        raise MolfError(f"--batch-size: must be > 0, got {batch_size}")
    seed = seed if seed is not None else info.get("seed", 0)
    n_test = n_test if n_test is not None else info.get("n_test", 64)
    if n_test <= 0:
        raise MolfError(f"--n-test: must be > 0, got {n_test}")
    data = data if data is not None else info.get("data")
    options = None
    if info.get("task_options") is not None and task == info.get("task"):
        try:
            options = TaskOptions(**info["task_options"])
        except TypeError as e:
            raise MolfError(f"{run_info}: unreadable task_options ({e})") from None
        if data is not None and data != info.get("data"):
            # another file: its fields are the user's to name, not the run's
            options = TaskOptions(
                max_length=options.max_length,
                generation_metric=options.generation_metric,
                max_new_tokens=options.max_new_tokens,
            )
    task_obj, splits = build_task(
        task, data, seed, info.get("n_train", 256), info.get("n_val", 32), n_test, options
    )
    lm, tokenizer = load_model(model, trust_remote_code=trust_remote_code)
    from molf.train.loop import pick_device

    lm.to(pick_device())
    metrics = evaluate(task_obj, lm, tokenizer, splits.test, batch_size)
    return {
        "task": task,
        "model": model,
        "n_records": len(splits.test),
        "seed": seed,
        "metrics": metrics,
    }
