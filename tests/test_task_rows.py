"""The shared row reader, the path-or-hub rule and the task registry."""

from __future__ import annotations

import pytest

from molf._files import looks_like_path
from molf.errors import MolfError
from molf.tasks import TaskRequest, TaskSplits, build_task, get_task, task_names
from molf.tasks import base as task_base
from molf.tasks.base import Task, TaskOptions, register_task, registered
from molf.tasks.common import Example
from molf.tasks.rows import load_table, read_json, read_rows
from tests.files import write_rows

ROWS = [
    {"q": "one", "n": 1, "tags": ["a"]},
    {"q": "two", "n": 2, "tags": []},
    {"q": "three", "n": None, "tags": ["b", "c"]},
]


@pytest.mark.parametrize(
    "name, kind",
    [
        ("r.json", "json"),
        ("r.jsonl", "jsonl"),
        ("lines.json", "jsonl"),  # JSON lines under a .json name (the upstream MedMCQA files)
        ("r.parquet", "parquet"),
        ("saved", "saved"),
    ],
)
def test_read_rows_typed_formats_agree(tmp_path, name, kind):
    assert read_rows(write_rows(tmp_path / name, ROWS, kind)) == ROWS


def test_read_rows_csv_keeps_strings_and_strips_bom(tmp_path):
    path = write_rows(tmp_path / "r.csv", ROWS, "csv")
    rows = read_rows(path)
    assert [r["q"] for r in rows] == ["one", "two", "three"]
    assert rows[0]["n"] == "1" and rows[2]["n"] == ""  # CSV has no types: values stay as written
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfq,n\nx,1\n")
    assert read_rows(bom) == [{"q": "x", "n": "1"}]


def test_saved_dataset_dict_keeps_splits(tmp_path):
    import datasets

    saved = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:2]), "test": datasets.Dataset.from_list(ROWS)}
    ).save_to_disk(str(saved))
    table = load_table(str(saved), "mine")
    assert table.local and table.name == "dd"
    assert table.splits == {"train": ROWS[:2], "test": ROWS}
    with pytest.raises(MolfError, match=r"dd: holds several splits \(test, train\)"):
        read_rows(saved)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"a": 1}\n{oops\n', "bad.jsonl line 2: invalid JSON"),
        ("bad.json", '[{"a": 1},\n {oops}]', r"bad.json: invalid JSON \(line 2"),
        ("obj.json", '{"rows": []}', "obj.json: expected a JSON list of rows .* got dict"),
        ("lines.json", '{"a": 1}\n{"a": 2}\n[oops\n', "lines.json line 3: invalid JSON"),
        ("z.txt", "hi", r"z.txt: unsupported file type \(use .jsonl, .json, .csv, .parquet"),
        ("bad.parquet", "not parquet", "bad.parquet: cannot read parquet"),
    ],
)
def test_bad_files_are_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(MolfError, match=message) as err:
        read_rows(tmp_path / name)
    assert "\n" not in str(err.value)


def test_missing_and_foreign_paths(tmp_path):
    with pytest.raises(MolfError, match="file not found"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "plain").mkdir()
    with pytest.raises(MolfError, match="plain: a directory, but not one written by datasets"):
        read_rows(tmp_path / "plain")
    (tmp_path / "latin1.csv").write_bytes(b"q\n\xe9t\xe9\n")
    with pytest.raises(MolfError, match="latin1.csv: cannot read"):
        read_rows(tmp_path / "latin1.csv")
    (tmp_path / "doc.json").write_text('{"a": [1,\n 2,, 3]}')
    with pytest.raises(MolfError, match=r"doc.json: invalid JSON \(line 2"):
        read_json(tmp_path / "doc.json")


def test_load_table_path_or_hub(tmp_path, monkeypatch, hub_online):
    import datasets

    calls = []

    def fake_hub(spec):
        calls.append(spec)
        if spec == "org/offline":
            raise ConnectionError("Couldn't reach 'org/offline' on the Hub\n(LocalEntryNotFound)")
        return {"train": ROWS, "validation": ROWS[:1]}

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    table = load_table("org/data", "mine")
    assert not table.local and table.splits == {"train": ROWS, "validation": ROWS[:1]}
    with pytest.raises(MolfError) as err:
        load_table("org/offline", "mine")
    assert "mine: cannot load 'org/offline'" in str(err.value) and "\n" not in str(err.value)
    assert "offline?" in str(err.value)
    # a spec that can only be a path is never sent to the hub
    for spec in (str(tmp_path / "missing.csv"), "./data.jsonl", "data/sub/rows"):
        with pytest.raises(MolfError, match="mine: file not found"):
            load_table(spec, "mine")
    assert calls == ["org/data", "org/offline"]
    # an existing file wins over the hub even when its name could be a hub id
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "rows", ROWS, "saved")
    assert load_table("rows", "mine").local


@pytest.mark.parametrize(
    "spec, is_path",
    [
        ("smollm2-135m", False),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", False),
        ("Qwen/Qwen2.5-0.5B", False),
        ("openlifescienceai/medmcqa", False),
        ("./model", True),
        ("../data", True),
        ("/abs/dir", True),
        ("~/runs/x", True),
        ("runs/x/final", True),
        ("model/", True),
        ("C:\\data", True),
        ("C:rows", True),
        ("data\\rows", True),
        ("train.jsonl", True),
        ("org/rows.parquet", True),
        ("Model.GGUF", True),
    ],
)
def test_looks_like_path(spec, is_path):
    assert looks_like_path(spec) is is_path


# --------------------------------------------------------------------------- registry


def test_registered_tasks_follow_the_protocol():
    names = task_names()
    for expected in ("fact", "fact-geo", "counterfact", "med", "medmcqa", "sql", "gretel"):
        assert expected in names
    for name, entry in registered().items():
        assert isinstance(entry.task, Task) and entry.name == name
        made = get_task(name)
        # a task that reads options is made per run; the others are shared
        assert made is entry.task if entry.configure is None else type(made) is type(entry.task)
        for source in (entry.embedded, entry.with_data):
            assert source is None or source in entry.task.sources


def test_unknown_task_names_the_known_ones_and_points_paths_to_sft():
    with pytest.raises(MolfError, match=r"unknown task 'wikisql' \(known: .*fact-geo") as err:
        get_task("wikisql")
    assert "--task sft" not in str(err.value)
    with pytest.raises(MolfError, match="for your own data use --task sft --data my.jsonl"):
        get_task("my.jsonl")


def test_options_a_task_does_not_read_are_refused():
    with pytest.raises(MolfError, match=r"task 'med' does not read 'val_data' \(only sft does\)"):
        get_task("med", TaskOptions(val_data="v.jsonl"))
    with pytest.raises(MolfError, match="task 'sql' does not read 'prompt_field'"):
        build_task("spider-dev", None, options=TaskOptions(prompt_field="question"))
    # max_length applies to every task
    assert get_task("fact", TaskOptions(max_length=64)) is get_task("fact")
    with pytest.raises(MolfError, match="'generation_metric': must be one of none"):
        TaskOptions(generation_metric="bleu")
    with pytest.raises(MolfError, match="'max_new_tokens': must be > 0"):
        TaskOptions(max_new_tokens=0)


def test_options_from_a_config_object():
    class Config:
        max_length = 128
        val_data = "v.jsonl"
        generation_metric = "contains"
        lr_fft = 1e-4  # not a task option: ignored

    assert TaskOptions.from_config(Config()) == TaskOptions(
        max_length=128, val_data="v.jsonl", generation_metric="contains"
    )


class _EchoTask:
    """A task in a dozen lines: rows of a file become examples; evaluate counts records."""

    name = "echo"
    headline = "records"
    sources = ("echo",)

    def build(self, request: TaskRequest) -> TaskSplits:
        rows = read_rows(request.data)
        train = [Example(r["q"], " " + str(r["n"])) for r in rows]
        return TaskSplits(train=train, validation=[], test=rows[: request.n_test])

    def evaluate(self, model, tokenizer, records, batch_size=16):
        return {"records": float(len(records))}


def test_a_new_task_is_one_registration(tmp_path, monkeypatch):
    monkeypatch.setattr(task_base, "_REGISTRY", dict(task_base._REGISTRY))
    register_task(_EchoTask(), with_data="echo")
    path = write_rows(tmp_path / "r.jsonl", ROWS, "jsonl")
    task, splits = build_task("echo", str(path), n_test=2)
    assert isinstance(task, _EchoTask) and [e.prompt for e in splits.train] == [
        "one",
        "two",
        "three",
    ]
    assert task.evaluate(None, None, splits.test) == {"records": 2.0}
    with pytest.raises(MolfError, match="task 'echo' needs a data path"):
        build_task("echo")


def test_registration_refuses_clashes_and_unknown_options(monkeypatch):
    monkeypatch.setattr(task_base, "_REGISTRY", dict(task_base._REGISTRY))
    get_task("fact")  # registers the package's tasks

    class Clash(_EchoTask):
        sources = ("echo", "gretel")

    with pytest.raises(ValueError, match="'gretel' is taken by 'sql'"):
        register_task(Clash())
    with pytest.raises(ValueError, match="unknown options"):
        register_task(_EchoTask(), options=("temperature",))
    with pytest.raises(ValueError, match="'other' is not one of its sources"):
        register_task(_EchoTask(), embedded="other")


def test_unreachable_hub_fails_at_once(monkeypatch):
    import datasets

    def never(spec):
        raise AssertionError("the hub client was asked")

    monkeypatch.setattr(datasets, "load_dataset", never)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    # a closed port on this machine: the connection is refused at once
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(MolfError) as err:
        load_table("org/data", "mine")
    text = str(err.value)
    assert text.startswith("mine: cannot load 'org/data': the hub is unreachable (cannot connect")
    assert "save_to_disk directory" in text and "\n" not in text
