"""Which output directories are molf's, and what `--overwrite` may remove from them.

A run directory is recognised by the marker file molf writes into it when a run starts
(`.molf-run`), never by being non-empty: a directory that holds anything else (the user's data,
notes, another program's output) is not a run, and nothing in it is removed or replaced. Runs
written before the marker existed are recognised by molf's own files (`config.yaml` beside a
`summary.json`, `metrics.jsonl` or `checkpoints/`).

`--overwrite` removes only the entries molf writes (`OWNED`); anything else the user put into a
run directory stays. The removal happens after the config, data and model were loaded, so a run
that fails before training leaves the old run as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from molf._files import check_directory_path
from molf.errors import MolfError

__all__ = [
    "MARKER",
    "OWNED",
    "check_output_dir",
    "clear_run_dir",
    "foreign_entries",
    "is_run_dir",
    "mark_run_dir",
]

MARKER = ".molf-run"
SUMMARY = "summary.json"  # written last by a run: its presence marks the run finished
TEST_ITEMS = "test_items.json"  # per-item headline scores of the final test evaluation
# Everything `molf train` and `molf compare` write into a run (or cell) directory.
OWNED = frozenset(
    {
        MARKER,
        "config.yaml",
        "metrics.jsonl",
        "routing.jsonl",
        "routing_summary.json",
        SUMMARY,
        TEST_ITEMS,
        "checkpoints",
        "final",
        "tensorboard",
        "wandb",
        # a compare cell's bookkeeping
        "log.txt",
        "compare_cell.json",
        "compare_job.json",
        "RUNNING",
        "FAILED",
    }
)
_LEGACY_COMPANIONS = (SUMMARY, "metrics.jsonl", "checkpoints")


def _owned(name: str) -> bool:
    # temporary files of atomic writes: `.tmp-<name>-...` directories, `.<name>.tmp` files
    return name in OWNED or name.startswith(".tmp-") or name.endswith(".tmp")


def is_run_dir(directory: Path) -> bool:
    """Whether molf made `directory` for a run: its marker, or (older runs) its own files."""
    directory = Path(directory)
    if (directory / MARKER).is_file():
        return True
    return (directory / "config.yaml").is_file() and any(
        (directory / name).exists() for name in _LEGACY_COMPANIONS
    )


def foreign_entries(directory: Path) -> list[str]:
    """The names in `directory` that molf does not write, sorted."""
    return sorted(p.name for p in Path(directory).iterdir() if not _owned(p.name))


def _listing(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def check_output_dir(run_dir: Path, resume: str, overwrite: bool) -> None:
    """Refuse an output directory a run may not use; never removes anything.

    A new or empty directory is fine. A directory that is not a molf run is refused whatever the
    flags say (it holds someone's files). A finished run needs `overwrite`; an unfinished one
    `resume` or `overwrite`."""
    run_dir = Path(run_dir)
    check_directory_path(run_dir, "output directory")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not is_run_dir(run_dir):
        names = foreign_entries(run_dir) or sorted(p.name for p in run_dir.iterdir())
        raise MolfError(
            f"output directory {run_dir} is not a molf run directory (it holds "
            f"{_listing(names)}); molf writes only into a new or empty directory or a run it "
            "made: give another --output-dir"
        )
    if overwrite:
        return
    if (run_dir / SUMMARY).exists():
        raise MolfError(
            f"output directory {run_dir} already holds a finished run (use --overwrite to "
            "replace it; only files molf wrote are removed)"
        )
    if resume == "none":
        raise MolfError(
            f"output directory {run_dir} holds an unfinished run (use --resume auto to continue "
            "it, or --overwrite to start again)"
        )


def clear_run_dir(run_dir: Path) -> list[str]:
    """Remove what molf wrote into the run directory `run_dir`; returns the names kept.

    Refuses (MolfError) a directory that is not a molf run: the caller checked it already, and
    this is the last line of defence before anything is deleted."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return []
    if any(run_dir.iterdir()) and not is_run_dir(run_dir):
        raise MolfError(f"{run_dir} is not a molf run directory: nothing removed")
    kept = []
    for entry in sorted(run_dir.iterdir()):
        if not _owned(entry.name):
            kept.append(entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return kept


def mark_run_dir(run_dir: Path) -> None:
    """Create `run_dir` if needed and write molf's marker into it."""
    import molf

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"molf_version": molf.__version__}) + "\n")
