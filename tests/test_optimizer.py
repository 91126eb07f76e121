import json

import pytest
import torch
from torch import nn

import molf
from molf.optim.scores import SCORES, Score
from tests.conftest import tiny_causal_lm


def _train(model, opt, batches, sched=None):
    losses = []
    for x in batches:
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (2, 10), generator=g) for _ in range(n)]


def test_losers_untouched_bitwise_while_their_moments_advance():
    model = molf.wrap(tiny_causal_lm("llama"), molf.MoLFConfig(lora_ranks=(4,), lora_dropout=0.0))
    opt = molf.MoLFAdamW(model, lr_fft=1e-3, lr_lora=1e-3)
    _train(model, opt, _batches(2))
    before = {id(p): p.detach().clone() for p in model.parameters()}
    moments = {
        id(p): opt.state[p]["exp_avg"].clone() for g in opt.param_groups for p in g["params"]
    }
    _train(model, opt, _batches(1, seed=5))
    rec = opt.routing_log.records[-1]
    modules = list(molf.molf_modules(model).values())
    n_losers = 0
    for mi, m in enumerate(modules):
        for e, params in enumerate(m.experts()):
            for p in params:
                assert not torch.equal(opt.state[p]["exp_avg"], moments[id(p)])  # moments advanced
                if rec["winners"][mi, e]:
                    assert not torch.equal(p.detach(), before[id(p)])
                else:
                    n_losers += 1
                    assert torch.equal(p.detach(), before[id(p)])  # bit-identical, no decay
    assert n_losers > 0


def test_ties_go_to_the_lower_expert_index():
    zero = Score(
        "zero_test",
        lambda m, v, eps: m.new_zeros((), dtype=torch.float32),
        lambda total, numel, lr: total * 0,
    )
    molf.register_score(zero)
    try:
        model = molf.wrap(
            tiny_causal_lm("llama"), molf.MoLFConfig(lora_ranks=(2, 4), train_base=False)
        )
        for k in (1, 2):
            opt = molf.MoLFAdamW(model, score="zero_test", top_k=k)
            _train(model, opt, _batches(1))
            winners = opt.routing_log.records[-1]["winners"]
            assert winners[:, :k].all() and not winners[:, k:].any()
    finally:
        del SCORES["zero_test"]


def test_custom_score_through_the_registry():
    # "always the last expert": a registered score really drives the routing
    last = Score(
        "last_test",
        lambda m, v, eps: m.new_zeros((), dtype=torch.float32),
        lambda total, numel, lr: torch.arange(total.shape[1], dtype=total.dtype).expand_as(total),
    )
    molf.register_score(last)
    try:
        model = molf.wrap(tiny_causal_lm("qwen2"), molf.MoLFConfig(lora_ranks=(2, 4)))
        opt = molf.MoLFAdamW(model, score="last_test")
        _train(model, opt, _batches(2))
        assert opt.win_counts()[:, 2].tolist() == [2] * len(opt.module_names)
        assert opt.win_counts()[:, :2].sum() == 0
    finally:
        del SCORES["last_test"]


def test_resume_is_bitwise(tmp_path):
    def fresh():
        torch.manual_seed(0)
        model = molf.wrap(
            tiny_causal_lm("llama"), molf.MoLFConfig(lora_ranks=(4,), lora_dropout=0.1)
        )
        opt = molf.MoLFAdamW(model, lr_fft=2e-3, lr_lora=4e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        return model, opt, sched

    batches = _batches(10, seed=2)
    model, opt, sched = fresh()
    torch.manual_seed(123)
    straight = _train(model, opt, batches, sched)
    straight_routes = opt.routing_log.winner_indices()

    model, opt, sched = fresh()
    torch.manual_seed(123)
    first = _train(model, opt, batches[:5], sched)
    routes_a = opt.routing_log.winner_indices()
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors"
    )
    torch.save(
        {"opt": opt.state_dict(), "sched": sched.state_dict(), "rng": torch.get_rng_state()},
        tmp_path / "state.pt",
    )
    del model, opt, sched

    model, opt, sched = fresh()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(tmp_path / "model.safetensors"))
    blob = torch.load(tmp_path / "state.pt", weights_only=True)
    opt.load_state_dict(blob["opt"])
    sched.load_state_dict(blob["sched"])
    torch.set_rng_state(blob["rng"])
    second = _train(model, opt, batches[5:], sched)
    routes_b = opt.routing_log.winner_indices()

    assert first + second == straight
    assert torch.equal(torch.cat([routes_a, routes_b]), straight_routes)
    assert opt.routing_log.records[0]["step"] == 6
    model_ref, opt_ref, _ = fresh()
    torch.manual_seed(123)
    _train(
        model_ref,
        opt_ref,
        batches,
        torch.optim.lr_scheduler.LambdaLR(opt_ref, lambda s: min(1.0, (s + 1) / 4)),
    )
    for (n, p), (_, q) in zip(model.named_parameters(), model_ref.named_parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(
        [p for g in opt.param_groups for p in g["params"]],
        [p for g in opt_ref.param_groups for p in g["params"]],
    ):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt_ref.state[q][key])
    assert torch.equal(opt.win_counts(), opt_ref.win_counts())


def test_state_dict_keeps_float32_moments_of_bf16_params():
    model = molf.wrap(
        tiny_causal_lm("llama", dtype=torch.bfloat16), molf.MoLFConfig(lora_ranks=(2,))
    )
    opt = molf.MoLFAdamW(model)
    _train(model, opt, _batches(1))
    opt2 = molf.MoLFAdamW(model)
    opt2.load_state_dict(opt.state_dict())
    p = opt2.param_groups[0]["params"][0]
    assert opt2.state[p]["exp_avg"].dtype == torch.float32
    assert opt2.state[p]["wins"].dtype == torch.int64
    low = molf.MoLFAdamW(model, moments_dtype="param")
    _train(model, low, _batches(1))
    assert low.state[p]["exp_avg"].dtype == torch.bfloat16


def test_param_groups_and_no_decay_split():
    model = molf.wrap(tiny_causal_lm("qwen2"), molf.MoLFConfig(lora_ranks=(4,)))
    opt = molf.MoLFAdamW(
        model, lr_fft=1e-4, lr_lora=2e-4, weight_decay_fft=0.1, weight_decay_lora=0.01
    )
    names = [g["name"] for g in opt.param_groups]
    assert names == ["fft", "lora_r4", "other", "other_no_decay"]
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["fft"]["lr"] == 1e-4 and groups["lora_r4"]["weight_decay"] == 0.01
    assert groups["other_no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() < 2 for p in groups["other_no_decay"]["params"])
    # qwen2 q/k/v have biases: they belong to the FFT expert, not to the other groups
    q = model.model.layers[0].self_attn.q_proj
    assert any(p is q.base_layer.bias for p in groups["fft"]["params"])


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: molf.MoLFConfig(lora_ranks=(0,)), "lora_ranks"),
        (lambda: molf.MoLFConfig(lora_ranks=(4, -1)), "lora_ranks"),
        (lambda: molf.MoLFConfig(lora_ranks=(4, 8), lora_alphas=(1.0,)), "lora_alphas"),
        (lambda: molf.MoLFConfig(lora_ranks=(), train_base=False), "train_base"),
        (lambda: molf.MoLFConfig(lora_dropout=1.5), "lora_dropout"),
    ],
)
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 3}, "top_k"),
        ({"score": "nope"}, "score"),
        ({"lr_lora": (1e-3, 1e-3)}, "lr_lora"),
    ],
)
def test_bad_optimizer_arguments_name_the_field(kwargs, field):
    model = molf.wrap(nn.Sequential(nn.Linear(4, 4)), molf.MoLFConfig(lora_ranks=(2,)))
    with pytest.raises(ValueError, match=field):
        molf.MoLFAdamW(model, **kwargs)


def test_optimizer_refuses_an_unwrapped_model():
    with pytest.raises(ValueError, match="molf.wrap"):
        molf.MoLFAdamW(nn.Linear(3, 3))


def test_routing_log_jsonl_and_summary(tmp_path):
    log = molf.RoutingLog(
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.up_proj",
            "model.layers.1.self_attn.q_proj",
        ],
        ["fft", "lora_r8"],
    )
    w = torch.tensor
    log.append(1, w([[1, 0], [0, 1], [1, 0]]).bool(), torch.rand(3, 2), w([True, True, True]))
    log.append(2, w([[1, 0], [1, 0], [0, 1]]).bool(), torch.rand(3, 2), w([True, True, True]))
    log.append(3, w([[0, 1], [0, 0], [0, 1]]).bool(), torch.rand(3, 2), w([True, False, True]))
    s = log.summary()
    assert s["overall"]["fft"] == pytest.approx(4 / 8)
    assert s["per_type"]["q"]["fft"] == pytest.approx(3 / 6)
    assert s["per_type"]["up"]["fft"] == pytest.approx(1 / 2)
    assert s["per_layer"]["0"]["fft"] == pytest.approx(3 / 5)
    assert s["per_layer"]["1"]["lora_r8"] == pytest.approx(2 / 3)
    assert log.share_over_steps(0) == [
        (1, pytest.approx(2 / 3)),
        (2, pytest.approx(2 / 3)),
        (3, 0.0),
    ]
    path = tmp_path / "routing.jsonl"
    log.write_jsonl(path)
    assert json.loads(path.read_text().splitlines()[0])["experts"] == ["fft", "lora_r8"]
    back = molf.RoutingLog.read_jsonl(path)
    assert back.summary() == s
    assert torch.equal(back.winner_indices(), log.winner_indices())
    assert "fft 50.0%" in log.format_summary()


def test_modules_without_gradient_are_not_stepped():
    net = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    molf.wrap(net, molf.MoLFConfig(lora_ranks=(2,)))
    opt = molf.MoLFAdamW(net)
    net["a"](torch.randn(2, 3)).sum().backward()
    before = [p.detach().clone() for p in net["b"].parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net["b"].parameters(), before))
    assert not opt.state[net["b"].base_layer.weight]
    assert opt.routing_log.records[0]["active"].tolist() == [True, False]


def test_functional_partials_in_batches_equal_the_formula_per_tensor(monkeypatch):
    """kernel_partials batches tensors by element count: any batch size gives each tensor's
    own partial (EPD sum m^2/(sqrt(v)+eps), PFN sum (m/(sqrt(v)+eps))^2), in order, none
    skipped; no tensors give an empty result; bad input is refused by name."""
    from molf.optim import functional as F

    gen = torch.Generator().manual_seed(0)
    sizes = [5, 1, 7, 3, 12, 2]
    ms = [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
    vs = [torch.rand(n, generator=gen, dtype=torch.float64) for n in sizes]
    eps = 1e-3
    want = {
        "epd": [float((m * m / (v.sqrt() + eps)).sum()) for m, v in zip(ms, vs)],
        "pfn": [float(((m / (v.sqrt() + eps)) ** 2).sum()) for m, v in zip(ms, vs)],
    }
    for batch in (1, 6, 10, 10**9):
        monkeypatch.setattr(F, "PARTIAL_BATCH_ELEMENTS", batch)
        for kernel, expected in want.items():
            got = F.kernel_partials(kernel, ms, vs, eps)
            assert got.tolist() == pytest.approx(expected, rel=1e-12), (kernel, batch)
    # bfloat16 moments are scored in float32, not in their own precision
    low_m = [m.to(torch.bfloat16) for m in ms]
    low_v = [v.to(torch.bfloat16) for v in vs]
    got = F.kernel_partials("pfn", low_m, low_v, eps)
    up = [(m.double(), v.double()) for m, v in zip(low_m, low_v)]
    exact = [float(((m / (v.float().sqrt().double() + eps)) ** 2).sum()) for m, v in up]
    assert got.dtype == torch.float32 and got.tolist() == pytest.approx(exact, rel=1e-5)
    assert F.kernel_partials("epd", [], [], eps).shape == (0,)
    with pytest.raises(ValueError, match="unknown score kernel 'bogus'"):
        F.kernel_partials("bogus", ms, vs, eps)
    with pytest.raises(ValueError, match="unknown score kernel 'bogus'"):
        F.finalize_scores("bogus", torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, 2))
    won = torch.ones(1, dtype=torch.bool)
    with pytest.raises(ValueError, match="a mask of winners needs scratch memory"):
        F.adam_update(ms[:1], ms[:1], vs[:1], [1.0], [0.1], [0.0], 0.9, 0.999, eps, won=won)
