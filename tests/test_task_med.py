"""The `med` task: MedMCQA loading, the embedded ICD-10-CM questions, splits and option scoring."""

from __future__ import annotations

import json
import re

import pytest
import torch

from molf.errors import MolfError
from molf.tasks import TaskRequest, build_task, get_task
from molf.tasks.common import _without_eos, option_logprobs
from molf.tasks.med import TASK, _argmax, format_prompt, to_example
from tests.conftest import assert_splits_independent_of_hash_seed
from tests.files import write_rows

# simple_icd_10_cm reads its data with a deprecated importlib.resources API
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated. Use files:DeprecationWarning")

# --------------------------------------------------------------------------- evaluator


def test_prompt_format():
    assert format_prompt(" Which  chapter?\n ") == "Question: Which chapter?\nAnswer:"
    example = to_example({"question": "Q?", "options": ["a", " b  c ", "d", "e"], "answer": 1})
    assert (example.prompt, example.completion) == ("Question: Q?\nAnswer:", " b c")


def _brute_force(model, tok, prompt, option):
    """Summed log-probability and length of `option` after `prompt`: one full forward pass."""
    head, cont = _without_eos(tok, prompt, option)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([head + cont])).logits[0].float(), -1)
    return sum(float(logp[len(head) - 1 + j, t]) for j, t in enumerate(cont)), len(cont)


def test_option_logprobs_match_full_sequences(tiny_hf):
    model, tok = tiny_hf
    prompts = ["Question: what?\nAnswer:", "A longer prompt, with more words in it:", "Q:"]
    options = [[" a b c", " dd", " something else"], [" yes", " no way at all"], [" x"]]
    for batch_size in (1, 2, 8):
        got = option_logprobs(model, tok, prompts, options, batch_size)
        for p, opts, scored in zip(prompts, options, got):
            assert len(scored) == len(opts)
            for o, (lp, n) in zip(opts, scored):
                ref, n_ref = _brute_force(model, tok, p, o)
                assert n == n_ref and lp == pytest.approx(ref, abs=1e-4)
    with pytest.raises(MolfError, match="tokenizes to nothing"):
        option_logprobs(model, tok, ["Q:"], [[""]])


def test_evaluate_is_the_argmax_of_mean_and_summed_logprobs(tiny_hf):
    model, tok = tiny_hf
    recs = TASK.build(TaskRequest("med-icd10", None, seed=0, n_train=1, n_val=0, n_test=9)).test
    model.train()
    items = {}
    m = TASK.evaluate(model, tok, recs, batch_size=4, items=items)
    assert model.training  # the mode is given back
    by_mean, by_sum = [], []
    for r in recs:
        scored = [
            _brute_force(model, tok, format_prompt(r["question"]), " " + o) for o in r["options"]
        ]
        by_mean.append(
            max(range(4), key=lambda k: (scored[k][0] / scored[k][1], -k)) == r["answer"]
        )
        by_sum.append(max(range(4), key=lambda k: (scored[k][0], -k)) == r["answer"])
    assert m["accuracy"] == pytest.approx(sum(by_mean) / len(recs))
    assert m["accuracy_sum"] == pytest.approx(sum(by_sum) / len(recs))
    assert [items[k] for k in sorted(items)] == [float(x) for x in by_mean]
    assert TASK.evaluate(model, tok, recs, batch_size=16) == pytest.approx(m)
    with pytest.raises(MolfError, match="no records"):
        TASK.evaluate(model, tok, [])


def test_argmax_ties_go_to_the_lower_index_and_nan_never_wins():
    assert _argmax([1.0, 3.0, 3.0]) == 1
    assert _argmax([float("nan"), -5.0, -7.0]) == 1
    assert _argmax([-1.0, float("nan")]) == 0


# --------------------------------------------------------------------------- medmcqa


def rows(n: int, base: int = 0) -> list[dict]:
    """MedMCQA rows in the upstream schema; the gold option text is always 'right<i>'."""
    out = []
    for i in range(n):
        gold = i % 4
        opts = [f"wrong{i}{k}" for k in range(4)]
        opts[gold] = f"right{i}"
        out.append(
            {
                "id": f"id-{i}",
                "question": f"What is item {i}?",
                "exp": "explanation",
                "cop": gold + base,
                "opa": opts[0],
                "opb": opts[1],
                "opc": opts[2],
                "opd": opts[3],
                "subject_name": "Anatomy",
                "topic_name": None,
                "choice_type": "single",
            }
        )
    return out


def check_gold(records: list[dict]) -> None:
    for r in records:
        assert r["options"][r["answer"]].startswith("right"), r


@pytest.mark.parametrize(
    ("name", "kind", "base"),
    [
        ("dev.json", "json", 0),
        ("train.json", "json-lines", 1),  # the upstream download: JSON lines named .json
        ("dev.jsonl", "jsonl", 1),
        ("dev.csv", "csv", 0),
        ("dev.parquet", "parquet", 1),
    ],
)
def test_medmcqa_files(tmp_path, name, kind, base):
    path = write_rows(tmp_path / name, rows(30, base), kind)
    s = TASK.build(TaskRequest("medmcqa", str(path), seed=0, n_train=10, n_val=5, n_test=8))
    assert len(s.train) == 10 and len(s.validation) == 5 and len(s.test) == 8
    assert s.info["cop_base"] == base
    check_gold(s.test + s.validation)
    for ex in s.train:
        i = int(re.search(r"item (\d+)", ex.prompt).group(1))
        assert ex.completion == f" right{i}"
        assert ex.prompt.endswith("\nAnswer:")
    held = {r["question"] for r in s.test + s.validation}
    assert held.isdisjoint(re.search(r"Question: (.*)\n", ex.prompt).group(1) for ex in s.train)
    assert s.test[0]["subject"] == "Anatomy"
    assert TASK.build(TaskRequest("medmcqa", str(path), seed=0, n_train=10, n_val=5, n_test=8)) == s
    task, same = build_task("med", str(path), seed=0, n_train=10, n_val=5, n_test=8)
    assert task is TASK and same == s


def test_medmcqa_letters_unlabelled_and_duplicates(tmp_path):
    data = rows(12, 1)
    data[0]["cop"] = "c"
    data[0]["opc"], data[0]["opa"] = data[0]["opa"], data[0]["opc"]
    data[5]["cop"] = -1  # unlabelled (MedMCQA's test split)
    dup = dict(data[3])  # the same question with its options reordered
    dup["opa"], dup["opb"], dup["opc"], dup["opd"] = (
        data[3]["opd"],
        data[3]["opc"],
        data[3]["opb"],
        data[3]["opa"],
    )
    dup["cop"] = 4 - (data[3]["cop"] - 1)
    data.append(dup)
    path = write_rows(tmp_path / "m.jsonl", data, "jsonl")
    s = TASK.build(TaskRequest("medmcqa", str(path), seed=1, n_train=None, n_val=2, n_test=3))
    assert len(s.train) + len(s.validation) + len(s.test) == 11
    check_gold(s.test + s.validation)
    assert "What is item 5?" not in json.dumps(s.test + s.validation) + str(s.train)
    prompts = [ex.prompt for ex in s.train] + [format_prompt(r["question"]) for r in s.test]
    assert sum("item 3?" in p for p in prompts) <= 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("opc"), "m.json record 2: missing field 'opc'"),
        (lambda r: r.pop("cop"), "m.json record 2: missing field 'cop'"),
        (lambda r: r.update(question=None), "m.json record 2: missing field 'question'"),
        (lambda r: r.update(cop=7), "m.json record 2: field 'cop'"),
        (lambda r: r.update(cop="maybe"), "m.json record 2: field 'cop'"),
    ],
)
def test_medmcqa_bad_record(tmp_path, mutate, message):
    data = rows(6)
    mutate(data[2])
    path = write_rows(tmp_path / "m.json", data, "json")
    with pytest.raises(MolfError) as err:
        TASK.build(TaskRequest("medmcqa", str(path), seed=0, n_train=None, n_val=1, n_test=1))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_medmcqa_bad_files(tmp_path):
    with pytest.raises(MolfError, match="not found"):
        TASK.build(TaskRequest("medmcqa", str(tmp_path / "nope.json"), 0, None, 1, 1))
    data = rows(8)
    data[1]["cop"] = 4
    with pytest.raises(MolfError, match="mixes 0-based"):
        TASK.build(
            TaskRequest(
                "medmcqa", str(write_rows(tmp_path / "mix.json", data, "json")), 0, None, 1, 1
            )
        )
    data = rows(4)
    for r in data:
        r["cop"] = -1
    with pytest.raises(MolfError, match="empty.json: no labelled"):
        TASK.build(
            TaskRequest(
                "medmcqa", str(write_rows(tmp_path / "empty.json", data, "json")), 0, None, 1, 1
            )
        )
    (tmp_path / "x.json").write_text('{"question": 1}')
    with pytest.raises(MolfError, match="x.json: expected a JSON list"):
        TASK.build(TaskRequest("medmcqa", str(tmp_path / "x.json"), 0, None, 1, 1))
    (tmp_path / "y.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(MolfError, match="y.jsonl line 2"):
        TASK.build(TaskRequest("medmcqa", str(tmp_path / "y.jsonl"), 0, None, 1, 1))
    (tmp_path / "z.txt").write_text("hi")
    with pytest.raises(MolfError, match="unsupported file type"):
        TASK.build(TaskRequest("medmcqa", str(tmp_path / "z.txt"), 0, None, 1, 1))
    with pytest.raises(MolfError, match="takes no data path"):
        TASK.build(TaskRequest("med-icd10", str(tmp_path / "z.txt"), 0, None, 1, 1))


def test_medmcqa_hub_offline_is_one_line(monkeypatch, hub_online):
    import datasets

    def fail(name, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(MolfError) as err:
        build_task("medmcqa", "someone/medmcqa", seed=0)
    text = str(err.value)
    assert "'someone/medmcqa'" in text and "\n" not in text
    with pytest.raises(MolfError, match="openlifescienceai/medmcqa"):
        TASK.build(TaskRequest("medmcqa", None, 0, None, 1, 1))


def test_medmcqa_hub_splits(monkeypatch, hub_online):
    import datasets

    train, validation, test = rows(20), rows(40)[20:], rows(5)
    for r in test:
        r["cop"] = -1
    train.append(dict(validation[0]))  # upstream train repeats some validation questions
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda name: {"train": train, "validation": validation, "test": test},
    )
    s = TASK.build(
        TaskRequest(
            "medmcqa", "openlifescienceai/medmcqa", seed=0, n_train=None, n_val=4, n_test=16
        )
    )
    held = {r["question"] for r in s.test + s.validation}
    assert held <= {r["question"] for r in validation}
    assert len(s.train) == 20
    assert all(q not in ex.prompt for q in held for ex in s.train)
    check_gold(s.test + s.validation)


# --------------------------------------------------------------------------- med-icd10


def _description(question: str) -> str:
    return re.search(r'"(.*)"', question).group(1)


def test_icd10_build_correct_balanced_and_leak_free():
    import simple_icd_10_cm as cm

    s = TASK.build(TaskRequest("med-icd10", None, seed=0, n_train=None, n_val=40, n_test=100))
    assert s.info["diagnoses"] >= 3000
    assert len(s.test) == 100 and len(s.validation) == 40
    assert len(s.train) == s.info["diagnoses"] - 140  # every diagnosis yields a question
    counts = [sum(r["answer"] == k for r in s.test) for k in range(4)]
    assert max(counts) - min(counts) <= 1
    assert {r["kind"] for r in s.test} == {"chapter", "block", "category"}

    def strip(d: str) -> str:
        return re.sub(r"\s*\([A-Z0-9.]+-[A-Z0-9.]+\)$", "", d)

    for r in s.test + s.validation:
        assert len(r["options"]) == 4 and len({o.lower() for o in r["options"]}) == 4
        code, gold = r["code"], r["options"][r["answer"]]
        assert _description(r["question"]) == cm.get_description(code)
        ancestors = cm.get_ancestors(code)
        if r["kind"] == "chapter":
            assert gold == strip(cm.get_description(ancestors[-1]))
        elif r["kind"] == "block":
            blocks = [strip(cm.get_description(a)) for a in ancestors if "-" in a]
            assert gold == blocks[0]
            assert not set(blocks) & (set(r["options"]) - {gold})
        else:
            assert gold == cm.get_description(code.split(".")[0])

    train_diagnoses = {
        _description(re.search(r"Question: (.*)\n", ex.prompt).group(1)) for ex in s.train
    }
    held = [_description(r["question"]) for r in s.test + s.validation]
    assert len(set(held)) == len(held)
    assert train_diagnoses.isdisjoint(held)
    gold = {" " + cm.get_description(c) for c in cm.get_all_codes(True)} | {
        " " + strip(cm.get_description(c)) for c in cm.get_all_codes(True)
    }
    assert all(ex.completion in gold for ex in s.train)


def test_icd10_sizes_and_determinism():
    a = TASK.build(TaskRequest("med-icd10", None, seed=3, n_train=50, n_val=5, n_test=10))
    assert len(a.train) == 50 and len(a.validation) == 5 and len(a.test) == 10
    assert TASK.build(TaskRequest("med-icd10", None, seed=3, n_train=50, n_val=5, n_test=10)) == a
    b = TASK.build(TaskRequest("med-icd10", None, seed=4, n_train=50, n_val=5, n_test=10))
    assert b.test != a.test
    # the test set is the same whatever the training and validation sizes
    assert (
        TASK.build(TaskRequest("med-icd10", None, seed=3, n_train=None, n_val=9, n_test=10)).test
        == a.test
    )
    task, c = build_task("med", None, seed=3, n_train=50, n_val=5, n_test=10)
    assert task is get_task("med-icd10") and task.headline == "accuracy"
    assert c.test == a.test


def test_icd10_independent_of_hash_seed():
    assert_splits_independent_of_hash_seed("med", "med-icd10")
