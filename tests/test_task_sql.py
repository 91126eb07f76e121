"""Text-to-SQL task: builders (gretel fixtures, embedded Spider dev) and the metric functions."""

from __future__ import annotations

import json
import math
import sqlite3
import time

import pytest
import torch

from molf.errors import MolfError
from molf.tasks import TaskRequest, build_task, get_task
from molf.tasks import sql as S
from molf.tasks import sql_engine as E

TASK = S.TASK


def _runs(script: str, sql: str) -> bool:
    """Whether `sql` runs (in time) on the database `script` builds."""
    try:
        E.execute_sql(script, sql)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError):
        return False
    return True


# ---------------------------------------------------------------- gretel fixtures (upstream schema)

CONTEXT = (
    "CREATE TABLE farms (id INT, name TEXT, region TEXT, acres REAL); "
    "INSERT INTO farms (id, name, region, acres) VALUES (1, 'Oak Hill', 'North', 120.5), "
    "(2, 'River Bend', 'South', 80), (3, 'Sun Acres', 'North', 200);"
)


def gretel_row(i: int, **over: object) -> dict:
    row = {
        "id": 1000 + i,
        "domain": "agriculture",
        "domain_description": "Farm records.",
        "sql_complexity": "basic SQL",
        "sql_complexity_description": "basic SQL with a simple select statement",
        "sql_task_type": "analytics and reporting",
        "sql_task_type_description": "generating reports",
        "sql_prompt": f"How many farms have more than {i} acres?",
        "sql_context": CONTEXT,
        "sql": f"SELECT COUNT(*)\nFROM farms WHERE acres > {i};",
        "sql_explanation": "Counts farms above a size.",
    }
    row.update(over)
    return row


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_json(path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def test_task_attributes_and_registry():
    assert TASK.name == "sql" and TASK.headline == "logic_match"
    assert TASK.sources == ("spider-dev", "gretel")
    assert get_task("gretel") is TASK and get_task("spider-dev") is TASK


def test_gretel_jsonl_builder(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [gretel_row(i) for i in range(12)])
    splits = TASK.build(TaskRequest("gretel", path, seed=3, n_train=None, n_val=2, n_test=3))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (7, 2, 3)
    ex = splits.train[0]
    assert ex.prompt.startswith("-- SQLite schema:\nCREATE TABLE farms")
    assert ex.prompt.endswith("-- SQL:")
    assert "INSERT" not in ex.prompt  # rows are kept for execution, not shown to the model
    assert ex.completion.startswith(" SELECT COUNT(*) FROM farms WHERE acres > ")
    assert "\n" not in ex.completion
    rec = splits.test[0]
    assert rec["has_content"] is True and "INSERT INTO farms" in rec["context"]
    assert rec["domain"] == "agriculture" and rec["source"] == "gretel"
    assert "\n" not in rec["sql"] and rec["prompt"].startswith("-- SQLite schema:")
    # every row lands in exactly one split
    ids = [r["id"] for r in splits.test + splits.validation]
    questions = {e.prompt for e in splits.train} | {
        r["prompt"] for r in splits.test + splits.validation
    }
    assert len(set(ids)) == 5 and len(questions) == 12


def test_gretel_deterministic_and_json_equals_jsonl(tmp_path):
    rows = [gretel_row(i) for i in range(20)]
    a = TASK.build(TaskRequest("gretel", write_jsonl(tmp_path / "g.jsonl", rows), 7, None, 4, 4))
    b = TASK.build(TaskRequest("gretel", write_json(tmp_path / "g.json", rows), 7, None, 4, 4))
    c = TASK.build(TaskRequest("gretel", str(tmp_path / "g.jsonl"), 8, None, 4, 4))
    assert a.train == b.train and a.test == b.test and a.validation == b.validation
    assert [r["id"] for r in a.test] != [r["id"] for r in c.test]
    small = TASK.build(TaskRequest("gretel", str(tmp_path / "g.json"), 7, 5, 4, 4))
    assert small.train == a.train[:5] and small.test == a.test


def test_gretel_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [gretel_row(i) for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "g.parquet")
    a = TASK.build(TaskRequest("gretel", str(tmp_path / "g.parquet"), 1, None, 1, 2))
    b = TASK.build(TaskRequest("gretel", write_jsonl(tmp_path / "g.jsonl", rows), 1, None, 1, 2))
    assert a.train == b.train and a.test == b.test


def test_gretel_csv_and_build_task(tmp_path):
    import csv

    rows = [gretel_row(i) for i in range(6)]
    with open(tmp_path / "g.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    task, splits = build_task("sql", str(tmp_path / "g.csv"), seed=0, n_val=1, n_test=2)
    assert task is TASK and len(splits.train) == 3 and splits.info["source"] == "gretel"


@pytest.mark.parametrize(
    "row, message",
    [
        ({k: v for k, v in gretel_row(2).items() if k != "sql"}, "record 2: missing field 'sql'"),
        (gretel_row(2, sql_context=None), "record 2: missing field 'sql_context'"),
        (gretel_row(2, sql_prompt=5), "record 2: field 'sql_prompt' must be a string"),
        (gretel_row(2, sql="  "), "record 2: field 'sql' is empty"),
    ],
)
def test_gretel_bad_record_names_record_and_field(tmp_path, row, message):
    rows = [gretel_row(0), gretel_row(1), row, gretel_row(3)]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(MolfError, match=message):
        TASK.build(TaskRequest("gretel", path, 0, None, 1, 1))


def test_gretel_bad_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(gretel_row(0)) + "\n{not json\n")
    with pytest.raises(MolfError, match="bad.jsonl line 2: invalid JSON"):
        TASK.build(TaskRequest("gretel", str(bad), 0, None, 1, 1))
    with pytest.raises(MolfError, match="file not found"):
        TASK.build(TaskRequest("gretel", str(tmp_path / "missing.jsonl"), 0, None, 1, 1))
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"rows": []}))
    with pytest.raises(MolfError, match="obj.json: expected a JSON list"):
        TASK.build(TaskRequest("gretel", str(obj), 0, None, 1, 1))


def test_gretel_long_prompts_filtered(tmp_path):
    huge = "CREATE TABLE t (" + ", ".join(f"c{i} INT" for i in range(800)) + ");"
    rows = [gretel_row(i) for i in range(5)] + [gretel_row(9, sql_context=huge)]
    splits = TASK.build(
        TaskRequest("gretel", write_jsonl(tmp_path / "g.jsonl", rows), 0, None, 1, 1)
    )
    assert splits.info["dropped_long_prompts"] == 1
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 5
    only_long = write_jsonl(tmp_path / "long.jsonl", [gretel_row(1, sql_context=huge)])
    with pytest.raises(MolfError, match="no records left"):
        TASK.build(TaskRequest("gretel", only_long, 0, None, 1, 1))


def test_gretel_hub_failure_is_one_line_error(monkeypatch, hub_online):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub\nsecond line of detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MolfError) as info:
        TASK.build(TaskRequest("gretel", "someone/some_sql_set", 0, None, 1, 1))
    msg = str(info.value)
    assert "someone/some_sql_set" in msg and "\n" not in msg
    with pytest.raises(MolfError, match="gretelai/synthetic_text_to_sql"):
        TASK.build(TaskRequest("gretel", None, 0, None, 1, 1))


# ---------------------------------------------------------------- spider-dev (embedded)


@pytest.fixture(scope="module")
def spider():
    return TASK.build(TaskRequest("spider-dev", None, seed=0, n_train=None, n_val=64, n_test=128))


def test_spider_sizes_and_db_disjoint(spider):
    assert len(spider.test) == 128 and len(spider.validation) == 64
    test_dbs = {r["db_id"] for r in spider.test}
    val_dbs = {r["db_id"] for r in spider.validation}
    info = spider.info
    assert test_dbs <= set(info["test_db_ids"]) and val_dbs <= set(info["validation_db_ids"])
    train_dbs = set(info["train_db_ids"])
    assert not (train_dbs & set(info["test_db_ids"])) and not (
        train_dbs & set(info["validation_db_ids"])
    )
    assert not (set(info["test_db_ids"]) & set(info["validation_db_ids"]))
    assert len(train_dbs | set(info["test_db_ids"]) | set(info["validation_db_ids"])) == 20
    # no held-out schema ever appears in a training prompt
    held_schemas = {r["schema"] for r in spider.test + spider.validation}
    assert not any(s in ex.prompt for ex in spider.train for s in held_schemas)
    assert 500 < len(spider.train) < 1034 - 192
    ex = spider.train[0]
    assert ex.prompt.startswith("-- SQLite schema:\nCREATE TABLE ") and "-- Question: " in ex.prompt
    assert ex.completion.startswith(" ") and "\n" not in ex.completion
    assert all(r["has_content"] is False for r in spider.test)


def test_spider_deterministic_and_seeded(spider):
    again = TASK.build(TaskRequest("spider-dev", None, seed=0, n_train=None, n_val=64, n_test=128))
    assert again.train == spider.train and again.test == spider.test
    others = [
        TASK.build(TaskRequest("spider-dev", None, seed=s, n_train=10, n_val=8, n_test=16)).info[
            "test_db_ids"
        ]
        for s in (1, 2, 3)
    ]
    assert any(o != spider.info["test_db_ids"] for o in others)
    task, small = build_task("sql", seed=1, n_train=10, n_val=8, n_test=16)  # embedded default
    assert task is TASK and small.info["source"] == "spider-dev"
    assert (len(small.train), len(small.validation), len(small.test)) == (10, 8, 16)


def test_spider_gold_queries_run_on_empty_schema(spider):
    records = spider.test[:40]
    scores = S.score_predictions([r["sql"] for r in records], records)
    assert scores == {"exact_match": 1.0, "logic_match": 1.0, "valid_sql": 1.0}


def test_spider_errors(tmp_path):
    with pytest.raises(MolfError, match="none is left for training"):
        TASK.build(TaskRequest("spider-dev", None, 0, None, 10, 2000))
    (tmp_path / "tables.json").write_text("[]")
    (tmp_path / "dev.json").write_text(json.dumps([{"db_id": "x", "question": "q?"}]))
    with pytest.raises(MolfError, match="dev.json record 0: missing field 'query'"):
        TASK.build(TaskRequest("spider-dev", str(tmp_path), 0, None, 1, 1))
    (tmp_path / "dev.json").write_text(json.dumps([{"db_id": "x", "question": 1, "query": "q"}]))
    with pytest.raises(MolfError, match="dev.json record 0: field 'question' must be a string"):
        TASK.build(TaskRequest("spider-dev", str(tmp_path), 0, None, 1, 1))
    with pytest.raises(MolfError, match="unknown source"):
        TASK.build(TaskRequest("wikisql", None, 0, None, 1, 1))


def test_spider_ddl_from_tables_entry():
    db = {
        "db_id": "d",
        "table_names_original": ["people", "pets", "sqlite_sequence"],
        "column_names_original": [
            [-1, "*"],
            [0, "People_ID"],
            [0, "Home Town"],
            [1, "PetID"],
            [1, "Owner"],
            [2, "name"],
        ],
        "column_types": ["text", "number", "text", "number", "number", "text"],
        "primary_keys": [1, 3],
        "foreign_keys": [[4, 1]],
    }
    ddl = S.spider_ddl(db)
    assert ddl.splitlines() == [
        'CREATE TABLE people (People_ID number PRIMARY KEY, "Home Town" text);',
        "CREATE TABLE pets (PetID number PRIMARY KEY, Owner number, "
        "FOREIGN KEY (Owner) REFERENCES people(People_ID));",
    ]
    assert E.schema_of(ddl) == {
        "people": {"people_id": "TEXT", "home town": "TEXT"},
        "pets": {"petid": "TEXT", "owner": "TEXT"},
    }


# ---------------------------------------------------------------- metrics

SPIDER_LIKE = {
    "sql": "SELECT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.singer_id = T2.singer_id "
    "WHERE T2.year = 2014 AND T1.age > 30",
    "schema": "CREATE TABLE singer (singer_id number PRIMARY KEY, Name text, Age number, "
    "Country text);\nCREATE TABLE concert (concert_id number, Singer_ID number, Year text);",
    "has_content": False,
}
SPIDER_LIKE["context"] = SPIDER_LIKE["schema"]


def test_normalize_and_exact_match():
    assert E.exact_match("select  A from T;", "SELECT a FROM t")
    assert E.exact_match('SELECT a FROM t WHERE c = "X"', "select a from t where c = 'x' ;")
    assert E.exact_match("SELECT count ( * ) ,  b FROM t", "SELECT count(*), b FROM t")
    assert not E.exact_match(
        "SELECT a FROM t WHERE a=1 AND b=2", "SELECT a FROM t WHERE b=2 AND a=1"
    )
    assert not E.exact_match("SELECT a FROM t", "SELECT b FROM t")
    assert E.one_line("SELECT a,\n\t b FROM t WHERE c = 'two  spaces'") == (
        "SELECT a, b FROM t WHERE c = 'two  spaces'"
    )
    assert E.split_statements("CREATE TABLE t (a TEXT); INSERT INTO t VALUES ('x;y');") == [
        "CREATE TABLE t (a TEXT)",
        "INSERT INTO t VALUES ('x;y')",
    ]


def test_logic_match_equivalences():
    schema = E.schema_of(SPIDER_LIKE["schema"])
    gold = SPIDER_LIKE["sql"]
    same = [
        # other alias names, other join order, conjuncts swapped, literal on the left, case
        "select s.Name from concert as c join singer as s on c.Singer_ID = s.singer_id "
        "where 30 < s.age and c.year = 2014;",
        "SELECT singer.name FROM singer INNER JOIN concert ON concert.singer_id = singer.singer_id "
        "WHERE singer.age > 30 AND concert.year = 2014",
    ]
    for pred in same:
        assert E.logic_match(pred, gold, schema), pred
        assert not E.exact_match(pred, gold)
    assert E.logic_match(
        'SELECT name FROM singer WHERE country = "France"',
        "SELECT Name FROM singer WHERE Country = 'France'",
        schema,
    )
    assert E.logic_match("SELECT count(*) AS n FROM singer", "SELECT COUNT(*) FROM singer", schema)
    assert E.logic_match(
        "SELECT * FROM singer", "SELECT singer_id, name, age, country FROM singer", schema
    )
    different = [
        gold.replace("age > 30", "age >= 30"),
        gold.replace("2014", "2015"),
        gold.replace("T1.name", "T1.country"),
        "SELECT name FROM singer ORDER BY age DESC",
        "SELEC name FROM singer",  # unparsable: never a match
        "",
    ]
    for pred in different:
        assert not E.logic_match(pred, gold, schema), pred
    # a self-join keeps its aliases: which copy a column comes from matters
    self_join = "SELECT {}.name FROM singer AS T1 JOIN singer AS T2 ON T1.age = T2.age WHERE T2.country = 'x'"
    assert E.logic_match(self_join.format("T1"), self_join.format("T1"), schema)
    assert not E.logic_match(self_join.format("T2"), self_join.format("T1"), schema)
    # a correlated subquery keeps the outer alias it refers to
    corr = "SELECT T1.name FROM singer T1 WHERE T1.age > (SELECT avg(T2.age) FROM singer T2 WHERE T2.country = {}.country)"
    assert not E.logic_match(corr.format("T2"), corr.format("T1"), schema)
    assert E.canonical_sql("SELECT FROM WHERE") is None
    assert not E.logic_match("SELECT a FROM t WHERE (", "SELECT a FROM t WHERE (")


def test_score_predictions_spider_like_record():
    preds = [
        SPIDER_LIKE["sql"] + " ;",  # exact
        "SELECT singer.name FROM singer JOIN concert ON concert.singer_id = singer.singer_id "
        "WHERE singer.age > 30 AND concert.year = 2014",  # logic only
        "SELECT name FROM singer WHERE age > 99",  # valid, wrong
        "SELECT nosuchcol FROM singer",  # invalid in SQLite
    ]
    scores = S.score_predictions(preds, [SPIDER_LIKE] * 4)
    assert scores == {"exact_match": 0.25, "logic_match": 0.5, "valid_sql": 0.75}
    assert "execution_match" not in scores  # no table contents anywhere


def test_execution_match_on_context_with_inserts():
    rec = {
        "sql": "SELECT name FROM farms WHERE acres > 100",
        "context": CONTEXT,
        "has_content": True,
    }
    rec["schema"] = "CREATE TABLE farms (id INT, name TEXT, region TEXT, acres REAL);"
    preds = [
        "SELECT name FROM farms WHERE region = 'North'",  # same rows, other logic
        "SELECT name FROM farms WHERE acres > 100 ORDER BY id DESC",  # same multiset
        "SELECT name FROM farms",  # extra row
        "SELECT name FROM farm",  # invalid
    ]
    per = [S.score_record(p, rec) for p in preds]
    assert [p["execution_match"] for p in per] == [True, True, False, False]
    assert [p["valid_sql"] for p in per] == [True, True, True, False]
    assert [p["logic_match"] for p in per] == [False, False, False, False]
    scores = S.score_predictions(preds, [rec] * 4)
    assert scores["execution_match"] == 0.5 and scores["valid_sql"] == 0.75
    # duplicates count: a multiset, not a set
    dup = {**rec, "sql": "SELECT region FROM farms"}
    assert S.score_record("SELECT region FROM farms", dup)["execution_match"]
    assert not S.score_record("SELECT DISTINCT region FROM farms", dup)["execution_match"]
    # float results are compared after rounding away summation-order noise
    assert S.score_record("SELECT 0.1 + 0.2", {**rec, "sql": "SELECT 0.3"})["execution_match"]
    # a gold that SQLite cannot run leaves the record out of execution_match
    mysql_gold = {**rec, "sql": "SELECT name FROM farms WHERE acres > DATE_SUB(NOW(), 1)"}
    assert S.score_record("SELECT 1", mysql_gold)["execution_match"] is None


def test_execution_match_compares_dml_by_effect():
    rec = {"sql": "DELETE FROM farms WHERE acres < 100", "context": CONTEXT, "has_content": True}
    assert S.score_record("DELETE FROM farms WHERE name = 'River Bend'", rec)["execution_match"]
    assert not S.score_record("DELETE FROM farms WHERE acres < 150", rec)["execution_match"]


def test_execution_is_time_limited_and_sandboxed(tmp_path):
    forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"
    start = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        E.execute_sql(CONTEXT, forever, time_limit=0.2)
    assert time.monotonic() - start < 5
    target = tmp_path / "escape.db"
    assert not _runs(CONTEXT, f"ATTACH DATABASE '{target}' AS x")
    assert not _runs(CONTEXT, f"VACUUM INTO '{target}'")
    assert not target.exists()
    assert not _runs(CONTEXT, "PRAGMA journal_mode = WAL")
    assert not _runs(CONTEXT, "SELECT 1; SELECT 2")  # one statement only
    assert not _runs(CONTEXT, "   ")


def test_runaway_results_are_failures(monkeypatch):
    monkeypatch.setattr(E, "MAX_RESULT_ROWS", 2)
    assert E.execute_sql(CONTEXT, "SELECT name FROM farms WHERE acres > 100")[0] == "rows"
    with pytest.raises(ValueError, match="more than 2 result rows"):
        E.execute_sql(CONTEXT, "SELECT name FROM farms")


def test_score_predictions_edge_cases():
    scores = S.score_predictions([], [])
    assert math.isnan(scores["logic_match"]) and "execution_match" not in scores
    with pytest.raises(ValueError):
        S.score_predictions(["SELECT 1"], [])


# ---------------------------------------------------------------- evaluate end to end


class _FakeTokenizer:
    """Each prompt is one token (its index in `prompts`); answers decode from their own ids."""

    padding_side = "right"
    pad_token_id = 0

    def __init__(self, prompts: list[str], answers: list[str]) -> None:
        self.ids = {p: i for i, p in enumerate(prompts)}
        self.answers = answers

    def __call__(self, texts, return_tensors="pt", padding=True):
        if isinstance(texts, str):  # one prompt: a list of ids, as transformers gives it
            return {"input_ids": [self.ids[texts]], "attention_mask": [1]}
        ids = torch.tensor([[self.ids[t]] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.answers[int(r[0])] for r in rows]


class _FakeModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.max_new_tokens: list[int] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert do_sample is False
        self.max_new_tokens.append(max_new_tokens)
        return torch.cat([input_ids, input_ids], dim=1)  # the "answer" is the prompt's own id


def test_evaluate_end_to_end_with_fake_model(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [gretel_row(i) for i in range(10)])
    splits = TASK.build(TaskRequest("gretel", path, 0, None, 0, 4))
    records = splits.test
    answers = [
        " " + records[0]["sql"] + "\n-- Question: next one",  # right; the rest of the line is cut
        "SELECT count(*) FROM farms WHERE acres > 999",  # wrong
        "SELECT nonsense FROM nowhere",  # invalid
        records[3]["sql"].lower(),  # right
    ]
    model = _FakeModel()
    tok = _FakeTokenizer([r["prompt"] for r in records], answers)
    scores = TASK.evaluate(model, tok, records, batch_size=3)
    assert scores["exact_match"] == 0.5 and scores["logic_match"] == 0.5
    assert scores["valid_sql"] == 0.75
    assert scores["execution_match"] == 0.5  # every gold counts 3 farms; the wrong one counts 0
    assert model.max_new_tokens == [S.MAX_NEW_TOKENS] * 2 and tok.padding_side == "right"
