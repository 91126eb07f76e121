"""The method registry: a method registered in one place is a method everywhere (config, CLI,
training loop, checkpoints, compare planning, report), and no other module checks method names."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import molf
from molf.cli import build_parser, main
from molf.errors import MolfError
from molf.experiments.grid import plan_grid
from molf.train import methods
from molf.train.config import load_config
from molf.train.methods import Method
from tests.runs import tiny_run

SRC = Path(__file__).resolve().parents[1] / "src" / "molf"
SETTINGS = dict(
    n_train=8,
    n_val=0,
    n_test=2,
    max_steps=2,
    batch_size=2,
    grad_accum=1,
    max_length=64,
    lr_fft="1e-3",
    lr_lora="1e-3",
    save_every=1,
)


def _train_norms(model: torch.nn.Module, cfg, total_steps: int) -> torch.nn.Module:
    """Only the normalisation weights train (the 1-d tensors), everything else is frozen."""
    for p in model.parameters():
        p.requires_grad_(p.dim() == 1)
    return model


def _three_ranks(model: torch.nn.Module, cfg, total_steps: int) -> torch.nn.Module:
    config = molf.MoLFConfig(lora_ranks=(2, 4, 8), train_base=False, lora_dropout=0.0)
    return molf.wrap(model, config)


def _molf_adamw(model: torch.nn.Module, cfg) -> molf.MoLFAdamW:
    return molf.MoLFAdamW(model, lr_lora=cfg.lr_lora, top_k=cfg.top_k)


NORMS = Method(
    name="norms",
    label="Norms only",
    lr_keys=("lr_fft",),
    build_model=_train_norms,
    build_optimizer=lambda model, cfg: torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr_fft
    ),
    merge=lambda model: model,
    lr_grids={"smoke": (1e-2, 1e-3)},
)
THREE = Method(
    name="three-ranks",
    label="Three ranks",
    lr_keys=("lr_lora",),
    build_model=_three_ranks,
    build_optimizer=_molf_adamw,
    merge=molf.merge_and_unload,
    n_experts=lambda cfg: 3,
    routing="between three ranks",
)


@pytest.fixture
def registered(monkeypatch):
    """NORMS and THREE registered for this test only."""
    monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))
    methods.register(NORMS)
    methods.register(THREE)


def test_a_registered_method_is_accepted_everywhere(registered, tmp_path, capsys):
    # config validation, with the method's own expert count bounding top_k
    assert load_config(None, [], method="norms").method == "norms"
    assert load_config(None, ["top_k=3"], method="three-ranks").top_k == 3
    with pytest.raises(
        MolfError, match=r"top_k.: must be between 1 and the number of experts \(3\)"
    ):
        load_config(None, ["top_k=4"], method="three-ranks")
    # the CLI's choices
    args = build_parser().parse_args(["train", "--method", "norms"])
    assert args.method == "norms"
    assert build_parser().parse_args(["compare"]).methods.endswith("norms,three-ranks")
    # compare planning: the method's keys and learning-rate grid
    cells = plan_grid("smoke", ["fact-geo"], ["norms", "three-ranks"], tmp_path / "grid")
    assert [(c.method, c.lrs) for c in cells] == [
        ("norms", {"lr_fft": 1e-2}),
        ("norms", {"lr_fft": 1e-3}),
        ("three-ranks", {"lr_lora": 5e-5}),  # no smoke grid: the config default
    ]
    assert methods.label("norms") == "Norms only"
    # the training loop, its checkpoints and its final artefacts
    for name in ("norms", "three-ranks"):
        out = tmp_path / name
        top_k = {"top_k": 2} if name == "three-ranks" else {}
        argv = ["train", *tiny_run(name, **SETTINGS, **top_k), "--output-dir", str(out)]
        assert main(argv) == 0, capsys.readouterr()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["method"] == name and summary["steps"] == 2
        assert (out / "final" / "model" / "model.safetensors").exists()
        assert not (out / "final" / "adapter").exists()
    routing = json.loads((tmp_path / "three-ranks" / "summary.json").read_text())["routing"]
    assert set(routing["overall"]) == {"lora_r2", "lora_r4", "lora_r8"}


def test_an_unknown_method_is_refused_by_name():
    with pytest.raises(MolfError, match="config key 'method': must be one of fft, lora"):
        load_config(None, [], method="qlora")
    with pytest.raises(MolfError, match="unknown method 'qlora'"):
        methods.get("qlora")
    with pytest.raises(ValueError, match="registered already"):
        methods.register(methods.get("lora"))
    # a per-key learning-rate candidate needs one value per key of lr_keys
    with pytest.raises(ValueError, match=r"needs one value per key of \('lr_fft',\)"):
        dataclasses.replace(NORMS, lr_grids={"smoke": ((1e-2, 1e-3),)})


def test_every_method_has_its_bundled_config_and_grids():
    from molf.experiments.grid import BUDGETS
    from molf.train.config import bundled_configs

    for name, method in methods.REGISTRY.items():
        assert name in bundled_configs(), f"configs/{name}.yaml is missing"
        assert load_config(name).method == name
        assert set(method.lr_grids) == set(BUDGETS), name
        assert method.lr_keys and all(hasattr(load_config(name), k) for k in method.lr_keys)


def test_no_module_but_the_registry_branches_on_a_method_name():
    """What differs between methods lives in molf.train.methods; a comparison of a method with a
    name literal anywhere else is a place a new method would have to be added too."""
    branch = re.compile(r"""method\s*(==|!=|in)\s*[("'\[]""")
    for path in SRC.rglob("*.py"):
        if path.name == "methods.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not branch.search(line), f"{path.relative_to(SRC)}:{n}: {line.strip()}"


def test_a_methods_own_state_survives_a_checkpoint(tmp_path):
    """AdaLoRA's rank allocator keeps importance scores outside the model and optimizer: the
    method's save_state/load_state carry them through a checkpoint."""
    from molf.train.checkpoint import load_checkpoint, save_checkpoint
    from molf.train.loop import train_loop
    from molf.train.prepare import prepare
    from molf.train.progress import MetricLogger

    def setup(out):
        args = tiny_run("adalora", **(SETTINGS | {"max_steps": 3, "lora_rank": 4}))
        overrides = [a for a in args if "=" in a]
        cfg = load_config(None, overrides, model="tiny-llama", method="adalora", task="fact-geo")
        cfg.output_dir = str(out)
        cfg.run_dir.mkdir(parents=True)
        return prepare(cfg)

    s = setup(tmp_path / "a")
    train_loop(s, 0, MetricLogger(s.cfg, None))
    state = s.method.save_state(s.model)
    assert state["ipt"] and state["exp_avg_ipt"]  # scores that a resumed run must not lose
    path = save_checkpoint(s, s.total_steps, 0)
    resumed = setup(tmp_path / "b")
    assert not resumed.method.save_state(resumed.model)["ipt"]
    load_checkpoint(resumed, path)
    restored = resumed.method.save_state(resumed.model)
    for key, scores in state.items():
        assert restored[key].keys() == scores.keys(), key
        for name, value in scores.items():
            assert torch.equal(restored[key][name], value), (key, name)
