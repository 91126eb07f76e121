"""A checkpoint directory's manifest: the sha256 of every file, written last, so that a reader can
tell a complete, uncorrupted checkpoint from a torn or damaged one. Shared by one-process
checkpoints (`molf.train.checkpoint`) and sharded ones (`molf.train.distributed`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST", "sha256_file", "verify", "write_manifest"]

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
