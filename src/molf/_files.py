"""The core's file helpers: writing so that a reader never sees half a file or directory (shared by
export, checkpoints and the experiment runner), where molf keeps its cache, and telling a local
path from a hub id."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from molf.errors import MolfError

CACHE_ENV = "MOLF_CACHE_DIR"
# the name `molf.train.models` read before the cache had one variable for everything
_OLD_CACHE_ENV = "MOLF_CACHE"


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory` to disk (before the rename that publishes it)."""
    for p in directory.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore it
    os.umask(mask)
    return mask


def open_modes(directory: Path) -> None:
    """Give `directory` and everything under it the modes the user's umask gives any new file
    (0644 and 0755 under umask 022): `tempfile` makes private (0700/0600) entries, and some
    writers (transformers' weights) keep them so."""
    mask = current_umask()
    paths = [Path(directory), *Path(directory).rglob("*")]
    for p in paths:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def temp_sibling(final: Path) -> Path:
    """A fresh temporary directory next to `final`: on the same file system, so that renaming it
    to `final` is atomic. Its name starts with `.tmp-`, which marks leftovers of crashed writers."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))


def publish(tmp: Path, final: Path) -> Path:
    """Flush the complete directory `tmp` to disk and rename it to `final`, replacing what was
    there (a directory cannot be renamed over a non-empty one, so the old one goes first); its
    entries get the modes of the user's umask first."""
    open_modes(tmp)
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def atomic_directory(final: Path, fill: Callable[[Path], None]) -> Path:
    """Write a directory atomically: `fill(tmp)` writes the files into a temporary sibling, which
    is flushed and renamed over `final` only when `fill` returned; on any error it is removed and
    `final` is left as it was."""
    final = Path(final)
    tmp = temp_sibling(final)
    try:
        fill(tmp)
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where molf keeps what it builds once (converted models, tokenizers, compiled kernels):
    `cache_dir`, else `$MOLF_CACHE_DIR`, else `$XDG_CACHE_HOME/molf`, else `~/.cache/molf`.

    `$MOLF_CACHE` is still read, with a DeprecationWarning, when `$MOLF_CACHE_DIR` is unset."""
    chosen = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or None
    if chosen is None and os.environ.get(_OLD_CACHE_ENV):
        warnings.warn(
            f"${_OLD_CACHE_ENV} is deprecated: set ${CACHE_ENV} instead",
            DeprecationWarning,
            stacklevel=2,
        )
        chosen = os.environ[_OLD_CACHE_ENV]
    if chosen is None:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "molf"
    return Path(chosen).expanduser()


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


def check_directory_path(path: Path, what: str) -> None:
    """Refuse a directory path that is (or lies under) an existing file, before any work."""
    probe = Path(path)
    while True:
        if probe.exists() and not probe.is_dir():
            inside = "" if probe == Path(path) else f" ({probe} is a file)"
            raise MolfError(f"{what} {path} is not a directory{inside}")
        if probe.exists() or probe.parent == probe:
            return
        probe = probe.parent
