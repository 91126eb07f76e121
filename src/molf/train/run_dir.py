"""Which output directories are molf's, and what `--overwrite` may remove from them.

A run directory is recognised by the marker file molf writes into it when a run starts
(`.molf-run`), never by its other contents: a directory without the marker (the user's data,
notes, another program's run with its own `config.yaml` and `checkpoints/`) is not a run, and
nothing in it is removed or replaced, whatever the flags say.

Every file molf writes into a run is recorded, as it is written, in the run's ledger
(`.molf-files`, one path per line relative to the run). `--overwrite`, pruned checkpoints and the
end of a run remove exactly the recorded files (and the directories that this leaves empty), so a
file the user put anywhere in the run, `final/` and `checkpoints/` included, stays. A user's file
inside a directory molf replaces whole (`final/model`, `final/adapter`, a checkpoint) would be
lost with it: `--overwrite` refuses such a run and names the file. The removal happens after the
config, data and model were loaded, so a run that fails before training leaves the old run as it
was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from molf._files import check_directory_path
from molf.errors import MolfError

__all__ = [
    "LEDGER",
    "MARKER",
    "check_output_dir",
    "check_resume_value",
    "clear_run_dir",
    "foreign_files",
    "is_leftover",
    "is_run_dir",
    "mark_run_dir",
    "record",
    "recorded",
    "remove_recorded",
]

MARKER = ".molf-run"
LEDGER = ".molf-files"  # every path molf wrote into the run, one per line, relative to it
SUMMARY = "summary.json"  # written last by a run: its presence marks the run finished
TEST_ITEMS = "test_items.json"  # per-item headline scores of the final test evaluation
# Directories molf writes and replaces whole (atomically, through a temporary sibling): a file
# of the user's inside one cannot survive a new run's copy of it.
_REPLACED_WHOLE = ("final", "checkpoints")


# the random part tempfile.mkdtemp adds to a temporary directory's prefix
_RANDOM_SUFFIX = re.compile(r"(.+)-[a-z0-9_]{8}")
_CHECKPOINT = re.compile(r"step-\d+")


def _leftover_targets(name: str) -> set[str]:
    """The names a temporary of molf's atomic writes called `name` could have been written for:
    `.tmp-<target>-<random>` (a directory), `.tmp-<target>` or `.<target>.tmp` (a file)."""
    targets = set()
    if name.startswith(".tmp-") and len(name) > 5:
        targets.add(name[5:])
        m = _RANDOM_SUFFIX.fullmatch(name[5:])
        if m:
            targets.add(m.group(1))
    if name.startswith(".") and name.endswith(".tmp") and len(name) > 5:
        targets.add(name[1:-4])
    return targets


def is_leftover(rel: str, known: set[str]) -> bool:
    """Whether the run's path `rel` is a leftover of one of molf's atomic writes that a crash
    left behind: its name has a temporary's form and what it was written for is molf's (in the
    ledger `known`, the ledger itself, or a checkpoint `checkpoints/step-N`). A name of that
    form whose target is not molf's is the user's, and stays."""
    parent, _, name = rel.rstrip("/").rpartition("/")
    prefix = parent + "/" if parent else ""
    for target in _leftover_targets(name):
        if prefix + target in known or prefix + target + "/" in known:
            return True
        if not parent and target == LEDGER:
            return True
        if parent == "checkpoints" and _CHECKPOINT.fullmatch(target):
            return True
    return False


def is_run_dir(directory: Path) -> bool:
    """Whether molf made `directory` for a run: it carries molf's marker."""
    return (Path(directory) / MARKER).is_file()


def _relative(run_dir: Path, path: Path | str) -> str:
    """`path` relative to the run: a bare name is taken inside it; a path that starts with the
    run directory (as given, or absolute) is cut to the part inside."""
    path = Path(path)
    for base in (Path(run_dir), Path(run_dir).absolute()):
        if path.is_relative_to(base) and (path.is_absolute() or not base.is_absolute()):
            return path.relative_to(base).as_posix()
    if path.is_absolute():
        raise ValueError(f"{path} is not inside the run directory {run_dir}")
    return path.as_posix()


def record(run_dir: Path, *paths: Path | str) -> None:
    """Add `paths` (files, or directories with everything under them) to the run's ledger.

    Call it right after writing: a path in the ledger is one `--overwrite` may remove."""
    run_dir = Path(run_dir)
    known = recorded(run_dir)
    new: list[str] = []
    for path in paths:
        rel = _relative(run_dir, path)
        full = run_dir / rel
        # the directories molf made to hold it (removed again only when empty)
        entries = [parent.as_posix() + "/" for parent in reversed(Path(rel).parents[:-1])]
        entries.append(rel + "/" if full.is_dir() else rel)
        if full.is_dir():
            for p in sorted(full.rglob("*")):
                entries.append(p.relative_to(run_dir).as_posix() + ("/" if p.is_dir() else ""))
        new.extend(e for e in entries if e not in known)
        known.update(entries)
    if new:
        with (run_dir / LEDGER).open("a") as f:
            f.write("".join(e + "\n" for e in new))


def recorded(run_dir: Path) -> set[str]:
    """The ledger's entries (directories end in `/`); empty for a run without one."""
    ledger = Path(run_dir) / LEDGER
    if not ledger.is_file():
        return set()
    return {line for line in ledger.read_text().splitlines() if line}


def _all_files(root: Path, run_dir: Path) -> list[str]:
    return sorted(
        p.relative_to(run_dir).as_posix()
        for p in root.rglob("*")
        if not p.is_dir() or p.is_symlink()
    )


def foreign_files(run_dir: Path, under: str = "") -> list[str]:
    """Files under `run_dir` (or its subdirectory `under`) that molf did not write, sorted."""
    run_dir = Path(run_dir)
    root = run_dir / under if under else run_dir
    if not root.exists():
        return []
    known = recorded(run_dir)
    return [
        rel
        for rel in _all_files(root, run_dir)
        if rel not in known and rel not in (MARKER, LEDGER) and not _under_leftover(rel, known)
    ]


def _under_leftover(rel: str, known: set[str]) -> bool:
    """Whether `rel` is a leftover of molf's or lies inside one."""
    parts = rel.split("/")
    return any(is_leftover("/".join(parts[: i + 1]), known) for i in range(len(parts)))


def _blocking(run_dir: Path) -> list[str]:
    """The user's files inside directories a new run would replace whole."""
    found = []
    for top in _REPLACED_WHOLE:
        found += [rel for rel in foreign_files(run_dir, top) if rel.count("/") >= 2]
    return found


def _listing(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def check_resume_value(resume: str) -> None:
    """Refuse a `--resume` value that is not 'none', 'auto' or a complete checkpoint, before
    anything is written (a typo must not leave a half-made run directory behind)."""
    if resume in ("none", "auto"):
        return
    from molf.train.manifest import verify

    path = Path(resume)
    problem = "no such directory" if not path.is_dir() else verify(path)
    if problem is not None:
        raise MolfError(
            f"--resume {resume}: expected 'auto', 'none' or a checkpoint directory ({problem})"
        )


def check_output_dir(run_dir: Path, resume: str, overwrite: bool) -> None:
    """Refuse an output directory a run may not use, and a bad `--resume`; never removes anything.

    A new or empty directory is fine. A directory without molf's marker is refused whatever the
    flags say (it holds someone's files). A finished run needs `overwrite`; an unfinished one
    `resume` or `overwrite`. `overwrite` is refused where it would take a user's file with it."""
    run_dir = Path(run_dir)
    check_resume_value(resume)
    check_directory_path(run_dir, "output directory")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not is_run_dir(run_dir):
        names = sorted(p.name for p in run_dir.iterdir())
        raise MolfError(
            f"output directory {run_dir} is not a molf run directory (it holds "
            f"{_listing(names)}); molf writes only into a new or empty directory or a run it "
            "made: give another --output-dir"
        )
    if overwrite:
        _check_clearable(run_dir)
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


def _keeps_ledger(run_dir: Path) -> bool:
    """Whether the run's marker says molf records its files in the ledger (runs written by
    molf 0.1.0 before the ledger existed do not)."""
    try:
        return bool(json.loads((run_dir / MARKER).read_text()).get("ledger"))
    except (OSError, ValueError, AttributeError):
        return False


def _check_clearable(run_dir: Path) -> None:
    if not _keeps_ledger(run_dir) and any(p.name != MARKER for p in run_dir.iterdir()):
        raise MolfError(
            f"{run_dir} was written by a molf without a record of its files, so --overwrite "
            "cannot tell them from yours: remove the directory yourself or give another "
            "--output-dir"
        )
    blocking = _blocking(run_dir)
    if blocking:
        raise MolfError(
            f"--overwrite would replace the directory that holds your file "
            f"{run_dir / blocking[0]}"
            + (f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else "")
            + ": move it out of the run first; nothing removed"
        )


def _remove_entries(run_dir: Path, entries: Iterable[str], known: set[str]) -> None:
    """Remove the recorded `entries` (files first, then directories left empty, deepest first)
    and molf's temporary leftovers beside them; `known` is the run's ledger."""
    entries = sorted(set(entries))
    dirs = [e.rstrip("/") for e in entries if e.endswith("/")]
    for rel in entries:
        path = run_dir / rel
        if not rel.endswith("/") and (path.is_file() or path.is_symlink()):
            path.unlink()
    for rel in sorted(dirs, key=lambda d: d.count("/"), reverse=True):
        path = run_dir / rel
        if path.is_dir() and not path.is_symlink():
            for leftover in path.iterdir():
                if is_leftover(f"{rel}/{leftover.name}", known):
                    _remove_path(leftover)
            with contextlib.suppress(OSError):  # not empty: it holds the user's files
                path.rmdir()


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _rewrite_ledger(run_dir: Path) -> None:
    """Keep only the ledger's entries that still exist."""
    ledger = run_dir / LEDGER
    if not ledger.exists():
        return
    alive = sorted(e for e in recorded(run_dir) if (run_dir / e.rstrip("/")).exists())
    tmp = ledger.with_name(f".{LEDGER}.tmp")
    tmp.write_text("".join(e + "\n" for e in alive))
    os.replace(tmp, ledger)


def remove_recorded(run_dir: Path, under: str) -> None:
    """Remove what molf wrote under the run's subpath `under` (a checkpoint, `final`); a file
    of the user's there stays, and so do the directories that hold it."""
    run_dir = Path(run_dir)
    prefix = under.rstrip("/") + "/"
    known = recorded(run_dir)
    entries = [e for e in known if e == under or e.startswith(prefix)]
    _remove_entries(run_dir, entries, known)
    _rewrite_ledger(run_dir)


def clear_run_dir(run_dir: Path) -> list[str]:
    """Remove every file molf recorded in the run directory `run_dir` (the marker and ledger
    stay); returns the files kept, relative to it.

    Refuses (MolfError), removing nothing, a directory that is not a molf run and a run whose
    clearing would lose a user's file: the caller checked both already, and this is the last
    line of defence before anything is deleted."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return []
    if any(run_dir.iterdir()) and not is_run_dir(run_dir):
        raise MolfError(f"{run_dir} is not a molf run directory: nothing removed")
    _check_clearable(run_dir)
    known = recorded(run_dir)
    _remove_entries(run_dir, known, known)
    for leftover in run_dir.iterdir():
        if is_leftover(leftover.name, known):
            _remove_path(leftover)
    _rewrite_ledger(run_dir)
    return foreign_files(run_dir)


def mark_run_dir(run_dir: Path) -> None:
    """Create `run_dir` if needed and write molf's marker into it (a run marked by an older
    molf keeps its marker: it still has no complete ledger)."""
    import molf

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"molf_version": molf.__version__, "ledger": True}) + "\n")
