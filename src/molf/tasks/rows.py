"""Rows of a data set, from a local file, a `datasets.save_to_disk` directory or a hub id.

Every task reads its data through this module, so a given file means the same rows to each of
them and bad files fail with the same one-line errors:

  - `.jsonl`: one JSON value per line (blank lines skipped);
  - `.json`: a JSON list of rows, or JSON lines under a `.json` name (the upstream MedMCQA
    files are JSON lines named `train.json`);
  - `.csv`: a header row, then one row per line; every value is a string, as written;
  - `.parquet`: read with pyarrow, values keep their types;
  - a directory written by `datasets.save_to_disk` (a `Dataset` or a `DatasetDict`);
  - anything else that does not look like a path (`molf._files.looks_like_path`): a Hugging Face
    hub id, loaded with `datasets.load_dataset`.

A `Table` also knows where each row is, 1-based, for messages that name it: `line 4` of a JSON
lines file (blank lines counted, as an editor counts them), `row 3` of a CSV file (the third row
after the header) and of every other form.

JSON, JSON lines and CSV are parsed here rather than by `datasets`: its loaders infer one Arrow
type per column (a file whose rows disagree fails with an Arrow cast error instead of naming the
row), report no line numbers, and write an Arrow copy of every file into the cache. The
directory and hub forms go through `datasets`, which owns those formats.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molf import _hub
from molf._files import looks_like_path
from molf.errors import MolfError, one_line

__all__ = [
    "FILE_SUFFIXES",
    "Table",
    "load_table",
    "objects",
    "read_json",
    "read_rows",
]

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def objects(rows: Sequence[Any], name: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(index, where, row) for each row, `where` naming it in messages ('name record i'); a
    MolfError for a row that is not an object (a JSON list of lists, say)."""
    for i, row in enumerate(rows):
        where = f"{name} record {i}"
        if not isinstance(row, dict):
            raise MolfError(f"{where}: expected an object, got {type(row).__name__}")
        yield i, where, row


@dataclass
class Table:
    """Rows by split name, and how to name their origin in messages."""

    splits: dict[str, list[Any]]
    name: str  # the file or directory name, or the hub id
    local: bool  # a file or directory rather than a hub id
    # split -> where each of its rows is ('line 4'); a split without an entry counts rows
    places: dict[str, list[str]] = field(default_factory=dict)

    def place(self, split: str, index: int) -> str:
        """Where row `index` (0-based) of `split` is, 1-based: 'line 4' (JSON lines) or 'row 3'."""
        places = self.places.get(split)
        return places[index] if places is not None else f"row {index + 1}"

    def only(self) -> list[Any]:
        """The rows of a table with one split; a MolfError naming the splits otherwise."""
        if len(self.splits) != 1:
            names = ", ".join(sorted(self.splits))
            raise MolfError(f"{self.name}: holds several splits ({names}); expected one table")
        return next(iter(self.splits.values()))


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: spreadsheet programs start their exports with a byte-order mark
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise MolfError(f"{path.name}: cannot read ({one_line(e)})") from None


def read_json(path: str | Path) -> Any:
    """One JSON document; a MolfError with the line of the first syntax error otherwise."""
    path = Path(path)
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise MolfError(f"{path.name}: invalid JSON (line {e.lineno}: {e.msg})") from None


def _json_lines(text: str, name: str) -> tuple[list[Any], list[str]]:
    """The rows of JSON lines text and the line each came from."""
    rows, places = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MolfError(f"{name} line {n}: invalid JSON ({e.msg})") from None
            places.append(f"line {n}")
    return rows, places


def _is_json_lines(text: str) -> bool:
    """Several non-blank lines, the first a JSON value of its own."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return False
    try:
        json.loads(lines[0])
    except json.JSONDecodeError:
        return False
    return True


def _json_rows(path: Path) -> tuple[list[Any], list[str] | None]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if _is_json_lines(text):
            return _json_lines(text, path.name)
        raise MolfError(f"{path.name}: invalid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, list):
        raise MolfError(
            f"{path.name}: expected a JSON list of rows (or JSON lines), got {type(data).__name__}"
        )
    return data, None


def _csv_rows(path: Path) -> tuple[list[Any], None]:
    text = _read_text(path)
    try:
        return list(csv.DictReader(text.splitlines())), None
    except csv.Error as e:
        raise MolfError(f"{path.name}: cannot read CSV ({one_line(e)})") from None


def _parquet_rows(path: Path) -> tuple[list[Any], None]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist(), None
    except Exception as e:  # pyarrow raises its own hierarchy (ArrowInvalid, OSError, ...)
        raise MolfError(f"{path.name}: cannot read parquet ({one_line(e)})") from None


def _saved_splits(path: Path) -> dict[str, list[Any]]:
    """The splits of a `save_to_disk` directory (a lone Dataset is the 'train' split)."""
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise MolfError(
            f"{path.name}: a directory, but not one written by datasets' save_to_disk "
            "(no dataset_dict.json or state.json)"
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets and pyarrow raise many types for a damaged directory
        raise MolfError(f"{path.name}: cannot load saved dataset ({one_line(e)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        return {name: split.to_list() for name, split in loaded.items()}
    return {"train": loaded.to_list()}


def read_rows(path: str | Path) -> list[Any]:
    """The rows of one local file or saved dataset (see the module docstring for the formats)."""
    return _read_local(Path(path).expanduser()).only()


def _read_local(path: Path) -> Table:
    if path.is_dir():
        return Table(_saved_splits(path), path.name, local=True)
    if not path.is_file():
        raise MolfError(f"file not found: {path}")
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": lambda p: _json_lines(_read_text(p), p.name),
        ".json": _json_rows,
        ".csv": _csv_rows,
        ".parquet": _parquet_rows,
    }
    if suffix not in readers:
        raise MolfError(
            f"{path.name}: unsupported file type (use {', '.join(FILE_SUFFIXES)} "
            "or a save_to_disk directory)"
        )
    rows, places = readers[suffix](path)
    return Table(
        {"train": rows}, path.name, local=True, places={} if places is None else {"train": places}
    )


def load_table(spec: str, what: str) -> Table:
    """The rows of `spec`: a local file or saved dataset, else a hub id (all of its splits).

    `what` names the data in messages (e.g. 'gretel'). A spec that looks like a path but does not
    exist is "not found" rather than a hub id; an unreachable hub, and any failure to load a hub
    id, is one line."""
    path = Path(spec).expanduser()
    if path.exists():
        return _read_local(path)
    if looks_like_path(spec):
        raise MolfError(f"{what}: file not found: {spec}")
    local_hint = f"give a local file ({', '.join(FILE_SUFFIXES)}) or a save_to_disk directory"
    # In offline mode the datasets client answers from its cache at once; otherwise an
    # unreachable hub would be retried with backoff for most of a minute.
    why = None if _hub.offline_setting() else _hub.unreachable()
    if why:
        raise MolfError(
            f"{what}: cannot load '{spec}': the hub is unreachable ({why}); {local_hint}"
        )
    try:
        import datasets

        loaded = datasets.load_dataset(spec)
        splits = {name: list(split) for name, split in loaded.items()}
    except Exception as e:  # network, auth, unknown id, bad format: all mean "cannot use it"
        raise MolfError(
            f"{what}: cannot load '{spec}' from the Hugging Face hub ({one_line(e)}); "
            f"offline? {local_hint}"
        ) from None
    return Table(splits, spec, local=False)
