"""Writing files so that a reader never sees half of them: the core's only file helpers, shared by
export, checkpoints and the experiment runner."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory` to disk (before the rename that publishes it)."""
    for p in directory.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


def atomic_directory(final: Path, fill: Callable[[Path], None]) -> Path:
    """Write a directory atomically: `fill(tmp)` writes the files into a temporary sibling, which
    is flushed and renamed over `final` only when `fill` returned; on any error it is removed and
    `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        fill(tmp)
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# File types that name data or model files: a spec ending in one can only be a local path.
_FILE_SUFFIXES = (
    ".json",
    ".jsonl",
    ".csv",
    ".parquet",
    ".arrow",
    ".txt",
    ".yaml",
    ".yml",
    ".gguf",
    ".safetensors",
)


def looks_like_path(spec: str) -> bool:
    """True for a spec that can only mean a local path, never a hub id.

    Hub ids are `name` or `org/name`; a spec that starts with `.`, `/`, `~` or a drive letter,
    ends with a separator, holds a backslash or more than one `/`, or ends in a data or model file
    suffix is a path. Callers check for an existing file first: this decides whether a missing
    one is reported as "not found" rather than tried on the hub."""
    if spec.startswith((".", "/", "~", "\\")) or spec.endswith(("/", "\\")):
        return True
    if "\\" in spec or spec.count("/") > 1 or (len(spec) > 1 and spec[1] == ":"):
        return True
    return spec.lower().endswith(_FILE_SUFFIXES)
