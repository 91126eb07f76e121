"""Writing rows in every file form the tasks read (`molf.tasks.rows`), for tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def write_rows(path: Path, rows: list[dict[str, Any]], kind: str) -> Path:
    """Write `rows` to `path` as `kind`: json (a list), jsonl / json-lines (a blank line at the
    end), csv (nested values as JSON text), parquet, or saved (a `save_to_disk` directory)."""
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind in ("jsonl", "json-lines"):
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    elif kind == "csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "saved":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise ValueError(kind)
    return path
