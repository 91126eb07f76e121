"""The defaults that follow the authors' reference implementation (issue 15), each pinned."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import molf
from molf.optim.kernels import cpu_kernels
from molf.train import methods
from molf.train.config import TrainConfig, load_config
from molf.train.data import Tokenized, collate
from molf.train.loop import _micro_step, step_loss_tokens
from tests.conftest import REQUIRE_ALL, VOCAB, tiny_causal_lm

# every optimizer backend that can run here (the native one needs a C++ compiler)
BACKENDS = ["eager", "device"] + (["native"] if cpu_kernels() is not None or REQUIRE_ALL else [])


# -- 7.1: LoRA alpha 32 --------------------------------------------------------------------------
def test_lora_alpha_defaults_to_the_references_32_everywhere():
    assert molf.MoLFConfig().lora_alphas == (32.0,)
    assert molf.MoLFConfig(lora_ranks=(32, 128), train_base=False).lora_alphas == (32.0, 32.0)
    assert TrainConfig().lora_alpha == 32.0
    for name in ("lora", "adalora", "molf", "molf-e", "molf-e-k2", "lora-160"):
        assert load_config(name).lora_alpha == 32.0, name


def test_adalora_scale_matches_loras_at_the_target_rank():
    cfg = load_config("adalora")
    sched = methods.adalora_schedule(cfg, total_steps=44)
    assert sched["init_r"] == 192 and sched["target_r"] == 128
    # peft scales AdaLoRA by lora_alpha / init_r; LoRA (rsLoRA) by 32 / sqrt(128)
    assert abs(sched["lora_alpha"] / sched["init_r"] - 32 / 128**0.5) < 1e-12
    # pruning waits out the warmup, stops with a fifth of the run left, masks every ~5%
    assert (sched["total_step"], sched["tinit"], sched["tfinal"], sched["deltaT"]) == (44, 5, 8, 2)
    # the AdaLoRA authors' orthogonality weight, not peft's 0.5
    assert sched["orth_reg_weight"] == 0.1
    model = methods.get("adalora").build_model(tiny_causal_lm(), TrainConfig(lora_rank=4), 20)
    assert model.peft_config["default"].orth_reg_weight == 0.1
    # a run too short to prune in prunes at once instead of failing peft's checks
    short = methods.adalora_schedule(cfg, total_steps=1)
    assert (short["tinit"], short["tfinal"]) == (0, 0)


# -- 7.2: biases inside wrapped layers are not decayed --------------------------------------------
def _wrapped_linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 3)).double()
    return molf.wrap(net, molf.MoLFConfig(lora_ranks=(2,), lora_dropout=0.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrapped_biases_are_not_decayed_unless_asked(backend):
    for decay_bias in (False, True):
        net = _wrapped_linear()
        layer = net[0]
        w0, b0 = layer.base_layer.weight.detach().clone(), layer.bias.detach().clone()
        kwargs = {} if not decay_bias else {"decay_bias": True}
        opt = molf.MoLFAdamW(net, lr_fft=0.1, weight_decay_fft=0.5, backend=backend, **kwargs)
        for p in net.parameters():  # zero gradients: the Adam step is 0, only the decay moves
            p.grad = torch.zeros_like(p)
        opt.step()
        assert opt.routing_log.last()["winners"][0].tolist() == [True, False]  # tie: FFT
        torch.testing.assert_close(layer.base_layer.weight.detach(), w0 * 0.95, rtol=0, atol=0)
        torch.testing.assert_close(layer.bias.detach(), b0 * (0.95 if decay_bias else 1.0))
    assert TrainConfig().decay_bias is False and load_config("molf").decay_bias is False


# -- 7.3: the score has its own eps ---------------------------------------------------------------
def _first_scores(backend: str, **kwargs) -> torch.Tensor:
    net = _wrapped_linear()
    opt = molf.MoLFAdamW(net, lr_fft=1e-3, lr_lora=1e-3, backend=backend, **kwargs)
    g = torch.Generator().manual_seed(1)
    for p in net.parameters():  # tiny gradients, where eps matters
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-6
    opt.step()
    return opt.routing_log.last()["scores"][0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_scores_use_their_own_eps_not_adams(backend):
    default = _first_scores(backend)
    assert torch.equal(_first_scores(backend, eps=1e-3), default)  # Adam's eps: same routing
    assert torch.equal(_first_scores(backend, eps=1e-3, score_eps=1e-8), default)
    assert not torch.allclose(_first_scores(backend, score_eps=1e-3), default, rtol=0.1, atol=0)
    assert molf.MoLFAdamW(_wrapped_linear()).score_eps == 1e-8
    assert TrainConfig().score_eps == 1e-8 and load_config("molf").score_eps == 1e-8


# -- 7.4: a tensor without a gradient is skipped ---------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradless_tensors_are_skipped_and_not_counted(backend):
    net = _wrapped_linear()
    layer = net[0]
    opt = molf.MoLFAdamW(net, lr_fft=1e-3, lr_lora=1e-3, backend=backend)
    w, b = layer.base_layer.weight, layer.bias
    a_, b_ = layer.lora_A[0], layer.lora_B[0]
    g = torch.Generator().manual_seed(2)
    # FFT: W and b have gradients; LoRA: B only (A has none)
    for p in (w, b, b_):
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    a0 = a_.detach().clone()
    opt.step()
    assert "step" not in opt.state.get(a_, {})  # no moments, no step count
    assert torch.equal(a_.detach(), a0)
    m, v = opt.state[b_]["exp_avg"], opt.state[b_]["exp_avg_sq"]
    # the LoRA expert's N is B's size alone
    want = 1e-3 * float((m * m / (v.sqrt() + 1e-8)).sum()) / b_.numel()
    got = float(opt.routing_log.last()["scores"][0, 1])
    assert abs(got - want) <= 1e-6 * want
    # an expert none of whose tensors has a gradient scores -inf and cannot win
    opt.zero_grad()
    for p in (a_, b_):
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-9
    w0 = w.detach().clone()
    opt.step()
    rec = opt.routing_log.last()
    assert rec["scores"][0, 0] == float("-inf")
    assert rec["winners"][0].tolist() == [False, True]
    assert torch.equal(w.detach(), w0) and opt.state[w]["step"].item() == 1.0


# -- 7.5: gradient accumulation normalised by the whole step's tokens -----------------------------
def _setup(model, rows):
    ids = [r[0] for r in rows]
    labels = [r[1] for r in rows]
    return SimpleNamespace(model=model, data=Tokenized(ids, labels, 0), device=torch.device("cpu"))


def test_accumulated_gradient_is_the_token_mean_of_the_whole_step():
    torch.manual_seed(0)
    model = tiny_causal_lm(dtype=torch.float64)
    g = torch.Generator().manual_seed(3)

    def row(n_prompt, n_target):
        ids = torch.randint(1, VOCAB, (n_prompt + n_target,), generator=g).tolist()
        return ids, [-100] * n_prompt + ids[n_prompt:]

    # micro-batch 0: two long targets; micro-batch 1: two one-token targets
    rows = [row(4, 30), row(3, 25), row(10, 1), row(12, 1)]
    s = _setup(model, rows)
    micro = [[0, 1], [2, 3]]
    step_tokens = step_loss_tokens(s, micro)
    assert step_tokens == 30 + 25 + 1 + 1

    params = [p for p in model.parameters()]
    model.zero_grad()
    loss = sum(_micro_step(s, idx, 0, step_tokens)[0] for idx in micro)
    accumulated = [p.grad.clone() for p in params]

    # one big batch, the model's own token-mean loss (no num_items_in_batch)
    model.zero_grad()
    big = collate([r[0] for r in rows], [r[1] for r in rows], 0)
    mean = model(**big).loss
    mean.backward()
    for a, p in zip(accumulated, params):
        torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-15)
    assert abs(loss - float(mean)) < 1e-6  # transformers computes the loss value in float32

    # the old rule (mean of micro-batch means) differs a lot here: the test can fail
    model.zero_grad()
    for idx in micro:
        b = collate([rows[i][0] for i in idx], [rows[i][1] for i in idx], 0)
        (model(**b).loss / 2).backward()
    assert not torch.allclose(params[0].grad, accumulated[0], rtol=1e-3)


# -- item 6: MoLF-E at top-1 and top-2, and a LoRA of MoLF-E's size -------------------------------
def test_molf_e_k2_runs_at_top_2_and_refuses_another_top_k():
    from molf.errors import MolfError

    assert load_config(None, method="molf-e-k2").top_k == 2
    assert load_config("molf-e-k2").top_k == 2
    assert load_config(None, method="molf-e").top_k == 1
    try:
        load_config(None, ["top_k=1"], method="molf-e-k2")
    except MolfError as e:
        assert "top_k" in str(e) and "molf-e-k2" in str(e)
    else:
        raise AssertionError("molf-e-k2 with top_k=1 was accepted")


def test_lora_160_has_the_rank_of_molf_es_two_experts():
    cfg = load_config(None, ["molf_e_ranks=[4, 8]", "target_modules=[q_proj]"], method="lora-160")
    model = methods.get("lora-160").build_model(tiny_causal_lm(), cfg, 1)
    ranks = {m.r["default"] for m in model.modules() if hasattr(m, "lora_A") and m.r}
    assert ranks == {12}


def test_small_budget_grows_the_test_splits_for_paired_claims():
    from molf.experiments.grid import BUDGETS

    small = BUDGETS["small"].per_task
    assert small["med"]["n_test"] >= 256
    # fact's test rewrites are trained on: the training set holds every held-out fact
    assert small["fact"]["n_test"] == 128
    assert small["fact"]["n_train"] == small["fact"]["n_test"] + small["fact"]["n_val"]
