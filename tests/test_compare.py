"""`molf compare`: the smoke grid end to end, and the report code on synthetic cells and logs."""

from __future__ import annotations

import csv
import json
import platform
import signal
from pathlib import Path

import pytest
import torch

import molf.experiments.runner
import molf.train.loop
from molf.cli import main
from molf.errors import MolfError
from molf.experiments.claims import claims, standard_error
from molf.experiments.grid import (
    BUDGETS,
    check_finished,
    choose,
    format_lr,
    load_results,
    parse_lr_grid,
    plan_grid,
    read_cell,
)
from molf.experiments.report import write_report
from molf.experiments.routing_stats import expert_share, layer_step_matrix, type_shares
from molf.experiments.runner import _collect
from molf.routing import RoutingLog
from molf.train import methods

METHODS = ["fft", "lora", "adalora", "molf", "molf-e"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _table_row(md: str, first_cell: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


# -- the smoke grid, end to end --------------------------------------------------------------------
def test_smoke_grid_end_to_end(tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid"
    tasks = ["fact-geo", "med-icd10"]  # spider-dev's 128-token generations cost most; see docs
    argv = ["compare", "--budget", "smoke", "--tasks", ",".join(tasks), "--output-dir", str(out)]
    argv += ["--methods", ",".join(METHODS)]  # the five of the paper's claims, to keep it short
    real_run = molf.train.loop.run

    def flaky_run(cfg, *args, **kwargs):
        if cfg.task == "med-icd10" and cfg.method == "adalora":
            raise RuntimeError("synthetic failure")
        return real_run(cfg, *args, **kwargs)

    # first invocation: one cell fails, the others still run and the report is written
    monkeypatch.setattr(molf.train.loop, "run", flaky_run)
    threads = torch.get_num_threads()
    assert main(argv) == 1
    assert torch.get_num_threads() == threads  # the smoke budget's 1 thread is undone
    failed = out / "cells" / "med-icd10" / "adalora" / "lr-1e-3"
    assert "RuntimeError: synthetic failure" in (failed / "FAILED").read_text()
    assert not (failed / "summary.json").exists()
    first_md = (out / "report.md").read_text()
    assert "med-icd10/adalora/lr-1e-3`: failed: RuntimeError: synthetic failure" in first_md
    assert _table_row((out / "results.md").read_text(), "AdaLoRA")[-1] == "failed"
    done = sorted(out.glob("cells/*/*/*/summary.json"))
    assert len(done) == 11  # 2 tasks x 5 methods + a second LoRA learning rate, minus the failure
    mtimes = {p: p.stat().st_mtime_ns for p in done}
    capsys.readouterr()

    # second invocation: finished cells are skipped, the failed one is retried
    monkeypatch.setattr(molf.train.loop, "run", real_run)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before, skipped") == 11
    assert "med-icd10/adalora/lr-1e-3: done in" in printed
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert not (failed / "FAILED").exists() and (failed / "summary.json").exists()

    # the tables hold each pair's numbers, with the learning rate chosen on validation
    results = {r["method"]: r for r in _csv_rows(out / "results.csv")}
    results_md = (out / "results.md").read_text()
    report = (out / "report.md").read_text()
    for method in METHODS:
        md_row = _table_row(results_md, methods.label(method))
        scores = []
        for i, task in enumerate(tasks):
            summaries = {
                p.parent.name: json.loads(p.read_text())
                for p in (out / "cells" / task / method).glob("*/summary.json")
            }
            headline = next(iter(summaries.values()))["headline_metric"]
            best_val = max(s["validation"][headline] for s in summaries.values())
            picked = [
                name
                for name, s in summaries.items()
                if s["validation"][headline] == best_val
                and pytest.approx(100 * s["after"][headline], abs=1e-3)
                == float(results[method][task])
            ]
            assert picked, f"{task}/{method}: reported score is not a validation-best candidate"
            lr_key = "lr_fft" if method == "fft" else "lr_lora"
            assert f"{lr_key}=" in results[method][f"lr_{task}"]
            assert md_row[1 + i] == f"{float(results[method][task]):.1f}"
            scores.append(float(results[method][task]))
        assert float(results[method]["mean"]) == pytest.approx(sum(scores) / len(scores), abs=1e-3)
    assert len(_table_row(results_md, "LoRA")[-1].split("(of 2)")) == 2  # 2 candidates compared
    cells = _csv_rows(out / "cells.csv")
    assert len(cells) == 12 and sum(int(c["chosen"]) for c in cells) == 10

    # the report: command, versions, claims computed from the numbers, plots that exist
    assert "--budget smoke" in report and f"torch {torch.__version__}" in report
    claims_md = report.split("## Paper claims")[1].split("## Routing")[0]
    for t in tasks:  # the floors table: each task's best method and whether it learned
        row = _table_row(claims_md, t)
        assert row[3] == f"{max(float(results[m][t]) for m in METHODS):.1f}"
    learned = []
    for t in tasks:  # learned = best at least 15 points past the floor, from the numbers shown
        row = _table_row(claims_md, t)
        floor, best = float(row[1].split()[-1]), float(row[3])
        assert row[4] == f"{best - floor:+.1f}"
        assert row[5] == ("yes" if best - floor >= 15 else "**no**")
        learned += [t] if row[5] == "yes" else []
    judged = "**Claim 1: " in report and "**Claim 2: " in report
    assert judged == bool(learned)
    assert ("neither claim is judged" in claims_md) == (not learned)
    for name in [
        "routing_molf_steps.png",
        "routing_molf_layers.png",
        "routing_molf_types.png",
        "routing_molf-e_steps.png",
        "routing_molf-e_layers.png",
        "routing_molf-e_types.png",
        "loss_curves.png",
        "efficiency.png",
    ]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in report
    # routing numbers in the report are those of the chosen MoLF cell's log
    log = RoutingLog.read_jsonl(out / "cells" / "fact-geo" / "molf" / "lr-1e-3" / "routing.jsonl")
    row = _table_row(report.split("### MoLF: FFT")[1], "fact-geo")
    assert row[2] == f"{100 * expert_share(log, 0):.1f}%"
    # model weights are kept only for the chosen candidate of each pair
    lora_dirs = [d for d in (out / "cells" / "fact-geo" / "lora").iterdir() if d.is_dir()]
    assert sum((d / "final").exists() for d in lora_dirs) == 1

    # versions: those of the invocations that trained cells, also in a later --report-only
    assert f"- versions (training): python {platform.python_version()}, molf " in report
    grid = json.loads((out / "grid.json").read_text())
    grid["invocations"][0]["versions"]["torch"] = "0.0-older"  # as if upgraded in between
    (out / "grid.json").write_text(json.dumps(grid))
    assert main([*argv, "--report-only"]) == 0
    rebuilt = (out / "report.md").read_text()
    assert rebuilt.count("- versions (training): ") == 2
    assert "torch 0.0-older" in rebuilt and f"torch {torch.__version__}" in rebuilt
    assert "report rebuilt from the cells on disk" in rebuilt
    assert "- invocations that trained cells: " in rebuilt  # the first run and the retry
    assert ": 1 cell, " in rebuilt and ", 1 thread each" in rebuilt


# -- planning --------------------------------------------------------------------------------------
def test_plan_small_budget_grids_and_fairness(tmp_path):
    cells = plan_grid("small", ["fact-geo", "med-icd10", "spider-dev"], METHODS, tmp_path)
    assert len(cells) == 30  # 10 learning-rate candidates per task
    by_pair: dict[tuple[str, str], list] = {}
    for c in cells:
        by_pair.setdefault((c.task, c.method), []).append(c)
    assert [c.lrs["lr_fft"] for c in by_pair[("fact-geo", "fft")]] == [1e-4, 5e-5]
    assert [c.lrs for c in by_pair[("fact-geo", "molf")]] == [
        {"lr_fft": 1e-4, "lr_lora": 1e-4},
        {"lr_fft": 5e-5, "lr_lora": 5e-5},
    ]
    assert [c.directory.name for c in by_pair[("med-icd10", "lora")]] == ["lr-5e-4", "lr-5e-5"]
    # AdaLoRA's grid sits a decade higher in the short budget (its E starts at zero)
    assert [c.lrs["lr_lora"] for c in by_pair[("spider-dev", "adalora")]] == [1e-2, 5e-3]
    for task in ("fact-geo", "med-icd10", "spider-dev"):
        same = {
            (c.config.n_train, c.config.n_val, c.config.n_test, c.config.epochs, c.config.seed)
            for c in cells
            if c.task == task
        }
        assert len(same) == 1  # every method: same data, steps and evaluation
        assert sum(c.config.eval_before for c in cells if c.task == task) == 1
    assert all(c.config.model == "smollm2-135m" for c in cells)
    assert cells[0].directory == tmp_path / "cells" / "fact-geo" / "fft" / "lr-1e-4"
    paper = plan_grid("paper", ["fact-geo"], ["fft", "molf"], tmp_path)
    assert paper[0].config.model == "google/gemma-3-1b-pt"
    assert [c.lrs["lr_fft"] for c in paper] == [1e-4, 5e-5, 2e-5, 5e-5]  # MoLF: 5e-5 only
    assert (paper[0].config.batch_size, paper[0].config.grad_accum) == (8, 4)
    assert paper[0].config.n_train is None
    paper_ada = plan_grid("paper", ["fact-geo"], ["adalora"], tmp_path)
    assert [c.lrs["lr_lora"] for c in paper_ada] == [5e-4, 5e-5]  # the paper's grid


def test_a_candidate_gives_each_learning_rate_key_its_own_value(tmp_path):
    """`--lr-grid molf=1e-4:5e-4` (and a tuple in `Method.lr_grids`): lr_fft and lr_lora of one
    candidate set apart, in a directory of their own; a candidate with the wrong number of
    values is refused naming the method's keys."""
    grid = "molf=1e-4/1e-4:5e-4"
    cells = plan_grid("small", ["fact-geo"], ["molf"], tmp_path, lr_grid=grid)
    assert [c.lrs for c in cells] == [
        {"lr_fft": 1e-4, "lr_lora": 1e-4},
        {"lr_fft": 1e-4, "lr_lora": 5e-4},
    ]
    assert [c.directory.name for c in cells] == ["lr-1e-4", "lr-fft1e-4-lora5e-4"]
    assert (cells[1].config.lr_fft, cells[1].config.lr_lora) == (1e-4, 5e-4)
    with pytest.raises(MolfError, match=r"lora has 1 learning rates \(lr_lora\)"):
        parse_lr_grid("lora=1e-4:5e-4", BUDGETS["small"])
    with pytest.raises(MolfError, match=r"molf has 2 learning rates \(lr_fft:lr_lora\)"):
        parse_lr_grid("molf=1e-4:5e-4:1e-3", BUDGETS["small"])
    with pytest.raises(MolfError, match="must be > 0"):
        parse_lr_grid("molf=1e-4:0", BUDGETS["small"])


def test_plan_overrides_and_errors(tmp_path):
    cells = plan_grid("small", ["fact-geo"], ["lora", "molf"], tmp_path, overrides=["lr_lora=1e-4"])
    assert [(c.method, c.lrs) for c in cells] == [
        ("lora", {"lr_lora": 1e-4}),
        ("molf", {"lr_fft": 1e-4, "lr_lora": 1e-4}),
    ]
    assert cells[1].directory.name == "lr-1e-4"
    cells = plan_grid("smoke", ["fact-geo"], ["lora"], tmp_path, overrides=["n_train=6"])
    assert all(c.config.n_train == 6 for c in cells) and len(cells) == 2
    assert len(plan_grid("small", ["fact-geo"], METHODS, tmp_path, lr_grid="off")) == 5
    assert parse_lr_grid("fft=1e-3/1e-3/2e-3", BUDGETS["small"])["fft"] == (1e-3, 2e-3)
    with pytest.raises(MolfError, match="n_val=0"):
        plan_grid("smoke", ["fact-geo"], ["lora"], tmp_path, overrides=["n_val=0"])
    with pytest.raises(MolfError, match="compare sets 'task'"):
        plan_grid("smoke", ["fact-geo"], ["lora"], tmp_path, overrides=["task=med-icd10"])
    with pytest.raises(MolfError, match="unknown method 'sgd'"):
        plan_grid("smoke", ["fact-geo"], ["lora"], tmp_path, lr_grid="sgd=1e-3")
    with pytest.raises(MolfError, match="unknown config key 'lr_lroa'"):
        plan_grid("smoke", ["fact-geo"], ["lora"], tmp_path, overrides=["lr_lroa=1e-3"])
    with pytest.raises(MolfError, match="unknown task"):
        plan_grid("smoke", ["nope"], ["lora"], tmp_path)
    # a finished cell run with another config is refused, naming the key
    cell = plan_grid("smoke", ["fact-geo"], ["fft"], tmp_path)[0]
    cell.directory.mkdir(parents=True)
    old = cell.config.to_dict() | {"n_train": 99}
    (cell.directory / "summary.json").write_text(json.dumps({"config": old}))
    with pytest.raises(MolfError, match="n_train: 99 there, 8 now"):
        check_finished([cell])
    assert main(["compare", "--budget", "smoke", "--output-dir", str(tmp_path), "x=1"]) == 2


def test_format_lr():
    assert [format_lr(v) for v in (5e-5, 1e-4, 2.5e-4, 1.0, 3e-10)] == [
        "5e-5",
        "1e-4",
        "2.5e-4",
        "1e0",
        "3e-10",
    ]


# -- the report on synthetic cells -----------------------------------------------------------------
TYPES = [("self_attn", t) for t in "qkvo"] + [("mlp", t) for t in ("gate", "up", "down")]


def _synthetic_log() -> RoutingLog:
    """2 layers x 7 types, 4 steps. FFT wins everything in layer 0, and q/k of layer 1 from step 3
    on; layer 1's down projection is inactive at step 1."""
    names = [f"model.layers.{li}.{blk}.{t}_proj" for li in (0, 1) for blk, t in TYPES]
    log = RoutingLog(names, ["fft", "lora_r8"])
    for step in (1, 2, 3, 4):
        winners = torch.zeros(len(names), 2, dtype=torch.bool)
        active = torch.ones(len(names), dtype=torch.bool)
        for i, name in enumerate(names):
            layer, kind = int(name.split(".")[2]), name.rsplit(".", 1)[1][:-5]
            fft = layer == 0 or (kind in ("q", "k") and step >= 3)
            winners[i, 0 if fft else 1] = True
            if name == "model.layers.1.mlp.down_proj" and step == 1:
                active[i] = False
        log.append(step, winners, torch.rand(len(names), 2), active)
    return log


def test_routing_shares_of_a_synthetic_log(tmp_path):
    log = _synthetic_log()
    log.write_jsonl(tmp_path / "routing.jsonl")
    log = RoutingLog.read_jsonl(tmp_path / "routing.jsonl")
    assert expert_share(log, 0) == pytest.approx((7 + 7 + 9 + 9) / (13 + 14 + 14 + 14))
    assert expert_share(log, 0, slice(0, 1)) == pytest.approx(7 / 13)
    assert expert_share(log, 1, slice(3, 4)) == pytest.approx(5 / 14)
    layers, steps, matrix = layer_step_matrix(log, 0)
    assert layers == [0, 1] and steps == [1, 2, 3, 4]
    assert matrix.flatten().tolist() == pytest.approx([1, 1, 1, 1, 0, 0, 2 / 7, 2 / 7])
    shares = type_shares(log, 0)
    assert list(shares) == ["q", "k", "v", "o", "gate", "up", "down"]
    assert shares == pytest.approx(
        {"q": 0.75, "k": 0.75, "v": 0.5, "o": 0.5, "gate": 0.5, "up": 0.5, "down": 4 / 7}
    )
    assert type_shares(log, 1)["down"] == pytest.approx(3 / 7)


def _fake_cell(root, task, method, label, lrs, headline, val, test, log=None, before=None):
    d = root / "cells" / task / method / label
    d.mkdir(parents=True)
    summary = {
        "method": method,
        "task": task,
        "headline_metric": headline,
        "before": {headline: before} if before is not None else {},
        "after": {headline: test, "other": 0.123},
        "validation": {headline: val},
        "steps": 4,
        "final_loss": 1.0,
        "tokens_per_s": 100.0 + len(method),
        "peak_memory_mb": 1000.0 + 10 * len(method),
        "wall_seconds": 5.0,
        "n_test_records": 64,
        "config": dict(lrs) | {"task": task},
    }
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 - 0.5 * s}) + "\n" for s in (1, 2, 3, 4))
    )
    if log is not None:
        log.write_jsonl(d / "routing.jsonl")
    return d


def test_report_on_synthetic_grid(tmp_path):
    tasks = ["fact-geo", "med-icd10"]
    heads = {"fact-geo": "efficacy_score", "med-icd10": "accuracy"}
    log = _synthetic_log()
    scores = {  # test scores; MoLF trails max(FFT, LoRA) by 1.0 on fact, 3.0 on med
        "fact-geo": {"fft": 0.60, "molf": 0.59, "adalora": 0.30, "molf-e": 0.50},
        "med-icd10": {"fft": 0.40, "lora": 0.50, "molf": 0.47, "adalora": 0.45, "molf-e": 0.46},
    }
    for task in tasks:
        for method, test in scores[task].items():
            key = {"lr_fft": 5e-5} if method == "fft" else {"lr_lora": 5e-5}
            routed = log if method in ("molf", "molf-e") else None
            _fake_cell(tmp_path, task, method, "lr-5e-5", key, heads[task], 0.5, test, routed, 0.1)
    # fact LoRA: the validation-best candidate has the worse test score; it must still be chosen
    _fake_cell(
        tmp_path, "fact-geo", "lora", "lr-5e-4", {"lr_lora": 5e-4}, heads["fact-geo"], 0.9, 0.55
    )
    _fake_cell(
        tmp_path, "fact-geo", "lora", "lr-5e-5", {"lr_lora": 5e-5}, heads["fact-geo"], 0.5, 0.80
    )
    failed = tmp_path / "cells" / "fact-geo" / "adalora" / "lr-5e-4"
    failed.mkdir(parents=True)
    (failed / "FAILED").write_text("RuntimeError: out of patience\n\ntraceback...")

    paths = write_report(
        tmp_path,
        tasks,
        METHODS,
        {"command": "molf compare --budget x", "model": "m", "budget": "x", "seed": 0},
    )
    res = load_results(tmp_path, tasks, METHODS)
    assert res.chosen[("fact-geo", "lora")].label == "lr-5e-4"
    assert res.score("fact-geo", "lora") == pytest.approx(55.0)
    assert res.chosen[("fact-geo", "adalora")].label == "lr-5e-5"
    c = claims(res)
    assert c.judged == tasks  # fact: base 10, best 60; med: chance 25, best 50
    assert {t: d.value for t, d in c.molf_gap.items()} == pytest.approx(
        {"fact-geo": -1.0, "med-icd10": -3.0}
    )
    assert {t: d.value for t, d in c.efficient_vs_adaptive.items()} == pytest.approx(
        {"fact-geo": 20.0, "med-icd10": 1.0}
    )
    assert c.claim1["verdict"] == "NOT HELD" and c.claim1["failed"] == ["med-icd10"]
    # MoLF-E leads AdaLoRA on both tasks, but AdaLoRA trails plain LoRA by 25 and 5 points:
    # no evidence there, so claim 2 is not judged
    assert c.claim2["weak_baseline"] == ["fact-geo", "med-icd10"]
    assert c.claim2["verdict"] == "NOT JUDGED" and not c.claim2["failed"]

    rows = {r["method"]: r for r in _csv_rows(paths["results_csv"])}
    assert float(rows["lora"]["fact-geo"]) == pytest.approx(55.0)
    assert rows["lora"]["lr_fact-geo"] == "lr_lora=0.0005"
    assert float(rows["molf"]["mean"]) == pytest.approx(53.0)
    assert float(rows["base"]["fact-geo"]) == pytest.approx(10.0)
    md = paths["report"].read_text()
    assert _table_row(md, "LoRA")[1:4] == ["55.0", "50.0", "52.5"]
    assert "5e-4 (of 2)" in _table_row(md, "LoRA")
    assert "**Claim 1: NOT HELD** (failed on med-icd10 (-3.0))." in md
    assert (
        "**Claim 2: NOT JUDGED** (AdaLoRA trails plain LoRA by more than the margin on "
        "fact-geo, med-icd10, so a lead over it is not evidence there)." in md
    )
    assert "`fact-geo/adalora/lr-5e-4`: failed: RuntimeError: out of patience" in md
    # the synthetic cells keep no per-item scores: the interval columns say n/a
    med_claim = _table_row(md.split("## Claim 1")[1], "med-icd10")
    assert med_claim[1:] == ["47.0", "LoRA 50.0", "-3.0", "n/a", "n/a", "n/a"]
    assert standard_error(50.0, 64) == pytest.approx(6.25)
    routing = md.split("### MoLF: FFT")[1].split("###")[0]
    assert _table_row(routing, "fact-geo") == [
        "fact-geo",
        "4",
        f"{100 * 32 / 55:.1f}%",
        f"{100 * 7 / 13:.1f}%",
        f"{100 * 9 / 14:.1f}%",
        "75.0%",
        "75.0%",
        "50.0%",
        "50.0%",
        "50.0%",
        "50.0%",
        f"{100 * 4 / 7:.1f}%",
    ]
    for key in ("routing_molf_steps", "routing_molf-e_layers", "loss_curves", "efficiency"):
        assert paths[key].read_bytes()[:8] == PNG_MAGIC

    # claim 1 with a missing cell is not judged rather than silently held
    for d in (tmp_path / "cells" / "med-icd10" / "fft").iterdir():
        (d / "summary.json").unlink()
    c = claims(load_results(tmp_path, tasks, METHODS))
    assert c.claim1["verdict"] == "NOT JUDGED" and c.claim1["missing"] == ["med-icd10"]


def test_the_routing_by_type_plot_shows_shares_of_zero(tmp_path, monkeypatch):
    """MoLF-E at top_k 1 can send 100% of updates to one expert: the plot of the other one's
    share must still show its 0% bars, not an empty frame."""
    from molf.experiments import plots

    figures = []
    save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: (figures.append(fig), save(fig, path))[1])
    shares = {"fact-geo": {"q": 0.0, "k": 0.0}, "med-icd10": {"q": 0.0, "k": 0.25}}
    path = plots.plot_type_shares(shares, "share routed to lora_r128", tmp_path / "types.png")
    assert path.is_file()
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.texts] == ["0%", "0%", "0%", "25%"]


def test_choose_uses_validation_then_training_loss(tmp_path):
    a = _fake_cell(tmp_path, "t", "lora", "lr-1e-3", {}, "acc", 0.5, 0.9)
    b = _fake_cell(tmp_path, "t", "lora", "lr-1e-4", {}, "acc", 0.5, 0.1)
    summary = json.loads((b / "summary.json").read_text()) | {"final_loss": 0.5}
    (b / "summary.json").write_text(json.dumps(summary))
    cells = [read_cell(d, "t", "lora") for d in (a, b)]
    assert choose(cells).directory == b  # tie on validation: lower training loss
    c = _fake_cell(tmp_path, "t", "lora", "lr-1e-5", {}, "acc", 0.6, 0.0)
    cells.append(read_cell(c, "t", "lora"))
    assert choose(cells).directory == c


def test_cells_in_subprocesses(tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["compare", "--budget", "smoke", "--tasks", "fact-geo", "--methods", "lora"]
    assert main([*argv, "--jobs", "2", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 at a time in subprocesses" in printed
    for label in ("lr-1e-3", "lr-1e-4"):
        d = out / "cells" / "fact-geo" / "lora" / label
        summary = json.loads((d / "summary.json").read_text())
        assert summary["config"]["lr_lora"] == float(label[3:])
        assert (d / "log.txt").exists() and not (d / "RUNNING").exists()
    assert "cells run 2 at a time, each in its own process" in (out / "report.md").read_text()

    # a cell process that dies without a result is recorded as failed, not lost
    cell = plan_grid("smoke", ["med-icd10"], ["fft"], out)[0]
    cell.directory.mkdir(parents=True)
    (cell.directory / "RUNNING").write_text("{}")
    outcome = _collect(cell, -9, 1.0)
    assert outcome.status == "failed" and "killed by signal 9" in outcome.error
    assert "killed by signal 9" in (cell.directory / "FAILED").read_text()
    assert not (cell.directory / "RUNNING").exists()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_cell_takes_sigint_even_when_the_grid_was_started_ignoring_it(tmp_path):
    # `nohup molf compare ... &` from a script starts the grid with SIGINT ignored, and an
    # ignored signal stays ignored through exec: the SIGINT that asks a cell to stop was lost
    # while the cell loaded its model, and the grid waited for it to finish (seen in a real grid)
    cell = plan_grid("smoke", ["fact-geo"], ["lora"], tmp_path)[0]
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = molf.experiments.runner._launch(cell, 1)
    finally:
        signal.signal(signal.SIGINT, old)
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        ignored = int(
            next(x for x in status.splitlines() if x.startswith("SigIgn:")).split()[1], 16
        )
        assert not ignored & (1 << (signal.SIGINT - 1)), "the cell process ignores SIGINT"
        proc.send_signal(signal.SIGINT)  # while it is still starting up
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (cell.directory / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) == old


class _FakeProc:
    """A cell process that finishes on its second poll with a given exit status; on success it
    leaves what a real cell leaves (summary.json, no RUNNING marker)."""

    def __init__(self, cell, code):
        self.cell, self.code, self.polls = cell, code, 0

    def poll(self):
        self.polls += 1
        if self.polls < 2:
            return None
        if self.code == 0:
            (self.cell.directory / "summary.json").write_text('{"headline_metric": "x"}')
            (self.cell.directory / "RUNNING").unlink()
        return self.code


def test_a_cell_killed_next_to_others_runs_again_alone(tmp_path, monkeypatch, capsys):
    cells = plan_grid("smoke", ["fact-geo"], ["fft", "lora", "molf"], tmp_path)  # 4 cells
    live: list[_FakeProc] = []
    launches: list[tuple[str, int]] = []  # (cell, other cells alive at its start)

    def launch(cell, threads):
        alive = [p for p in live if p.polls < 2]
        launches.append((cell.key, len(alive)))
        # the lora 1e-3 cell is OOM-killed whenever it shares the machine; the molf cell even
        # when alone
        code = 0
        if cell.method == "lora" and cell.directory.name == "lr-1e-3" and alive:
            code = -9
        if cell.method == "molf":
            code = -9
        proc = _FakeProc(cell, code)
        live.append(proc)
        cell.directory.mkdir(parents=True, exist_ok=True)
        (cell.directory / "RUNNING").write_text("{}")
        return proc

    monkeypatch.setattr(molf.experiments.runner, "_launch", launch)
    monkeypatch.setattr(molf.experiments.runner.time, "sleep", lambda s: None)
    outcomes = {}
    molf.experiments.runner.run_in_subprocesses(
        cells, 2, 1, False, lambda i: None, lambda i, o: outcomes.setdefault(cells[i].key, o)
    )
    printed = capsys.readouterr().out
    keys = [c.key for c in cells]
    lora_hi, molf_key = keys[1], keys[3]
    assert {k: o.status for k, o in outcomes.items()} == {
        keys[0]: "done",
        lora_hi: "done",  # killed next to the fft cell, then done alone
        keys[2]: "done",
        molf_key: "failed",  # killed next to another cell, then killed alone: a real failure
    }
    assert f"{lora_hi}: killed (SIGKILL, most likely out of memory)" in printed
    assert sorted(launches[4:]) == sorted([(lora_hi, 0), (molf_key, 0)])  # alone, after the others
    assert "killed by signal 9" in (cells[3].directory / "FAILED").read_text()
    assert not (cells[1].directory / "FAILED").exists()
    assert not any((c.directory / "RUNNING").exists() for c in cells)


def test_an_interrupted_grid_resumes_its_cell_from_the_checkpoint(tmp_path):
    """SIGTERM to `molf compare` while a cell trains in its own process: the cell writes a
    checkpoint and stops, and the next invocation of the same command resumes that cell from it
    (the reliability page's promise)."""
    import subprocess
    import sys
    import time

    from tests.runs import child_env

    out = tmp_path / "grid"
    cmd = [sys.executable, "-m", "molf.cli", "compare", "--budget", "smoke", "--tasks", "fact-geo"]
    cmd += ["--methods", "lora", "--lr-grid", "off", "--seeds", "1", "--jobs", "1"]
    cmd += ["--output-dir", str(out), "max_steps=40", "n_train=40"]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = out / "cells" / "fact-geo" / "lora" / "lr-1e-3" / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < 240 and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=240)
    cell = metrics.parent
    assert not (cell / "summary.json").exists()
    assert list((cell / "checkpoints").glob("step-*")), "no checkpoint after SIGTERM"
    again = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert (cell / "summary.json").exists()
    assert "resumed from" in (cell / "log.txt").read_text()
