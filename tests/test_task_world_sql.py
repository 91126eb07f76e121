"""The `world-sql` task: questions over the geonames world database, scored by execution."""

from __future__ import annotations

import pytest

from molf.errors import MolfError
from molf.tasks import TaskRequest, build_task, get_task
from molf.tasks.world_sql import (
    FAMILIES,
    MAX_RESULT_ROWS,
    TASK,
    run_query,
    score_predictions,
    world_database,
    world_records,
    world_tables,
)


def _shape(question: str) -> str:
    """A question's wording without its values (capitalised names and numbers)."""
    import re

    return re.sub(r"([A-Z][\w'./-]*|\d+)", "_", question)


def test_tables_hold_real_data():
    countries, cities = world_tables()
    assert len(countries) > 200 and len(cities) > 5000
    by_name = {c[0]: c for c in countries}
    assert by_name["France"][1:3] == ("Europe", "Paris")
    assert by_name["Japan"][5] == "JPY"
    assert any(c[0] == "Tokyo" and c[1] == "Japan" for c in cities)


def test_pool_is_answerable_unique_and_covers_every_family():
    train, val, test = world_records(0, None, 32, 128)
    records = train + val + test
    sqls = [r["sql"] for r in records]
    assert len(set(sqls)) == len(sqls)  # no query asked twice, so none is trained and held out
    assert {r["family"] for r in records} == set(FAMILIES)
    # held-out records are asked in wording training never uses
    assert all(r["held_out_phrasing"] for r in val + test)
    assert not any(r["held_out_phrasing"] for r in train)
    trained_wordings = {_shape(r["question"]) for r in train}
    assert not trained_wordings & {_shape(r["question"]) for r in test}
    conn, deadline = world_database()
    try:
        for r in records[::7]:
            rows = run_query(conn, deadline, r["sql"])
            assert rows is not None and 1 <= sum(rows.values()) <= MAX_RESULT_ROWS, r
            assert r["prompt"].endswith("-- SQL:") and r["question"] in r["prompt"]
    finally:
        conn.close()


def test_splits_are_deterministic_and_the_test_set_ignores_train_size():
    a = TASK.build(TaskRequest("world-sql", None, seed=1, n_train=40, n_val=8, n_test=16))
    assert len(a.train) == 40 and len(a.validation) == 8 and len(a.test) == 16
    assert TASK.build(TaskRequest("world-sql", None, seed=1, n_train=40, n_val=8, n_test=16)) == a
    b = TASK.build(TaskRequest("world-sql", None, seed=1, n_train=None, n_val=8, n_test=16))
    assert b.test == a.test
    c = TASK.build(TaskRequest("world-sql", None, seed=2, n_train=40, n_val=8, n_test=16))
    assert c.test != a.test
    held = {r["sql"] for r in a.test + a.validation}
    assert all(ex.completion.strip() not in held for ex in b.train)
    task, _ = build_task("world-sql", None, seed=0, n_train=4, n_val=1, n_test=2)
    assert task is get_task("world-sql") and task.headline == "execution_match"


def test_too_many_held_out_records_is_one_clear_error():
    with pytest.raises(MolfError, match="held-out questions exist"):
        world_records(0, 10, 500, 500)


def test_refuses_a_data_path():
    with pytest.raises(MolfError, match="embedded"):
        TASK.build(TaskRequest("world-sql", "x.json", seed=0, n_train=4, n_val=1, n_test=2))


def test_scoring_by_execution():
    _, _, test = world_records(0, 10, 0, 6)
    gold = [r["sql"] for r in test]
    items: dict[str, float] = {}
    m = score_predictions(gold, test, items)
    assert m == {"execution_match": 1.0, "valid_sql": 1.0, "exact_match": 1.0}
    assert list(items.values()) == [1.0] * 6
    # the same rows another way (reordered predicate, other spacing) still match
    first = test[0]["sql"]
    spaced = first.replace(" FROM ", "  FROM  ") + " ;"
    m = score_predictions([spaced], test[:1])
    assert m["execution_match"] == 1.0 and m["exact_match"] == 1.0
    wrong = ["SELECT name FROM countries WHERE name = 'Nowhere'", "not sql at all"]
    m = score_predictions(wrong, test[:2])
    assert m["execution_match"] == 0.0 and m["valid_sql"] == 0.5


def test_predictions_cannot_write_or_escape():
    conn, deadline = world_database()
    try:
        before = run_query(conn, deadline, "SELECT COUNT(*) FROM cities")
        for sql in (
            "DELETE FROM cities",
            "DROP TABLE countries",
            "INSERT INTO countries VALUES ('X', 'Y', 'Z', 1, 1, 'EUR')",
            "ATTACH DATABASE '/tmp/x.db' AS x",
            "PRAGMA writable_schema = ON",
            "",
        ):
            assert run_query(conn, deadline, sql) is None, sql
        assert run_query(conn, deadline, "SELECT COUNT(*) FROM cities") == before
        # a runaway cross join is stopped by the time limit
        deadline.seconds = 0.2
        runaway = "SELECT COUNT(*) FROM cities a, cities b, cities c"
        assert run_query(conn, deadline, runaway) is None
    finally:
        conn.close()
