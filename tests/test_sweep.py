"""`molf routing-sweep` (issue #20): the cells it plans, the report it writes, and the first-step
derivation of docs/method.md section 8 checked against the optimizer's own step-1 scores."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

import molf
from molf.cli import main
from molf.experiments.first_step import GAUSS, predicted_ratios
from molf.experiments.grid import BUDGETS
from molf.experiments.sweep import plan_sweep, sweep_points

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plan_moves_only_alpha_and_the_learning_rate_ratio(tmp_path):
    cells = plan_sweep(["fact-geo"], tmp_path, (8.0, 32.0), (1.0, 5.0), (0, 1), budget="small")
    assert len(cells) == 2 * (2 + 2 * 2 + 2)  # seeds x (FFT, LoRA, MoLF 2x2, MoLF-E 2)
    by = {(c.method, c.config.seed): c.config for c in cells}
    a8r5 = by[("molf-a8-r5", 1)]
    assert (a8r5.lora_alpha, a8r5.lr_fft, a8r5.lr_lora) == (8.0, 1e-4, 5e-4)
    assert a8r5.method == "molf" and a8r5.data_seed == 0  # every seed answers seed 0's split
    small = BUDGETS["small"]
    assert a8r5.n_test == small.per_task["fact"]["n_test"] and a8r5.lora_rank == 128
    # MoLF-E at the reference's equal alpha, and with both experts at the rank-32 scale
    equal = by[("molf-e-equal-scale", 0)]
    scales = [a / math.sqrt(r) for a, r in zip(equal.molf_e_alphas, equal.molf_e_ranks)]
    assert scales == pytest.approx([32 / math.sqrt(32)] * 2)
    assert by[("molf-e-equal-alpha", 0)].molf_e_alphas is None
    assert {c.directory.parent.name for c in cells} >= {"fft", "lora", "molf-a32-r1"}
    # an override wins over the budget's settings (a rank or split size of the user's)
    mine = plan_sweep(
        ["fact-geo"], tmp_path, (8.0,), (1.0,), (0,), "small", None, ["lora_rank=8", "n_test=5"]
    )
    assert {(c.config.lora_rank, c.config.n_test) for c in mine} == {(8, 5)}
    names = [p.variant for p in sweep_points((8.0,), (1.0,))]
    assert names == ["fft", "lora", "molf-a8-r1", "molf-e-equal-alpha", "molf-e-equal-scale"]


def test_first_step_formula_predicts_the_optimizers_scores():
    """One step of MoLFAdamW on a random model: the EPD ratio LoRA / FFT of each module is what
    the derivation predicts from the module's FFT gradient (within the random-projection
    approximation), and it scales exactly with alpha and the learning-rate ratio."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(256, 96), torch.nn.Linear(96, 512))
    x = torch.randn(64, 256)

    def step_ratios(alpha: float, lr_ratio: float) -> tuple[list[float], dict[str, tuple]]:
        torch.manual_seed(1)
        model = molf.wrap(
            torch.nn.Sequential(*[torch.nn.Linear(m.in_features, m.out_features) for m in layers]),
            molf.MoLFConfig(lora_ranks=(32,), lora_alphas=(alpha,), lora_dropout=0.0),
        )
        for wrapped, plain in zip(model, layers):
            wrapped.weight.data.copy_(plain.weight.data)
            wrapped.bias.data.copy_(plain.bias.data)
        opt = molf.MoLFAdamW(model, lr_fft=1e-3, lr_lora=1e-3 * lr_ratio)
        model(x).pow(2).mean().backward()
        kappas = {}
        for name, m in zip(("0", "1"), model):
            g = m.weight.grad.double()
            row = float(g.norm(dim=1).mean()) / math.sqrt(g.shape[1])
            # the bias is part of the FFT expert: weigh it in as the optimizer does
            n_w, n_b = g.numel(), m.bias.numel()
            mean_abs = (float(g.abs().sum()) + float(m.bias.grad.abs().sum())) / (n_w + n_b)
            kappas[name] = (row / mean_abs, g.shape[1], g.shape[0])
        opt.step()
        scores = opt.routing_log.records[0]["scores"]
        return (scores[:, 1] / scores[:, 0]).tolist(), kappas

    measured, kappas = step_ratios(32.0, 1.0)
    predicted = predicted_ratios(kappas, 32.0 / math.sqrt(32), 1.0)
    for got, want in zip(measured, predicted.values()):
        assert got == pytest.approx(want, rel=0.15)
    # exact proportionality in s and in the learning-rate ratio
    doubled, _ = step_ratios(64.0, 1.0)
    fivefold, _ = step_ratios(32.0, 5.0)
    # (up to the score's eps, which is not scaled with the gradient)
    assert doubled == pytest.approx([2 * r for r in measured], rel=2e-3)
    assert fivefold == pytest.approx([5 * r for r in measured], rel=2e-3)
    assert GAUSS == pytest.approx(math.sqrt(2 / math.pi / 3))


def test_smoke_sweep_end_to_end_and_resumable(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["routing-sweep", "--budget", "smoke", "--tasks", "fact-geo", "--alphas", "8,64"]
    argv += ["--lr-ratios", "1", "--seeds", "0", "--jobs", "0", "--output-dir", str(out)]
    argv += ["--scores", "epd,pfn"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "8 of 8 cells finished" in printed
    md = (out / "sweep.md").read_text()
    assert "## Mean over seeds" in md and "## First step: the derivation" in md
    with (out / "sweep.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"fft", "lora", "molf-a8-r1", "molf-a64-r1"} | {
        "molf-e-equal-alpha",
        "molf-e-equal-scale",
        "molf-pfn-a8-r1",
        "molf-pfn-a64-r1",
    }
    # PFN routes the first step to FFT at both alphas, as its derivation says
    for alpha in ("8", "64"):
        assert float(rows[f"molf-pfn-a{alpha}-r1"]["share_step1"]) == 1.0
        assert rows[f"molf-pfn-a{alpha}-r1"]["score"] == "pfn"
    assert "| PFN | 64 | 1 | 100% | 100% |" in (out / "first_step.md").read_text()
    # a larger alpha never routes more to FFT, and at 64 the LoRA expert takes everything
    assert float(rows["molf-a8-r1"]["share"]) >= float(rows["molf-a64-r1"]["share"])
    assert float(rows["molf-a64-r1"]["ratio_step1"]) > float(rows["molf-a8-r1"]["ratio_step1"])
    assert rows["fft"]["share"] == ""  # no routing for the references
    for png in ("sweep_alpha.png", "sweep_types.png", "sweep_molf_e.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert "Measured / predicted over every module" in (out / "first_step.md").read_text()
    # a second invocation trains nothing
    assert main(argv) == 0
    assert "running" not in capsys.readouterr().out


def test_refuses_bad_lists_and_foreign_directories(tmp_path, capsys):
    base = ["routing-sweep", "--budget", "smoke", "--tasks", "fact-geo"]
    assert main([*base, "--alphas", "8,x", "--output-dir", str(tmp_path / "a")]) == 2
    assert "--alphas" in capsys.readouterr().err
    assert main([*base, "--lr-ratios", "0", "--output-dir", str(tmp_path / "b")]) == 2
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main([*base, "--output-dir", str(mine)]) == 2
    assert "not a routing-sweep directory" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "mine"


def test_predict_trains_nothing_and_orders_the_shares_by_alpha(tmp_path, capsys):
    out = tmp_path / "predict"
    own = Path(__file__).resolve().parents[1] / "examples" / "data" / "capitals_chat.jsonl"
    argv = ["routing-sweep", "--budget", "smoke", "--tasks", f"fact-geo,{own}"]
    argv += ["--alphas", "1,8,512", "--lr-ratios", "1", "--seeds", "0", "--predict"]
    argv += ["--output-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "predict.md" in printed.out
    assert "predict: 100%" in printed.err and "2/2" in printed.err  # a progress bar over tasks
    assert not (out / "cells").exists()  # nothing trained
    lines = (out / "predict.md").read_text().splitlines()
    header = [c.strip() for c in next(x for x in lines if x.startswith("| task")).split("|")]
    row = [c.strip() for c in next(x for x in lines if x.startswith("| fact-geo")).split("|")]
    shares = [float(row[header.index(f"a{a} r1")].rstrip("%")) for a in (1, 8, 512)]
    # the LoRA expert's score grows with its scale: the FFT share can only fall as alpha grows,
    # and at the extremes one expert takes every module
    assert shares[0] >= shares[1] >= shares[2]
    assert shares[0] == 100 and shares[2] == 0
    assert float(row[header.index("q kappa")]) > 0
    # a data file is the sft task on it, labelled by its stem, as in molf compare
    assert any(x.startswith("| capitals_chat |") for x in lines)
    # the same command again rewrites its own predict.md
    assert main(argv) == 0
    assert (out / "predict.md").read_text().splitlines() == lines
