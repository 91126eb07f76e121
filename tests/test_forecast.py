"""The routing forecast: the step-1 routing predicted from one backward pass (molf.forecast)
agrees with what MoLFAdamW then does, and `molf train` warns before training when one expert
would take (nearly) every module, without changing the run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import molf
from molf.cli import main
from molf.train.models import load_model
from tests.runs import tiny_run

TINY = dict(n_train=16, n_val=0, n_test=4, max_steps=2, batch_size=4, grad_accum=1)


def _wrapped_after_backward(alpha: float, rank: int = 128) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = load_model("tiny-llama")
    config = molf.MoLFConfig(lora_ranks=(rank,), lora_alphas=(alpha,), lora_dropout=0.0)
    model = molf.wrap(model, config)
    x = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    model(x, labels=x).loss.backward()
    return model


@pytest.mark.parametrize("alpha", [16, 32, 48, 64])
def test_the_forecast_is_the_optimizer_s_first_step(alpha):
    model = _wrapped_after_backward(alpha)
    forecast = molf.forecast_routing(model, lr_fft=5e-5, lr_lora=5e-5)
    opt = molf.MoLFAdamW(model, lr_fft=5e-5, lr_lora=5e-5)
    opt.step()
    record = opt.routing_log.last()
    for i, name in enumerate(opt.routing_log.module_names):
        assert bool(record["winners"][i, 0]) == (forecast.ratios[name] <= 1), name


@pytest.mark.parametrize(("alpha", "rank", "lr_lora"), [(4, 128, 5e-5), (64, 8, 5e-4)])
def test_the_pfn_forecast_is_the_optimizer_s_first_step_at_any_setting(alpha, rank, lr_lora):
    """PFN's step-1 ratio is sqrt(out / (in + out)) per module, measured on the optimizer's own
    scores, whatever alpha, rank and learning rates; so every module goes to FFT, and the guard
    says so naming PFN as the reason."""
    model = _wrapped_after_backward(alpha, rank)
    forecast = molf.forecast_routing(model, 5e-5, lr_lora, score="pfn")
    opt = molf.MoLFAdamW(model, lr_fft=5e-5, lr_lora=lr_lora, score="pfn")
    opt.step()
    record = opt.routing_log.last()
    modules = molf.layer.molf_modules(model)
    for i, name in enumerate(opt.routing_log.module_names):
        measured = float(record["scores"][i, 1] / record["scores"][i, 0])
        m = modules[name]
        limit = (m.out_features / (m.in_features + m.out_features)) ** 0.5
        assert measured == pytest.approx(forecast.ratios[name], rel=1e-4), name
        # near the large-gradient limit of docs/method.md (eps moves it where gradients are small)
        assert measured == pytest.approx(limit, rel=0.1)
        assert bool(record["winners"][i, 0])
    assert forecast.one_sided() == "fft" and "the PFN score sends 100%" in forecast.message()


def test_the_forecast_names_one_sided_settings_and_only_those():
    lora_side = molf.forecast_routing(_wrapped_after_backward(32, rank=8), 5e-5, 5e-5)
    assert lora_side.fft_share == 0 and lora_side.one_sided() == "lora"
    text = lora_side.message()
    assert text.startswith("at this setting MoLF is a LoRA of rank 8 at lr_lora 5e-05")
    assert "LoRA scale is 11.3 (lora_alpha / sqrt(rank 8))" in text
    fft_side = molf.forecast_routing(_wrapped_after_backward(4), 5e-5, 5e-5)
    assert fft_side.one_sided() == "fft" and "MoLF is an FFT at lr_fft 5e-05" in fft_side.message()
    mixed = molf.forecast_routing(_wrapped_after_backward(32), 5e-5, 5e-5)
    assert 0.05 < mixed.fft_share < 0.95 and mixed.message() is None
    # the learning-rate ratio moves it as the formula says: 5x lr_lora multiplies every ratio by 5
    faster = molf.forecast_routing(_wrapped_after_backward(32), 5e-5, 2.5e-4)
    for name, r in mixed.ratios.items():
        assert faster.ratios[name] == pytest.approx(5 * r)


def test_the_forecast_refuses_what_it_cannot_predict():
    torch.manual_seed(0)
    model, _ = load_model("tiny-llama")
    with pytest.raises(molf.MoLFError, match="no MoLF modules"):
        molf.forecast_routing(model, 5e-5, 5e-5)
    molf.wrap(model, molf.MoLFConfig(lora_ranks=(8,)))
    with pytest.raises(molf.MoLFError, match="call loss.backward"):
        molf.forecast_routing(model, 5e-5, 5e-5)
    torch.manual_seed(0)
    e, _ = load_model("tiny-llama")
    molf.wrap(e, molf.MoLFConfig(lora_ranks=(8, 32), train_base=False))
    with pytest.raises(molf.MoLFError, match="needs MoLF's two experts"):
        molf.forecast_routing(e, 5e-5, 5e-5)


def _train(out, capsys, **settings) -> str:
    args = tiny_run("molf", **(TINY | settings))
    assert main(["train", *args, "--output-dir", str(out)]) == 0
    return capsys.readouterr().err


def test_molf_train_warns_before_training_at_a_one_sided_setting(tmp_path, capsys):
    err = _train(tmp_path / "r8", capsys, lora_rank=8)
    line = next(x for x in err.splitlines() if "at this setting" in x)
    assert line.startswith("molf: at this setting MoLF is a LoRA of rank 8 at lr_lora 5e-05")
    assert line.endswith("(routing_forecast=false skips this check)")
    assert "at this setting" not in _train(tmp_path / "mixed", capsys, lora_rank=128)
    assert "at this setting" not in _train(
        tmp_path / "off", capsys, lora_rank=8, routing_forecast=False
    )
    assert "the PFN score sends" in _train(tmp_path / "pfn", capsys, lora_rank=128, score="pfn")


def test_the_forecast_changes_nothing_in_the_run(tmp_path, capsys):
    settings = dict(lora_rank=8, lora_dropout=0.1, max_steps=3)
    _train(tmp_path / "on", capsys, **settings)
    _train(tmp_path / "off", capsys, routing_forecast=False, **settings)
    a = load_file(str(tmp_path / "on" / "final" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "off" / "final" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    routing = [(tmp_path / d / "routing.jsonl").read_text() for d in ("on", "off")]
    assert routing[0] == routing[1]
