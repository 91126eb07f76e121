"""Atomic, verifiable checkpoints.

A checkpoint is a directory `checkpoints/step-000120/` written under a temporary name and renamed
into place only when complete. Its `manifest.json` (written last) records the sha256 of every
file; a checkpoint whose manifest is missing or whose files do not match is skipped, with a
warning, in favour of the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from molf import _files

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, extra: dict[str, Any] | None = None) -> None:
    """Checksum every file of `directory` (except the manifest) into its manifest."""
    files = {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps({"files": files, **(extra or {})}, indent=1))


def verify(directory: Path) -> str | None:
    """None if `directory` is a complete, uncorrupted checkpoint, else the reason it is not."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        return "no manifest"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for name, digest in files.items():
        path = directory / name
        if not path.exists():
            return f"missing {name}"
        if sha256_file(path) != digest:
            return f"checksum mismatch in {name}"
    return None


def atomic_directory(
    final: Path, fill: Callable[[Path], None], manifest_extra: dict | None = None
) -> Path:
    """Write a checkpoint-like directory atomically (`molf._files.atomic_directory`), with the
    checksum manifest written last."""

    def fill_and_sign(tmp: Path) -> None:
        fill(tmp)
        write_manifest(tmp, manifest_extra)

    return _files.atomic_directory(final, fill_and_sign)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (temporary leftovers excluded)."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; warns about each newer one that does not."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warnings.warn(
            f"skipping checkpoint {ckpt}: {problem}; falling back to the previous one", stacklevel=2
        )
    return None


def prune_checkpoints(run_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all) and `protect` (the best one, which
    `keep_best` exports at the end); drop leftovers of interrupted writes."""
    root = run_dir / "checkpoints"
    if root.exists():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if protect is not None and old == protect:
                continue
            shutil.rmtree(old, ignore_errors=True)
