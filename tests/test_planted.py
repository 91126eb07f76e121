"""The planted task (`molf planted`, `--task planted`): the folder it writes, a teacher that agrees
with itself everywhere, routing scored against the ground truth, and misuse refused."""

from __future__ import annotations

import json

import pytest
import torch

from molf.cli import main
from molf.errors import MolfError
from molf.experiments.grid import task_spec
from molf.experiments.planted import make_planted, plant, read_truth, routing_accuracy
from molf.routing import RoutingLog
from molf.tasks import build_task
from molf.train.models import load_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted") / "mixed"
    # training continuations sampled (noisy labels), held-out ones greedy
    make_planted(
        "tiny-llama",
        out,
        "mixed",
        rank=2,
        strength=0.5,
        n_train=6,
        n_val=2,
        n_test=3,
        length=5,
        temperature=1.0,
    )
    return out


def test_the_folder_holds_the_splits_and_the_ground_truth(folder):
    spec = json.loads((folder / "planted.json").read_text())
    kinds = spec["modules"]
    assert {n.rsplit(".", 1)[-1] for n, k in kinds.items() if k == "full"} == {
        "q_proj",
        "gate_proj",
        "up_proj",
    }
    assert {n.rsplit(".", 1)[-1] for n, k in kinds.items() if k == "low"} == {
        "k_proj",
        "v_proj",
        "o_proj",
        "down_proj",
    }
    task, splits = build_task("planted", str(folder), n_train=4, n_val=None, n_test=None)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (4, 2, 3)
    assert all(len(r["target"]) == 5 for r in splits.test)
    assert splits.train[0].completion and task.headline == "agreement"
    assert task_spec(str(folder)) == ("mixed", "planted", str(folder))


def test_the_teacher_agrees_with_itself_and_the_floor_is_the_base_model(folder):
    """Rebuilding the teacher from planted.json gives agreement 1 on every test record (so the
    targets sit at the positions the score reads); the base model scores the recorded floor."""
    spec = read_truth(folder)
    assert spec == json.loads((folder / "planted.json").read_text())["modules"]
    info = json.loads((folder / "planted.json").read_text())
    base, tok = load_model("tiny-llama")
    task, splits = build_task("planted", str(folder), n_val=None, n_test=None)
    floor = task.evaluate(base, tok, splits.validation)["agreement"]
    assert floor == pytest.approx(info["floor_validation"])
    teacher, _ = load_model("tiny-llama")
    plant(teacher, tuple(info["full_types"]), tuple(info["low_types"]), 2, 0.5, 0)
    items: dict[str, float] = {}
    assert task.evaluate(teacher, tok, splits.test, items=items)["agreement"] == 1.0
    assert len(items) == 3 and set(items.values()) == {1.0}
    assert floor < 1.0


def test_a_low_rank_change_has_its_rank_and_both_kinds_their_size():
    model, _ = load_model("tiny-llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kinds = plant(model, ("q",), ("down",), 2, 0.25, 3)
    for name, kind in kinds.items():
        w = dict(model.named_parameters())[name + ".weight"].detach()
        delta = (w - before[name + ".weight"]).double()
        if kind == "none":
            assert delta.abs().max() == 0
            continue
        assert delta.norm() / before[name + ".weight"].double().norm() == pytest.approx(
            0.25, rel=1e-4
        )
        rank = torch.linalg.matrix_rank(delta, rtol=1e-5)
        assert rank == (2 if kind == "low" else min(delta.shape))


def test_routing_accuracy_counts_the_right_expert_per_kind():
    log = RoutingLog(["l.0.q_proj", "l.0.down_proj", "l.0.v_proj"], ["fft", "lora"])
    winners = torch.tensor([[True, False], [True, False], [False, True]])
    log.records.append(
        {
            "step": 1,
            "winners": winners,
            "scores": torch.ones(3, 2),
            "active": torch.tensor([True, True, True]),
        }
    )
    winners2 = torch.tensor([[True, False], [False, True], [True, False]])
    log.records.append(
        {
            "step": 2,
            "winners": winners2,
            "scores": torch.ones(3, 2),
            "active": torch.tensor([True, True, False]),
        }
    )
    acc = routing_accuracy(
        log, {"l.0.q_proj": "full", "l.0.down_proj": "low", "l.0.v_proj": "none"}
    )
    assert acc == {"full_to_fft": 1.0, "low_to_lora": 0.5, "accuracy": 0.75}
    assert routing_accuracy(log, {})["accuracy"] is None
    # a log without an FFT expert (LoRA alone, MoLF-E) is not scored
    lora_only = RoutingLog(["l.0.q_proj"], ["lora_r8"])
    lora_only.records.append(
        {
            "step": 1,
            "winners": torch.tensor([[True]]),
            "scores": torch.ones(1, 1),
            "active": torch.tensor([True]),
        }
    )
    assert routing_accuracy(lora_only, {"l.0.q_proj": "full"})["accuracy"] is None


def test_misuse_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(MolfError, match="needs a data path"):
        build_task("planted")
    with pytest.raises(MolfError, match="not a planted dataset folder"):
        build_task("planted", str(tmp_path))
    (tmp_path / "x").write_text("user file")
    assert main(["planted", "--model", "tiny-llama", "--output-dir", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x").read_text() == "user file"


def test_compare_and_the_sweep_score_routing_against_the_folder_s_truth(folder, tmp_path, capsys):
    """A planted folder is a --tasks entry: the comparison's report and the sweep's table score
    MoLF's routing against planted.json's ground truth."""
    out = tmp_path / "compare"
    argv = ["compare", "--budget", "smoke", "--tasks", str(folder), "--methods", "molf"]
    assert main([*argv, "--seeds", "1", "--jobs", "0", "--output-dir", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Against a planted task's ground truth" in report
    truth = report[report.index("Against a planted task's ground truth") :]
    row = next(line for line in truth.splitlines() if line.startswith("| mixed |"))
    # MoLF at rank 8 and alpha 32 routes every module to LoRA: no full-rank module is right
    assert row == "| mixed | 0.0% | 100.0% | 57.1% |"
    sweep = tmp_path / "sweep"
    argv = ["routing-sweep", "--budget", "smoke", "--tasks", str(folder), "--alphas", "8"]
    argv += ["--lr-ratios", "1", "--seeds", "0", "--jobs", "0", "--scores", "pfn"]
    assert main([*argv, "--no-first-step", "--output-dir", str(sweep)]) == 0
    md = (sweep / "sweep.md").read_text()
    assert "full->FFT" in md
    pfn = next(
        line for line in md.splitlines() if line.startswith("| mixed | molf-pfn-a8-r1 | 1 |")
    )
    assert pfn.split("|")[-4:-1] == [" 100% ", " 0% ", " 43% "]  # 3 of 7 types full-rank
    capsys.readouterr()


def test_training_from_another_model_than_the_teacher_s_is_refused(folder, tmp_path, capsys):
    args = ["train", "--method", "fft", "--task", "planted", "--data", str(folder)]
    args += ["--model", "tiny-qwen2", "--output-dir", str(tmp_path / "run"), "max_steps=1"]
    assert main(args) == 2
    assert (
        "made from tiny-llama; the student must start from the same model"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()
