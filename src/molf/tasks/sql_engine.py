"""How molf runs and compares SQL: text normalisation, sandboxed SQLite execution with a time
limit, and canonical forms (sqlglot) for logic match. Shared by the text-to-SQL tasks
(`molf.tasks.sql`, `molf.tasks.world_sql`), which also share the prompt format `make_prompt`.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from typing import Any

import sqlglot
from sqlglot import exp

EXEC_TIME_LIMIT_S = 2.0
_PROGRESS_STEPS = 1000  # SQLite VM instructions between deadline checks
MAX_RESULT_ROWS = 100_000  # a result this big on tiny tables is a runaway join, not an answer

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


def strip_end(sql: str) -> str:
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


def is_insert(statement: str) -> bool:
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
    return strip_end(out)


def exact_match(prediction: str, gold: str) -> bool:
    """Whether the two queries agree after `normalize_sql_text`."""
    return normalize_sql_text(prediction) == normalize_sql_text(gold)


# --------------------------------------------------------------------------------------------
# SQLite execution


class Deadline:
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
) -> tuple[sqlite3.Connection, Deadline]:
    """A fresh in-memory SQLite database from a DDL/INSERT script.

    Statements run one by one and failing ones are skipped, because upstream contexts are written
    for assorted dialects: what SQLite accepts is kept. Queries run afterwards are sandboxed (no
    ATTACH/PRAGMA) and interrupted after `time_limit` seconds.
    """
    conn = sqlite3.connect(":memory:", isolation_level=None)
    deadline = Deadline(time_limit)
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


def cell_value(value: Any) -> Any:
    # SUM/AVG over the same rows in another order can differ in the last bits.
    return round(value, 6) if isinstance(value, float) else value


def _run(conn: sqlite3.Connection, deadline: Deadline, sql: str) -> tuple[str, Any]:
    """Run one statement; a SELECT gives its row multiset, anything else the database's contents."""
    deadline.start()
    cur = conn.execute(sql)
    if cur.description is not None:
        rows = cur.fetchmany(MAX_RESULT_ROWS + 1)
        if len(rows) > MAX_RESULT_ROWS:
            raise ValueError(f"more than {MAX_RESULT_ROWS} result rows")
        return "rows", Counter(tuple(cell_value(v) for v in row) for row in rows)
    state = {}
    for table in _tables(conn):
        deadline.start()
        quoted = '"' + table.replace('"', '""') + '"'
        rows = conn.execute(f"SELECT * FROM {quoted}").fetchall()
        state[table] = Counter(tuple(cell_value(v) for v in row) for row in rows)
    return "state", state


def execute_sql(script: str, sql: str, time_limit: float = EXEC_TIME_LIMIT_S) -> tuple[str, Any]:
    """Run `sql` on a fresh database built from `script`; raises sqlite3.Error/ValueError on failure.

    Returns ("rows", Counter of row tuples) for queries and ("state", {table: Counter}) for
    statements that change data, so DML answers are compared by their effect. Results over
    MAX_RESULT_ROWS rows count as failures.
    """
    sql = strip_end(sql)
    if not sql:
        raise ValueError("empty query")
    conn, deadline = build_database(script, time_limit)
    try:
        return _run(conn, deadline, sql)
    finally:
        conn.close()


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

    text = strip_end(sql)
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
# The prompt


def make_prompt(schema: str, question: str) -> str:
    """The prompt: schema DDL, the question on one line, then the cue for the SQL completion."""
    return f"-- SQLite schema:\n{schema.strip()}\n-- Question: {_WS.sub(' ', question).strip()}\n-- SQL:"
