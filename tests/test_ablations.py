"""The two ablations of MoLF, registered methods usable in `molf compare`: `hybrid` (the routing
fixed by module type) and `lora-other` (LoRA plus the parameters MoLF trains outside the wrapped
layers)."""

from __future__ import annotations

import pytest
import torch

import molf
from molf.cli import main
from molf.routing import module_type
from molf.train.config import load_config
from molf.train.methods import get
from tests.conftest import tiny_causal_lm


def _built(method: str, **settings):
    cfg = load_config(
        None, [f"method={method}", "lora_rank=4", *[f"{k}={v}" for k, v in settings.items()]]
    )
    torch.manual_seed(0)
    model = get(method).build_model(tiny_causal_lm("llama"), cfg, 10)
    return cfg, model, get(method).build_optimizer(model, cfg)


def _steps(model, opt, n=3):
    x = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(n):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


def test_hybrid_trains_fft_in_its_types_and_lora_elsewhere():
    cfg, model, opt = _built("hybrid")
    assert cfg.hybrid_fft_types == ("k", "o", "down")
    modules = molf.molf_modules(model)
    before = {
        n: (m.base_layer.weight.detach().clone(), m.lora_B[0].detach().clone())
        for n, m in modules.items()
    }
    _steps(model, opt)
    log = opt.routing_log
    for i, name in enumerate(log.module_names):
        fft = module_type(name) in {"k", "o", "down"}
        assert all(bool(r["winners"][i, 0]) == fft for r in log.records), name
        w0, b0 = before[name]
        m = modules[name]
        assert torch.equal(m.base_layer.weight, w0) != fft  # W moved only in the FFT types
        assert torch.equal(m.lora_B[0], b0) == fft  # B moved only in the others


def test_hybrid_refuses_a_type_the_model_does_not_have():
    with pytest.raises(molf.MoLFError, match="config key 'hybrid_fft_types': 'attn'"):
        _built("hybrid", hybrid_fft_types="[k,attn]")


def test_lora_other_trains_lora_and_the_outside_parameters_as_molf_does():
    cfg, model, opt = _built("lora-other", lr_fft="2e-4", lr_lora="1e-3")
    modules = molf.molf_modules(model)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in modules.items()}
    embed = model.get_input_embeddings().weight.detach().clone()
    _steps(model, opt)
    assert all(torch.equal(m.base_layer.weight, weights[n]) for n, m in modules.items())
    assert not torch.equal(model.get_input_embeddings().weight, embed)
    assert all(
        not torch.equal(m.lora_B[0], torch.zeros_like(m.lora_B[0])) for m in modules.values()
    )
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["other"] == 2e-4 and lrs[f"lora_r{cfg.lora_rank}"] == 1e-3


def test_both_run_in_molf_compare(tmp_path):
    argv = ["compare", "--budget", "smoke", "--tasks", "fact-geo", "--methods", "hybrid,lora-other"]
    assert (
        main([*argv, "--lr-grid", "off", "--seeds", "1", "--output-dir", str(tmp_path / "g")]) == 0
    )
    results = (tmp_path / "g" / "results.md").read_text()
    assert "| Fixed hybrid |" in results and "| LoRA + embeddings/norms |" in results


def test_molf_pfn_is_molf_routed_by_pfn():
    cfg, model, opt = _built("molf-pfn")
    assert cfg.score == "pfn" and opt.score_fn.name == "pfn"
    with pytest.raises(molf.MoLFError, match="score"):
        load_config(None, ["method=molf-pfn", "score=epd"])  # the method stands for PFN
