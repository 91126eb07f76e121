"""Helpers for tests that run `molf train` on the random-init tiny-llama, in this process or as a
child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def tiny_run(method: str = "molf", task: str = "fact-geo", **settings: object) -> list[str]:
    """`molf train` arguments for a tiny-llama run of `method` on `task`, with `key=value`
    settings; no progress bar and no evaluation before training unless `settings` ask for one."""
    values = {"progress": False, "eval_before": False, **settings}
    args = ["--model", "tiny-llama", "--method", method, "--task", task]
    return args + [f"{k}={v}" for k, v in values.items()]


def child_env() -> dict[str, str]:
    """The environment of a child `python -m molf.cli`: this checkout's sources first (and its
    root, so that a test file run as a worker script imports `tests.*`), offline, one torch
    thread (more make torch far slower on a shared 2-core box) and none of a launcher's
    variables (the test itself decides whether torchrun runs it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(ROOT), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train_command(args: list[str], out: Path, *extra: str) -> list[str]:
    """The command line of a child `molf train` with `args`, writing into `out`."""
    return [sys.executable, "-m", "molf.cli", "train", *args, "--output-dir", str(out), *extra]


def start_training(args: list[str], out: Path, *extra: str, **popen: object) -> subprocess.Popen:
    """A child `molf train` running in the background (output discarded unless `popen` says)."""
    streams = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    return subprocess.Popen(train_command(args, out, *extra), env=child_env(), **(streams | popen))


def train(
    args: list[str], out: Path, *extra: str, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess:
    """A child `molf train`, waited for; its output is captured as text. `env`: variables added
    to the child's environment (e.g. MOLF_OPTIMIZER_BACKEND)."""
    return subprocess.run(
        train_command(args, out, *extra),
        env=child_env() | env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
