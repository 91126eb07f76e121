"""The `fact` task: CounterFact loading, the embedded fact-geo source, splits and the ROME metrics."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from molf.errors import MolfError
from molf.tasks import TaskRequest, build_task, get_task
from molf.tasks.fact import TASK, fill, geo_records, validate_record
from tests.conftest import assert_splits_independent_of_hash_seed
from tests.fakes import VOCAB, FakeTokenizer, OracleLM

# --------------------------------------------------------------------------- fakes


class WordTokenizer(FakeTokenizer):
    """A whitespace tokenizer."""

    def __init__(self) -> None:
        super().__init__(r"\S+")


def softmax_p(logits: dict[str, float], word: str) -> float:
    """Probability of `word` under the oracle's distribution (other VOCAB entries at logit 0)."""
    z = sum(math.exp(v) for v in logits.values()) + (VOCAB - len(logits))
    return math.exp(logits.get(word, 0.0)) / z


def record(subject, true, new, prompt="The capital of {} is", para=(), neigh=(), case_id=0):
    return {
        "case_id": case_id,
        "pararel_idx": 1,
        "requested_rewrite": {
            "prompt": prompt,
            "relation_id": "P36",
            "target_new": {"str": new, "id": "Q1"},
            "target_true": {"str": true, "id": "Q2"},
            "subject": subject,
        },
        "paraphrase_prompts": list(para),
        "neighborhood_prompts": list(neigh),
        "attribute_prompts": [],
        "generation_prompts": [f"{subject} is known for"],
    }


# --------------------------------------------------------------------------- evaluator


def test_evaluate_known_scores():
    tok = WordTokenizer()
    lm = OracleLM(tok)
    recs = [
        record(
            "France",
            "Paris",
            "Lyon",
            para=["Para one France", "Para two France", "Para three France"],
            neigh=["N1 is"],
        ),
        record("Italy", "Rome", "Milan", para=["Para Italy"], neigh=["N2 is", "N4 is"]),
        record("India", "New Delhi", "New York", neigh=[]),
    ]
    strong_new = {"Lyon": 5.0, "Paris": 1.0}
    lm.prefer("The capital of France is", strong_new)
    lm.prefer("Para one France", {"Lyon": 2.0})
    lm.prefer("Para two France", {"Paris": 2.0})
    lm.prefer("Para three France", {"Lyon": 0.5})
    lm.prefer("N1 is", {"Paris": 3.0, "Lyon": 1.0})
    lm.prefer("The capital of Italy is", {"Rome": 4.0})
    lm.prefer("N2 is", {"Milan": 4.0})
    lm.prefer("N4 is", {"Rome": 4.0})
    # India: both targets start with "New"; the whole continuation decides
    lm.prefer("The capital of India is", {"New": 6.0})
    lm.prefer("The capital of India is New", {"York": 3.0, "Delhi": 1.0})
    lm.train()

    m = TASK.evaluate(lm, tok, recs, batch_size=2)
    assert lm.training  # the evaluator restores the mode it found

    p_new_india = softmax_p({"New": 6.0}, "New") * softmax_p({"York": 3.0, "Delhi": 1.0}, "York")
    p_true_india = softmax_p({"New": 6.0}, "New") * softmax_p({"York": 3.0, "Delhi": 1.0}, "Delhi")
    magnitudes = [
        softmax_p(strong_new, "Lyon") - softmax_p(strong_new, "Paris"),
        softmax_p({"Rome": 4.0}, "Milan") - softmax_p({"Rome": 4.0}, "Rome"),
        p_new_india - p_true_india,
    ]
    assert m["efficacy_score"] == pytest.approx(2 / 3)
    assert m["efficacy_magnitude"] == pytest.approx(sum(magnitudes) / 3, rel=1e-5)
    # France 2/3; Italy 0 (a tie is not a success); India has none
    assert m["paraphrase_score"] == pytest.approx(1 / 3)
    # France: N1 keeps Paris over Lyon (1); Italy: N2 now says Milan, N4 keeps Rome (1/2)
    assert m["neighborhood_score"] == pytest.approx(0.75)
    # greedy: "Lyon" (yes), "Rome" (no), "New York" (yes)
    assert m["generation_accuracy"] == pytest.approx(2 / 3)
    hm = 3 / (1 / (2 / 3) + 1 / (1 / 3) + 1 / 0.75)
    assert m["edit_score"] == pytest.approx(hm)

    # batching and padding must not change anything
    assert TASK.evaluate(lm, tok, recs, batch_size=1) == pytest.approx(m)
    # repeated prompts are scored once and shared; chunks of 8 * batch_size prompts are stitched
    assert TASK.evaluate(lm, tok, recs + recs[::-1], batch_size=1) == pytest.approx(m)


def test_evaluate_leaves_out_undefined_metrics_and_sets_pad():
    tok = WordTokenizer()
    tok.pad_token = None  # the evaluator must fall back to EOS for padding
    lm = OracleLM(tok)
    lm.prefer("The capital of Spain is", {"Sevilla": 1.0})
    m = TASK.evaluate(lm, tok, [record("Spain", "Madrid", "Sevilla")])
    assert tok.pad_token == "</s>"
    assert m["efficacy_score"] == 1.0
    assert m["generation_accuracy"] == 1.0
    assert "paraphrase_score" not in m and "neighborhood_score" not in m and "edit_score" not in m
    with pytest.raises(MolfError, match="no records"):
        TASK.evaluate(lm, tok, [])


def test_generation_needs_whole_word():
    tok = WordTokenizer()
    lm = OracleLM(tok)
    lm.prefer("The capital of Peru is", {"Limaville": 5.0})
    m = TASK.evaluate(lm, tok, [record("Peru", "Cusco", "Lima")])
    assert m["generation_accuracy"] == 0.0


# --------------------------------------------------------------------------- counterfact


def write_counterfact(path: Path, n: int = 12) -> list[dict]:
    recs = [
        record(
            f"Country{i}",
            f"True{i}",
            f"New{i}",
            para=[f"Noise text. Country{i} has capital", f"Country{i}'s capital city is"],
            neigh=[f"The capital of Other{i}a is", f"The capital of Other{i}b is"],
            case_id=100 + i,
        )
        for i in range(n)
    ]
    path.write_text(json.dumps(recs))
    return recs


def test_counterfact_splits(tmp_path):
    path = tmp_path / "counterfact.json"
    write_counterfact(path)
    s = TASK.build(TaskRequest("counterfact", str(path), seed=3, n_train=8, n_val=2, n_test=3))
    assert len(s.test) == 3 and len(s.validation) == 2
    assert len(s.train) == 8  # 5 injected held-out rewrites + 3 train-only edits
    prompts = {ex.prompt for ex in s.train}
    for r in s.test + s.validation:
        rw = r["requested_rewrite"]
        assert fill(rw["prompt"], rw["subject"]) in prompts
        for p in r["paraphrase_prompts"] + r["neighborhood_prompts"]:
            assert p not in prompts
        assert r["paraphrase_prompts"] and r["neighborhood_prompts"]
    for ex in s.train:
        subject = re.search(r"Country\d+", ex.prompt).group(0)
        assert ex.completion == " New" + subject[len("Country") :]
    test_ids = {r["case_id"] for r in s.test}
    assert test_ids.isdisjoint(r["case_id"] for r in s.validation)
    assert test_ids <= {100 + i for i in range(12)}
    assert s.test[0]["generation_prompts"]  # upstream fields pass through

    again = TASK.build(TaskRequest("counterfact", str(path), seed=3, n_train=8, n_val=2, n_test=3))
    assert again.test == s.test and again.train == s.train
    other = TASK.build(TaskRequest("counterfact", str(path), seed=4, n_train=8, n_val=2, n_test=3))
    assert [r["case_id"] for r in other.test] != [r["case_id"] for r in s.test]

    # held-out rewrites are injected even when n_train is smaller; None takes everything
    small = TASK.build(TaskRequest("counterfact", str(path), seed=3, n_train=1, n_val=2, n_test=3))
    assert len(small.train) == 5
    full = TASK.build(
        TaskRequest("counterfact", str(path), seed=3, n_train=None, n_val=2, n_test=3)
    )
    assert len(full.train) == 12


def test_counterfact_via_build_task(tmp_path):
    path = tmp_path / "cf.json"
    write_counterfact(path)
    task, s = build_task("fact", str(path), seed=0, n_train=None, n_val=1, n_test=2)
    assert task is get_task("counterfact") and task.headline == "efficacy_score"
    assert s.info["source"] == "counterfact" and len(s.test) == 2


def test_counterfact_drops_prompts_seen_in_training(tmp_path):
    recs = [
        record(
            "A",
            "Ta",
            "Na",
            para=["The capital of B is", "A's capital is"],
            neigh=["The capital of B is"],
        ),
        record("B", "Tb", "Nb", para=["B's capital is"], neigh=["The capital of C is"]),
    ]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    s = TASK.build(TaskRequest("counterfact", str(path), seed=0, n_train=None, n_val=0, n_test=2))
    a = next(r for r in s.test if r["requested_rewrite"]["subject"] == "A")
    assert a["paraphrase_prompts"] == ["A's capital is"]
    assert a["neighborhood_prompts"] == []
    assert s.info["dropped_heldout_prompts"] == 2


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["requested_rewrite"].pop("target_new"), "requested_rewrite.target_new"),
        (
            lambda r: r["requested_rewrite"]["target_true"].pop("str"),
            "requested_rewrite.target_true.str",
        ),
        (lambda r: r.pop("requested_rewrite"), "requested_rewrite.prompt"),
        (lambda r: r.pop("neighborhood_prompts"), "neighborhood_prompts"),
        (lambda r: r.update(paraphrase_prompts="oops"), "paraphrase_prompts"),
        (lambda r: r["requested_rewrite"].update(prompt="no slot"), "requested_rewrite.prompt"),
        (lambda r: r["requested_rewrite"].update(subject=""), "requested_rewrite.subject"),
    ],
)
def test_counterfact_bad_record(tmp_path, mutate, message):
    path = tmp_path / "counterfact.json"
    recs = write_counterfact(path, n=5)
    mutate(recs[3])
    path.write_text(json.dumps(recs))
    with pytest.raises(MolfError) as err:
        TASK.build(TaskRequest("counterfact", str(path), seed=0, n_train=None, n_val=1, n_test=1))
    assert "counterfact.json record 3" in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_counterfact_bad_files(tmp_path):
    with pytest.raises(MolfError, match="not found"):
        TASK.build(TaskRequest("counterfact", str(tmp_path / "missing.json"), 0, None, 1, 1))
    with pytest.raises(MolfError, match="needs a data path"):
        TASK.build(TaskRequest("counterfact", None, 0, None, 1, 1))
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(MolfError, match="bad.json: invalid JSON"):
        TASK.build(TaskRequest("counterfact", str(bad), 0, None, 1, 1))
    bad.write_text('{"a": 1}')
    with pytest.raises(MolfError, match="JSON list"):
        TASK.build(TaskRequest("counterfact", str(bad), 0, None, 1, 1))
    bad.write_text(json.dumps([record("X", "Same", "Same"), record("Y", "Same", " Same ")]))
    with pytest.raises(MolfError, match="no usable records"):
        TASK.build(TaskRequest("counterfact", str(bad), 0, None, 1, 1))
    with pytest.raises(MolfError, match="takes no data path"):
        TASK.build(TaskRequest("fact-geo", str(bad), 0, None, 1, 1))
    with pytest.raises(MolfError, match="unknown source"):
        TASK.build(TaskRequest("nope", None, 0, None, 1, 1))


# --------------------------------------------------------------------------- fact-geo


def test_fact_geo_pool_and_records():
    recs = geo_records(0)
    assert 2000 <= len(recs) <= 6000
    relations = {r["requested_rewrite"]["relation_id"] for r in recs}
    assert relations == {"P36", "P30", "P38", "P37", "P17"}
    edited = set()
    for i, r in enumerate(recs):
        validate_record(r, f"fact-geo record {i}")
        rw = r["requested_rewrite"]
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
        assert new.split()[0].lower() != true.split()[0].lower()
        assert len(r["paraphrase_prompts"]) == 3
        assert len(r["neighborhood_prompts"]) <= 10
        edited.add(fill(rw["prompt"], rw["subject"]))
    # neighbourhood prompts only ask about subjects that no record edits
    for r in recs:
        assert edited.isdisjoint(r["neighborhood_prompts"])
    assert sum(bool(r["neighborhood_prompts"]) for r in recs) > len(recs) // 2
    assert len({r["case_id"] for r in recs}) == len(recs)
    by_subject = {
        r["requested_rewrite"]["subject"]: r["requested_rewrite"]["target_true"]["str"]
        for r in recs
        if r["requested_rewrite"]["relation_id"] == "P36"
    }
    assert by_subject.get("France", "Paris") == "Paris"
    assert by_subject.get("Japan", "Tokyo") == "Tokyo"


def test_fact_geo_build_sizes_and_determinism():
    s = TASK.build(TaskRequest("fact-geo", None, seed=1, n_train=100, n_val=10, n_test=20))
    assert len(s.train) == 100 and len(s.validation) == 10 and len(s.test) == 20
    prompts = {ex.prompt for ex in s.train}
    completions = {ex.prompt: ex.completion for ex in s.train}
    for r in s.test + s.validation:
        rw = r["requested_rewrite"]
        assert completions[fill(rw["prompt"], rw["subject"])] == " " + rw["target_new"]["str"]
        assert prompts.isdisjoint(r["paraphrase_prompts"] + r["neighborhood_prompts"])
    assert TASK.build(TaskRequest("fact-geo", None, seed=1, n_train=100, n_val=10, n_test=20)) == s
    other = TASK.build(TaskRequest("fact-geo", None, seed=2, n_train=100, n_val=10, n_test=20))
    assert other.test != s.test
    # the test set is the same whatever the training and validation sizes
    assert (
        TASK.build(TaskRequest("fact-geo", None, seed=1, n_train=40, n_val=3, n_test=20)).test
        == s.test
    )
    task, default = build_task("fact", None, seed=1, n_train=100, n_val=10, n_test=20)
    assert default.info["source"] == "fact-geo" and default.test == s.test


def test_fact_geo_independent_of_hash_seed():
    assert_splits_independent_of_hash_seed("fact", "fact-geo")


# --------------------------------------------------------------------------- real tokenizer + tiny model


def test_evaluate_real_model_batching_invariant(tiny_hf):
    model, tok = tiny_hf
    recs = TASK.build(TaskRequest("fact-geo", None, seed=0, n_train=None, n_val=0, n_test=5)).test
    for r in recs:  # a few prompts of each kind keep this fast
        r["neighborhood_prompts"] = r["neighborhood_prompts"][:2]
        r["paraphrase_prompts"] = r["paraphrase_prompts"][:2]
    recs.append(record("India", "New Delhi", "New York", para=["India's capital is"]))
    a = TASK.evaluate(model, tok, recs, batch_size=1)
    b = TASK.evaluate(model, tok, recs, batch_size=5)
    assert set(a) >= {"efficacy_score", "efficacy_magnitude", "generation_accuracy"}
    assert a == pytest.approx(b, abs=1e-5)

    # reference efficacy from unpadded single forward passes
    def logprob(prompt: str, target: str) -> float:
        ids = tok(prompt)["input_ids"]
        cont = tok(" " + target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + cont])).logits[0].log_softmax(-1)
        return float(sum(logits[len(ids) - 1 + k, c] for k, c in enumerate(cont)))

    wins = 0
    for r in recs:
        rw = r["requested_rewrite"]
        prompt = fill(rw["prompt"], rw["subject"])
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
        first_new = tok(" " + new, add_special_tokens=False)["input_ids"][0]
        first_true = tok(" " + true, add_special_tokens=False)["input_ids"][0]
        if first_new != first_true:
            new, true = tok.decode([first_new]).strip(), tok.decode([first_true]).strip()
        wins += logprob(prompt, new) > logprob(prompt, true)
    assert a["efficacy_score"] == pytest.approx(wins / len(recs))
