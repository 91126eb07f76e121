"""The `sft` task: every data format, loss masks, splits, packing, evaluation and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig

from molf.errors import MolfError
from molf.tasks import TaskOptions, build_task, get_task
from molf.tasks.common import IGNORE, Example
from molf.train.data import check_packable, collate, pack, tokenize_examples
from tests.files import write_rows

ROOT = Path(__file__).resolve().parents[1]
CAPITALS = ROOT / "examples" / "data" / "capitals_chat.jsonl"
SYSTEM = {"role": "system", "content": "Answer briefly."}


def chat(i: int, follow_up: bool = False) -> list[dict[str, str]]:
    messages = [
        SYSTEM,
        {"role": "user", "content": f"What is item {i}?"},
        {"role": "assistant", "content": f"Item {i} is a thing."},
    ]
    if follow_up:
        messages += [
            {"role": "user", "content": "And its colour?"},
            {"role": "assistant", "content": f"Colour {i}."},
        ]
    return messages


def chat_rows(n: int) -> list[dict]:
    return [{"messages": chat(i, follow_up=i % 2 == 1), "id": i} for i in range(n)]


def pc_rows(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}: two plus {i}?", "completion": f" {2 + i}"} for i in range(n)]


def text_rows(n: int) -> list[dict]:
    return [{"text": f"Line {i} of some plain text."} for i in range(n)]


def build(data, n_val=2, n_test=2, n_train=None, seed=0, **options):
    """`build_task('sft', ...)` with task options as keywords."""
    return build_task("sft", str(data), seed, n_train, n_val, n_test, TaskOptions(**options))


def tokens(examples, tok, max_length=512):
    return tokenize_examples(examples, tok, max_length)


# --------------------------------------------------------------------------- formats and masks


def test_prompt_completion_trains_on_the_completion_only(tmp_path, tiny_hf):
    _, tok = tiny_hf
    task, s = build(write_rows(tmp_path / "pc.jsonl", pc_rows(10), "jsonl"))
    assert s.info["format"] == "completion" and task.headline == "loss"
    assert (len(s.train), len(s.validation), len(s.test)) == (6, 2, 2)
    t = tokens(s.train, tok)
    for ex, ids, labels in zip(s.train, t.input_ids, t.labels):
        n_prompt = len(tok(ex.prompt, add_special_tokens=False)["input_ids"])
        assert labels[:n_prompt] == [IGNORE] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
        assert tok.decode(ids[n_prompt:-1]) == ex.completion


def test_chat_trains_on_assistant_turns_only(tmp_path, tiny_hf):
    _, tok = tiny_hf
    _, s = build(write_rows(tmp_path / "c.jsonl", chat_rows(8), "jsonl"), n_val=0, n_test=1)
    assert s.info["format"] == "chat"
    t = tokens(s.train, tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for ex, ids, labels in zip(s.train, t.input_ids, t.labels):
        trained = [i for i, y in zip(ids, labels) if y != IGNORE]
        replies = [m["content"] for m in ex.messages if m["role"] == "assistant"]
        # each assistant reply with its end-of-turn token, and nothing else
        assert tok.decode(trained) == "".join(f"{r}<|im_end|>\n" for r in replies)
        assert sum(1 for i, y in zip(ids, labels) if y == end) == len(replies)
        skipped = tok.decode([i for i, y in zip(ids, labels) if y == IGNORE])
        assert "What is item" in skipped and "Answer briefly." in skipped
        assert not any(r in skipped for r in replies)
        assert labels == [y if y == IGNORE else i for i, y in zip(ids, labels)]


def test_text_trains_on_every_token(tmp_path, tiny_hf):
    _, tok = tiny_hf
    _, s = build(write_rows(tmp_path / "t.jsonl", text_rows(6), "jsonl"), n_val=1, n_test=1)
    assert s.info["format"] == "text"
    t = tokens(s.train, tok)
    for ex, ids, labels in zip(s.train, t.input_ids, t.labels):
        assert labels == ids and ids[-1] == tok.eos_token_id
        assert tok.decode(ids[:-1]) == ex.completion


@pytest.mark.parametrize("kind", ["json", "csv", "parquet", "saved"])
@pytest.mark.parametrize("rows", [chat_rows, pc_rows, text_rows])
def test_every_file_form_gives_the_same_splits(tmp_path, kind, rows):
    reference = build(write_rows(tmp_path / "r.jsonl", rows(9), "jsonl"))[1]
    name = {"saved": "r", "json": "r.json", "csv": "r.csv", "parquet": "r.parquet"}[kind]
    other = build(write_rows(tmp_path / name, rows(9), kind))[1]
    # 'r.jsonl line 5' is 'r.csv row 5': the JSON lines file has no blank line before its end
    assert other.train == [
        Example(e.prompt, e.completion, e.messages, e.origin.replace("r.jsonl line", f"{name} row"))
        for e in reference.train
    ]
    assert [r["messages"] or r["completion"] for r in other.test] == [
        r["messages"] or r["completion"] for r in reference.test
    ]


def test_hub_id_with_splits(monkeypatch, hub_online):
    import datasets

    hub = {"train": chat_rows(6), "test": chat_rows(9)[6:]}
    monkeypatch.setattr(datasets, "load_dataset", lambda spec: hub)
    _, s = build("someone/chats", n_val=1, n_test=5)
    assert [r["id"] for r in s.test] and all(
        r["id"].startswith("someone/chats[test]") for r in s.test
    )
    assert len(s.test) == 3 and len(s.validation) == 1 and len(s.train) == 5
    assert s.info["test_from"] == "split"


def test_hub_offline_is_one_line(monkeypatch, hub_online):
    import datasets

    def offline(spec):
        raise ConnectionError(f"Couldn't reach '{spec}' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MolfError) as err:
        build("someone/chats")
    assert "sft: cannot load 'someone/chats'" in str(err.value) and "offline?" in str(err.value)
    assert "\n" not in str(err.value)


def test_column_mapping(tmp_path):
    rows = [{"question": f"q{i}?", "answer": f"a{i}", "extra": i} for i in range(5)]
    path = write_rows(tmp_path / "qa.jsonl", rows, "jsonl")
    _, s = build(path, 1, 1, prompt_field="question", completion_field="answer")
    assert s.info["columns"] == {"prompt": "question", "completion": "answer"}
    assert {(e.prompt, e.completion) for e in s.train} <= {(f"q{i}?", f"a{i}") for i in range(5)}
    convo = [{"dialogue": chat(i)} for i in range(4)]
    _, s = build(write_rows(tmp_path / "d.jsonl", convo, "jsonl"), 1, 1, messages_field="dialogue")
    assert s.info["format"] == "chat" and s.train[0].messages[0] == SYSTEM
    with pytest.raises(
        MolfError,
        match=r"qa.jsonl: no column 'prompt' for the prompt .*found: question, answer, extra",
    ):
        build(path, 1, 1, completion_field="answer")
    with pytest.raises(MolfError, match="name two formats"):
        build(path, 1, 1, text_field="question", messages_field="answer")


# --------------------------------------------------------------------------- splits


def test_split_column_and_aliases(tmp_path):
    rows = pc_rows(12)
    for i, r in enumerate(rows):
        r["split"] = ["train", "train", "dev", "test"][i % 4]
    _, s = build(write_rows(tmp_path / "s.csv", rows, "csv"), n_val=10, n_test=10)
    assert (len(s.train), len(s.validation), len(s.test)) == (6, 3, 3)
    assert s.info["validation_from"] == "split" and s.info["test_from"] == "split"
    rows[5]["split"] = "holdout"
    # row 6 after the header: the sixth row, rows[5]
    with pytest.raises(MolfError, match="s.csv row 6: split 'holdout' is not train, validation"):
        build(write_rows(tmp_path / "s.csv", rows, "csv"))


def test_val_data_is_validation_and_test(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", chat_rows(6), "jsonl")
    val = write_rows(tmp_path / "val.json", chat_rows(9)[6:], "json")
    _, s = build(train, n_val=5, n_test=5, val_data=str(val))
    assert len(s.train) == 6 and len(s.validation) == 3
    assert sorted(r["id"] for r in s.test) == sorted(r["id"] for r in s.validation)
    assert all(r["id"].startswith("val.json row") for r in s.validation)
    assert s.info["validation_from"] == "val_data" and s.info["test_from"] == "validation"
    other = write_rows(tmp_path / "pc.jsonl", pc_rows(3), "jsonl")
    with pytest.raises(MolfError, match="pc.jsonl: is prompt/completion .* training data is chat"):
        build(train, val_data=str(other))


def test_seeded_held_out_rows(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", text_rows(30), "jsonl")
    _, a = build(path, n_val=4, n_test=5, seed=1)
    _, b = build(path, n_val=4, n_test=5, seed=1)
    _, c = build(path, n_val=4, n_test=5, seed=2)
    _, small = build(path, n_val=4, n_test=5, seed=1, n_train=7)
    assert a == b and a.test != c.test
    assert (len(a.train), len(a.validation), len(a.test)) == (21, 4, 5)
    assert small.test == a.test and small.validation == a.validation
    assert small.train == a.train[:7]
    texts = [e.completion for e in a.train] + [r["completion"] for r in a.validation + a.test]
    assert len(set(texts)) == 30  # every row in exactly one split


def test_unset_sizes_scale_with_the_file(tmp_path):
    """n_val / n_test unset (None): a tenth of the rows each, at least 1 while a training row is
    left, at most 32 / 64; the note says where the rows went."""
    sizes = {}
    for n in (2, 3, 10, 40, 700):
        path = write_rows(tmp_path / f"n{n}.jsonl", pc_rows(n), "jsonl")
        _, s = build(path, n_val=None, n_test=None, n_train=256)
        sizes[n] = (len(s.train), len(s.validation), len(s.test))
    assert sizes == {
        2: (1, 0, 1),
        3: (1, 1, 1),
        10: (8, 1, 1),
        40: (32, 4, 4),
        700: (256, 32, 64),  # 604 left to train on, n_train=256 of them
    }
    _, s = build(tmp_path / "n40.jsonl", n_val=None, n_test=None)
    note = s.info["note"]
    assert note.startswith("n40.jsonl: 32 train, 4 validation (n_val unset: a tenth of 40 rows")
    assert "4 test (n_test unset: a tenth of 40 rows, at most 64, seeded)" in note
    # a set size is taken as given, the other still scales; the test rows do not depend on n_val
    _, only_test = build(tmp_path / "n40.jsonl", n_val=None, n_test=8)
    _, both = build(tmp_path / "n40.jsonl", n_val=5, n_test=8)
    assert (len(only_test.train), len(only_test.validation), len(only_test.test)) == (28, 4, 8)
    assert both.test == only_test.test and "8 test (n_test=8, seeded)" in both.info["note"]


def test_sizes_that_leave_nothing_to_train_name_the_numbers_and_keys(tmp_path):
    path = write_rows(tmp_path / "small.jsonl", pc_rows(40), "jsonl")
    with pytest.raises(MolfError) as err:
        build(path, n_val=32, n_test=64)
    assert str(err.value) == (
        "small.jsonl: 40 training rows, 40 held out for test and 0 for validation (n_test=64, "
        "n_val=32): none is left to train on; lower the config keys n_test and n_val, or leave "
        "them unset to hold out about 10% each (4 and 4 here)"
    )
    one = write_rows(tmp_path / "one.jsonl", pc_rows(1), "jsonl")
    with pytest.raises(MolfError, match="one.jsonl: 1 training row: too few to hold out a test"):
        build(one, n_val=None, n_test=None)


def test_unset_sizes_cap_the_data_s_own_splits(tmp_path):
    rows = pc_rows(200)
    for i, r in enumerate(rows):
        r["split"] = "test" if i < 100 else "dev" if i < 150 else "train"
    _, s = build(write_rows(tmp_path / "s.jsonl", rows, "jsonl"), n_val=None, n_test=None)
    assert (len(s.train), len(s.validation), len(s.test)) == (50, 32, 64)
    assert "32 validation (the data's validation rows)" in s.info["note"]


def test_evaluation_only_scores_every_row_or_the_named_test_rows(tmp_path):
    path = write_rows(tmp_path / "e.jsonl", pc_rows(5), "jsonl")
    _, s = build_task("sft", str(path), 0, None, None, None, TaskOptions(), evaluation_only=True)
    assert s.train == [] and [r["completion"] for r in s.test] == [f" {2 + i}" for i in range(5)]
    assert s.info["note"] == "e.jsonl: all 5 rows are test records"
    rows = pc_rows(5)
    rows[3]["split"] = "test"
    path = write_rows(tmp_path / "t.jsonl", rows, "jsonl")
    _, s = build_task("sft", str(path), 0, None, None, None, TaskOptions(), evaluation_only=True)
    assert [r["completion"] for r in s.test] == [" 5"]
    # with a size, the split molf train makes, without needing a training row
    _, s = build_task("sft", str(path), 0, None, None, 4, TaskOptions(), evaluation_only=True)
    assert len(s.test) == 1 and s.info["test_from"] == "split"


def test_split_options_choose_a_data_set_s_splits(tmp_path):
    import datasets

    dd = tmp_path / "chats"
    datasets.DatasetDict(
        {
            "train_sft": datasets.Dataset.from_list(pc_rows(8)),
            "test_sft": datasets.Dataset.from_list(pc_rows(11)[8:]),
            "train_gen": datasets.Dataset.from_list(text_rows(4)),
        }
    ).save_to_disk(str(dd))
    _, s = build(dd, n_val=None, n_test=None, train_split="train_sft", test_split="test_sft")
    assert (len(s.train), len(s.validation), len(s.test)) == (7, 1, 3)
    assert s.info["left_out_splits"] == ["train_gen"]
    assert s.info["note"].endswith("; splits left out: train_gen")
    assert all(r["id"].startswith("chats[test_sft] row ") for r in s.test)
    with pytest.raises(MolfError, match=r"chats: no split 'test' for test_split= \(splits: "):
        build(dd, train_split="train_sft", test_split="test")
    with pytest.raises(MolfError, match="named for both train_split= and test_split="):
        build(dd, train_split="train_sft", test_split="train_sft")
    # a --val-data file is validation data whatever the split options say
    val = write_rows(tmp_path / "val.jsonl", pc_rows(2), "jsonl")
    _, s = build(dd, n_val=None, n_test=None, train_split="train_sft", val_data=str(val))
    assert len(s.validation) == 2 and s.info["validation_from"] == "val_data"


def test_messages_name_the_file_s_own_line_or_row(tmp_path):
    """1-based, as an editor shows it: a JSON lines file's line (blank lines counted), a CSV
    file's row after the header, every other form's row."""
    good = json.dumps({"prompt": "q", "completion": "a"})
    (tmp_path / "b.jsonl").write_text(f"{good}\n\n{good}\n" + json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(MolfError, match="b.jsonl line 4: no 'completion' value"):
        build(tmp_path / "b.jsonl")
    bad = {"prompt": "q", "completion": ""}
    (tmp_path / "c.jsonl").write_text(f"{good}\n\n{good}\n" + json.dumps(bad) + "\n")
    with pytest.raises(MolfError, match="c.jsonl line 4: 'completion' is empty"):
        build(tmp_path / "c.jsonl")
    rows = pc_rows(4)
    rows[2]["completion"] = " "
    for kind, name, where in [
        ("csv", "c.csv", "row 3"),
        ("parquet", "c.parquet", "row 3"),
        ("json", "c.json", "row 3"),
    ]:
        with pytest.raises(MolfError, match=f"{name} {where}: 'completion' is empty"):
            build(write_rows(tmp_path / name, rows, kind))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"question": "q", "reply": "r"}],
            r"d.jsonl: no known columns \(found: question, reply\); expected 'messages'",
        ),
        (
            [{"prompt": "q", "answer": "r"}],
            r"a 'prompt' column but no 'completion' column \(columns found: prompt, answer\)",
        ),
        (
            [{"messages": chat(0)}, {"prompt": "q", "completion": "a"}],
            r"rows of mixed formats \(line 1 is chat, line 2 is prompt/completion\)",
        ),
        (
            [{"text": "a"}, {"messages": chat(1)}],
            r"rows of mixed formats \(line 1 is text, line 2 is chat\)",
        ),
        (
            [{"messages": chat(0), "text": "x"}],
            "every row fills both 'messages' and 'text'",
        ),
        (
            [{"messages": chat(0)}, {"messages": [SYSTEM, {"role": "user", "content": "hi"}]}],
            r"d.jsonl line 2: the conversation has no assistant turn \(roles: system, user\)",
        ),
        (
            [
                {
                    "messages": [
                        {"role": "assistant", "content": "hi"},
                        {"role": "user", "content": "x"},
                    ]
                }
            ],
            "d.jsonl line 1: the conversation starts with an assistant turn",
        ),
        (
            [{"messages": [{"from": "human", "value": "hi"}]}],
            r"d.jsonl line 1: message 0 has no 'role' \(keys found: from, value\)",
        ),
        ([{"messages": "not json"}], "d.jsonl line 1: messages are text but not a JSON list"),
        ([{"prompt": "q", "completion": 3}], "d.jsonl line 1: 'completion' must be text, got int"),
        ([{"prompt": "q", "completion": "  "}], "d.jsonl line 1: 'completion' is empty"),
        ([{"prompt": None, "completion": "a"}], "d.jsonl line 1: no 'prompt' value"),
        ([[1, 2]], "d.jsonl line 1: expected an object, got list"),
    ],
)
def test_bad_rows_are_one_line(tmp_path, rows, message):
    path = write_rows(tmp_path / "d.jsonl", rows, "jsonl")
    with pytest.raises(MolfError, match=message) as err:
        build(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name, content",
    [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "prompt,completion\n")],
)
def test_empty_files(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(MolfError, match=f"{name}: no rows \\(empty file\\)"):
        build(tmp_path / name)


def test_other_bad_requests(tmp_path):
    with pytest.raises(MolfError, match="task 'sft' needs a data path"):
        build_task("sft")
    with pytest.raises(MolfError, match="sft: file not found"):
        build(tmp_path / "missing.jsonl")
    texts = write_rows(tmp_path / "t.jsonl", text_rows(5), "jsonl")
    with pytest.raises(MolfError, match="generation_metric=contains needs a reference answer"):
        build(texts, generation_metric="contains")
    import datasets

    dd = tmp_path / "dd"
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(pc_rows(3))}).save_to_disk(
        str(dd)
    )
    with pytest.raises(
        MolfError,
        match=r"dd: split 'train_sft' is not train, validation or test \(splits: train_sft\); "
        "choose them with train_split=",
    ):
        build(dd)


STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# says how many turns follow before the first one: prefixes of a conversation differ from it
COUNTING_TEMPLATE = (
    "{{ messages | length }} turns\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_problems_name_the_row(tiny_hf, monkeypatch):
    _, tok = tiny_hf
    alternating = Example(messages=chat(0)[1:], origin="c.jsonl row 0")
    with_system = Example(messages=chat(1), origin="c.jsonl row 1")
    monkeypatch.setattr(tok, "chat_template", STRICT_TEMPLATE)
    assert tokens([alternating], tok).input_ids
    with pytest.raises(MolfError) as err:
        tokens([alternating, with_system], tok)
    assert str(err.value).startswith(
        "c.jsonl row 1: the chat template rejects this conversation "
        "(Conversation roles must alternate"
    )
    assert "\n" not in str(err.value)
    monkeypatch.setattr(tok, "chat_template", COUNTING_TEMPLATE)
    with pytest.raises(MolfError, match="c.jsonl row 1: the chat template does not render turn 2"):
        tokens([with_system], tok)
    monkeypatch.setattr(tok, "chat_template", None)
    with pytest.raises(MolfError, match="c.jsonl row 1: the tokenizer has no chat template"):
        tokens([with_system], tok)


def test_too_long_examples(tmp_path, tiny_hf):
    _, tok = tiny_hf
    long_chat = Example(messages=chat(0, follow_up=True), origin="c.jsonl row 3")
    full = tokens([long_chat], tok).input_ids[0]
    cut = tokenize_examples([long_chat], tok, len(full) - 5)
    assert cut.n_truncated == 1 and cut.input_ids[0] == full[: len(full) - 5]
    with pytest.raises(MolfError, match=f"c.jsonl row 3: {len(full)} tokens > max_length 20"):
        tokenize_examples([long_chat], tok, 20, too_long="refuse")
    pc = Example("word " * 40, " answer")
    t = tokenize_examples([pc], tok, 16)
    labels = t.labels[0]
    assert len(t.input_ids[0]) == 16 and t.n_truncated == 1
    # the whole completion (and EOS) survives; the prompt loses its beginning
    assert (
        tok.decode([i for i, y in zip(t.input_ids[0], labels) if y != IGNORE])
        == " answer<|im_end|>"
    )


# --------------------------------------------------------------------------- packing


def _token_loss_sum(model, batch) -> float:
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return float(
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum"
        )
    )


def test_packing_keeps_examples_apart(tiny_hf):
    model, tok = tiny_hf
    examples = [Example(messages=chat(i, follow_up=i % 2 == 0)) for i in range(5)]
    examples += [Example(f"Question {i}?", f" Answer {i}.") for i in range(4)]
    t = tokens(examples, tok)
    longest = max(len(x) for x in t.input_ids)
    packed = pack(t, 2 * longest)  # any two examples fit in a row
    assert len(packed.input_ids) < 9
    assert all(len(r) <= 2 * longest for r in packed.input_ids)
    # rows are the examples in order, each whole; positions restart at every example
    assert [i for r in packed.input_ids for i in r] == [i for r in t.input_ids for i in r]
    starts = [k for r in packed.position_ids for k, p in enumerate(r) if p == 0]
    assert len(starts) == 9
    for lab, pos in zip(packed.labels, packed.position_ids):
        assert all(lab[k] == IGNORE for k, p in enumerate(pos) if p == 0)
    model.eval()
    with torch.no_grad():
        together = _token_loss_sum(
            model, collate(packed.input_ids, packed.labels, tok.pad_token_id, packed.position_ids)
        )
        alone = sum(
            _token_loss_sum(model, collate([x], [y], tok.pad_token_id))
            for x, y in zip(t.input_ids, t.labels)
        )
        # and the logits themselves: the first packed row against its first two examples
        batch = collate(packed.input_ids, packed.labels, tok.pad_token_id, packed.position_ids)
        plain = collate(packed.input_ids, packed.labels, tok.pad_token_id)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
        mixed = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
        a, b = (len(x) for x in t.input_ids[:2])
        own = [model(input_ids=torch.tensor([x])).logits[0] for x in t.input_ids[:2]]
    assert together == pytest.approx(alone, rel=1e-5)
    assert torch.allclose(logits[0, :a], own[0], atol=1e-4)
    assert torch.allclose(logits[0, a : a + b], own[1], atol=1e-4)
    assert torch.isfinite(logits).all()  # padding rows attend to themselves: no NaN
    # without the mask and positions the second example sees the first one
    assert not torch.allclose(mixed[0, a : a + b], own[1], atol=1e-4)


def test_check_packable():
    check_packable(LlamaConfig(), 256)
    flash = LlamaConfig()
    flash._attn_implementation = "flash_attention_2"
    with pytest.raises(MolfError, match="packing=true needs the sdpa or eager attention"):
        check_packable(flash, 256)
    gemma = Gemma3TextConfig(
        num_hidden_layers=2,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
    )
    check_packable(gemma, 32)
    with pytest.raises(
        MolfError, match="sliding-window layers look back 32 tokens, fewer than max_length=64"
    ):
        check_packable(gemma, 64)


# --------------------------------------------------------------------------- evaluation


def test_evaluate_loss_is_the_training_loss(tmp_path, tiny_hf):
    model, tok = tiny_hf
    task, s = build(write_rows(tmp_path / "c.jsonl", chat_rows(10), "jsonl"), n_val=5, n_test=1)
    model.train()
    one = task.evaluate(model, tok, s.validation, batch_size=1)
    three = task.evaluate(model, tok, s.validation, batch_size=3)
    assert model.training  # mode restored, so it can run between training steps
    assert set(one) == {"loss", "perplexity"}
    assert one["loss"] == pytest.approx(three["loss"], rel=1e-5)
    assert one["perplexity"] == pytest.approx(math.exp(one["loss"]))
    # the same number by hand: token cross-entropy over the training labels
    examples = [Example(messages=r["messages"]) for r in s.validation]
    t = tokens(examples, tok)
    model.eval()
    with torch.no_grad():
        total = sum(
            _token_loss_sum(model, collate([x], [y], tok.pad_token_id))
            for x, y in zip(t.input_ids, t.labels)
        )
    count = sum(sum(1 for v in y[1:] if v != IGNORE) for y in t.labels)
    assert one["loss"] == pytest.approx(total / count, rel=1e-5)


def test_generation_metrics(tmp_path, tiny_hf, monkeypatch):
    model, tok = tiny_hf
    rows = [dict(r, split="test") for r in chat_rows(4) + [{"messages": chat(9)}]]
    rows += [dict(r, split="train") for r in chat_rows(3)]
    task, s = build(
        write_rows(tmp_path / "c.jsonl", rows, "jsonl"), 1, 5, generation_metric="exact_match"
    )
    assert len(s.test) == 5
    assert task.headline == "exact_match"
    seen = []

    def scripted(input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, eos_token_id):
        """Answer each prompt's last question, right for even items and wordy for odd ones."""
        out = []
        for row, mask in zip(input_ids, attention_mask):
            prompt = tok.decode(row[mask.bool()])
            seen.append(prompt)
            assert prompt.endswith("<|im_start|>assistant\n")
            question = prompt.split("<|im_start|>user\n")[-1]
            i = int(question.split("item ")[1].split("?")[0]) if "item" in question else -1
            reply = f"Item {i} is a thing." if i % 2 == 0 else f"Well: item {i} is a thing. Bye"
            if "colour" in question:
                reply = "no idea"
            new = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            out.append(torch.cat([row, torch.tensor(new + [pad_token_id] * 20)[:20]]))
        assert tok.eos_token_id in eos_token_id
        return torch.stack(out)

    monkeypatch.setattr(model, "generate", scripted)
    exact = task.evaluate(model, tok, s.test, batch_size=2)
    contains = get_task("sft", TaskOptions(generation_metric="contains")).evaluate(
        model, tok, s.test, batch_size=2
    )
    # items 0, 2, 4... answered exactly; odd items 1, 3 answered in a longer reply (follow-up
    # rows ask the colour last, answered wrongly); item 9 has no follow-up
    by_item = {0: (1, 1), 1: (0, 0), 2: (1, 1), 3: (0, 0), 9: (0, 1)}
    n = len(s.test)
    assert exact["exact_match"] == pytest.approx(sum(v[0] for v in by_item.values()) / n)
    assert contains["contains"] == pytest.approx(sum(v[1] for v in by_item.values()) / n)
    assert len(seen) == 2 * n and "Answer briefly." in seen[0]


# --------------------------------------------------------------------------- the example data and the CLI


def test_example_data_is_the_scripts_output(tmp_path):
    out = tmp_path / "capitals.jsonl"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_capitals_chat.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    assert out.read_bytes() == CAPITALS.read_bytes()
    rows = [json.loads(line) for line in CAPITALS.read_text().splitlines()]
    assert len(rows) >= 200
    assert any(len(r["messages"]) == 5 for r in rows)
    _, s = build(CAPITALS, n_val=8, n_test=8)
    assert s.info["format"] == "chat" and len(s.train) == len(rows) - 16


def test_train_on_own_chat_data_with_packing(tmp_path, capsys):
    from molf.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "lora",
            "--task",
            "sft",
            "--data",
            str(CAPITALS),
            "--model",
            "tiny-llama",
            "--output-dir",
            str(out),
            "n_train=24",
            "n_val=4",
            "n_test=4",
            "max_steps=2",
            "batch_size=2",
            "grad_accum=1",
            "lora_rank=4",
            "max_length=48",
            "packing=true",
            "progress=false",
            "generation_metric=contains",
            "max_new_tokens=4",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["headline_metric"] == "contains"
    assert set(summary["after"]) == {"loss", "perplexity", "contains"}
    assert summary["n_train_examples"] == 24 and summary["truncated_examples"] > 0
    assert f"{summary['truncated_examples']} of 24 training examples exceed max_length=48" in err
    assert "packed 24 training examples into" in err


def test_small_files_train_and_evaluate_with_default_splits(tmp_path, capsys, monkeypatch):
    """A 40-row file with no split settings: 32/4/4, said on the console; each file gets its own
    default output directory; `molf eval` reproduces the run's test split, and scores other data
    whole."""
    from molf.cli import main

    monkeypatch.chdir(tmp_path)
    rows = CAPITALS.read_text().splitlines()
    Path("small.jsonl").write_text("\n".join(rows[:40]) + "\n")
    Path("other.jsonl").write_text("\n".join(rows[40:60]) + "\n")
    fast = ["--model", "tiny-llama", "max_steps=1", "batch_size=4", "grad_accum=1"]
    fast += ["lora_rank=4", "max_length=48", "progress=false", "eval_before=false"]
    assert main(["train", "lora", "--task", "sft", "--data", "small.jsonl", *fast]) == 0
    out, err = capsys.readouterr()
    # the end-of-run summary names every file a user looks at next
    for line in (
        "  adapter: runs/sft-small-lora/final/adapter",
        "  metrics:     runs/sft-small-lora/metrics.jsonl",
        "  summary:     runs/sft-small-lora/summary.json",
    ):
        assert line in out.splitlines()
    assert "data: small.jsonl: 32 train, 4 validation (n_val unset: a tenth of 40 rows" in err
    summary = json.loads(Path("runs/sft-small-lora/summary.json").read_text())
    assert summary["n_test_records"] == 4 and summary["n_train_examples"] == 32
    assert main(["train", "lora", "--task", "sft", "--data", "other.jsonl", *fast]) == 0
    assert Path("runs/sft-other-lora/summary.json").is_file()
    capsys.readouterr()

    adapter = "runs/sft-small-lora/final/adapter"
    assert main(["eval", "--task", "sft", "--model", adapter, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["n_records"] == 4
    assert again["metrics"]["loss"] == pytest.approx(summary["after"]["loss"], rel=1e-5)
    assert main(["eval", "--task", "sft", "--model", adapter, "--data", "other.jsonl"]) == 0
    assert "(all 20 rows are test records)" in capsys.readouterr().out
    argv = ["eval", "--task", "sft", "--model", "tiny-llama", "--data", "small.jsonl"]
    assert main([*argv, "--n-test", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_records"] == 4
    assert main([*argv, "foo=1"]) == 2
    assert "'foo=1': expected a task option as key=value" in capsys.readouterr().err


def test_hub_id_whose_splits_have_other_names(monkeypatch, hub_online):
    """A hub data set with `train_sft` / `test_sft` splits (issue #21 item 10) is usable through
    the split options; without them its unusual split names are one clear error."""
    import datasets

    hub = {"train_sft": chat_rows(6), "test_sft": chat_rows(9)[6:], "train_gen": text_rows(2)}
    monkeypatch.setattr(datasets, "load_dataset", lambda spec: hub)
    with pytest.raises(MolfError, match="split 'train_sft' is not train, validation or test"):
        build("someone/chats")
    _, s = build(
        "someone/chats", n_val=1, n_test=None, train_split="train_sft", test_split="test_sft"
    )
    assert (len(s.train), len(s.validation), len(s.test)) == (5, 1, 3)
    assert all(r["id"].startswith("someone/chats[test_sft] row ") for r in s.test)
    assert s.info["left_out_splits"] == ["train_gen"]


def test_eval_on_a_file_takes_sizes_and_split_options(tmp_path, capsys):
    """`molf eval --task sft` on other data: every row by default, the split `molf train` would
    make with --n-val/--n-test, and a data set's test split named with test_split=."""
    import datasets

    from molf.cli import main

    path = write_rows(tmp_path / "e.jsonl", pc_rows(12), "jsonl")
    argv = ["eval", "--task", "sft", "--model", "tiny-llama", "--json", "--data"]

    def records(*extra):
        assert main([*argv, *extra]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)["n_records"]

    assert records(str(path)) == 12
    assert records(str(path), "--n-val", "2", "--n-test", "3") == 3
    dd = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train_sft": datasets.Dataset.from_list(pc_rows(8)),
            "test_sft": datasets.Dataset.from_list(pc_rows(13)[8:]),
        }
    ).save_to_disk(str(dd))
    assert records(str(dd), "test_split=test_sft") == 5
    assert main([*argv, str(dd), "test_split=nope"]) == 2
    assert "no split 'nope' for test_split=" in capsys.readouterr().err
