"""Property-based tests of MoLFAdamW against docs/method.md section 3, through the public API only.

Each example wraps a small random nn.Sequential (1-3 nn.Linear with random dims and biases,
LayerNorms sometimes, a random subset targeted) with a random MoLFConfig, in float64 so that an
independent oracle can be compared almost exactly, and runs a few steps with random gradients:
either set directly per parameter (some modules without gradients, some with all-zero ones,
some with only a few) or from a random loss. Every step is checked against the oracle.
"""

from __future__ import annotations

import copy
import io
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from molf import MoLFAdamW, MoLFConfig, MolfError, molf_modules, wrap
from tests.conftest import skip_unless

DT = torch.float64
# Steps take variable time (the first one may build the CPU kernels): no per-example deadline.
QUICK = settings(deadline=None)
MODULE_MODES = ("random", "random", "random", "none", "zeros", "partial")

# -- random setups ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """One random model + config + optimizer + gradient plan."""

    dims: tuple[int, ...]  # feature sizes: linear i maps dims[i] -> dims[i + 1]
    biases: tuple[bool, ...]
    norms: tuple[bool, ...]  # a LayerNorm after linear i
    targets: tuple[int, ...]  # which linears are wrapped
    train_base: bool
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    use_rslora: bool
    freeze_non_wrapped: bool | None
    top_k: int
    lr_fft: float
    lr_lora: tuple[float, ...]
    lr_lora_scalar: bool  # pass lr_lora / weight_decay_lora as one number
    wd_fft: float
    wd_lora: tuple[float, ...]
    lr_other: float
    wd_other: float
    betas: tuple[float, float]
    eps: float
    score_eps: float
    decay_bias: bool
    score: str
    twins: bool  # all LoRA experts identical (same rank, init, lr, gradients): exact score ties
    grad_mode: str  # "direct" (p.grad = ...) or "loss" (backward of a random linear loss)
    grad_log10_scale: float
    modes: tuple[tuple[str, ...], ...]  # per step, per wrapped module (direct mode)
    others_get_grad: tuple[bool, ...]  # per step (direct mode)
    seed: int
    n_steps: int

    @property
    def n_experts(self) -> int:
        return len(self.ranks) + int(self.train_base)

    def expert_lr_wd(self, e: int) -> tuple[float, float]:
        """lr and weight decay of expert slot e (FFT first when the base is trained)."""
        if self.train_base:
            if e == 0:
                return self.lr_fft, self.wd_fft
            e -= 1
        return self.lr_lora[e], self.wd_lora[e]


lrs = st.one_of(st.just(0.0), st.floats(1e-5, 0.3))
wds = st.one_of(st.just(0.0), st.floats(0.0, 0.5))


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    n_lin = draw(st.integers(1, 3))
    dims = tuple(draw(st.lists(st.integers(1, 12), min_size=n_lin + 1, max_size=n_lin + 1)))
    biases = tuple(draw(st.lists(st.booleans(), min_size=n_lin, max_size=n_lin)))
    norms = tuple(draw(st.lists(st.booleans(), min_size=n_lin, max_size=n_lin)))
    targets = tuple(sorted(draw(st.sets(st.integers(0, n_lin - 1), min_size=1, max_size=n_lin))))
    train_base = draw(st.booleans())
    # with one expert (one LoRA expert, base frozen) it wins everything: top_k = n_experts
    n_lora = draw(st.integers(1, 3))
    grad_mode = draw(st.sampled_from(["direct", "loss"]))
    twins = grad_mode == "direct" and n_lora >= 2 and draw(st.booleans())
    if twins:
        ranks = (draw(st.integers(1, 6)),) * n_lora
        lr_lora = (draw(lrs),) * n_lora
        wd_lora = (draw(wds),) * n_lora
    else:
        ranks = tuple(draw(st.lists(st.integers(1, 6), min_size=n_lora, max_size=n_lora)))
        lr_lora = tuple(draw(st.lists(lrs, min_size=n_lora, max_size=n_lora)))
        wd_lora = tuple(draw(st.lists(wds, min_size=n_lora, max_size=n_lora)))
    lr_lora_scalar = draw(st.booleans())
    if lr_lora_scalar:
        lr_lora, wd_lora = (lr_lora[0],) * n_lora, (wd_lora[0],) * n_lora
    n_experts = n_lora + int(train_base)
    n_steps = draw(st.integers(1, 4))
    plan_len = n_steps + 2  # the state_dict test runs two more
    modes = tuple(
        tuple(draw(st.sampled_from(MODULE_MODES)) for _ in targets) for _ in range(plan_len)
    )
    return Setup(
        dims=dims,
        biases=biases,
        norms=norms,
        targets=targets,
        train_base=train_base,
        ranks=ranks,
        alphas=tuple(draw(st.lists(st.floats(0.5, 32.0), min_size=n_lora, max_size=n_lora))),
        use_rslora=draw(st.booleans()),
        freeze_non_wrapped=draw(st.sampled_from([None, True, False])),
        top_k=draw(st.integers(1, n_experts)),
        lr_fft=draw(lrs),
        lr_lora=lr_lora,
        lr_lora_scalar=lr_lora_scalar,
        wd_fft=draw(wds),
        wd_lora=wd_lora,
        lr_other=draw(lrs),
        wd_other=draw(wds),
        betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.9999))),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        score_eps=draw(st.sampled_from([1e-8, 1e-8, 1e-5, 1e-3])),
        decay_bias=draw(st.booleans()),
        score=draw(st.sampled_from(["epd", "pfn"])),
        twins=twins,
        grad_mode=grad_mode,
        grad_log10_scale=draw(st.floats(-3.0, 1.0)),
        modes=modes,
        others_get_grad=tuple(draw(st.booleans()) for _ in range(plan_len)),
        seed=draw(st.integers(0, 2**31 - 1)),
        n_steps=n_steps,
    )


def build_model(s: Setup) -> nn.Module:
    """The wrapped float64 model of `s`, initialised from its seed (global RNG left alone)."""
    layers: list[nn.Module] = []
    linear_names: list[str] = []
    for i, bias in enumerate(s.biases):
        linear_names.append(str(len(layers)))
        layers.append(nn.Linear(s.dims[i], s.dims[i + 1], bias=bias))
        if s.norms[i]:
            layers.append(nn.LayerNorm(s.dims[i + 1]))
    target: str | list[str] = (
        "all-linear" if len(s.targets) == len(s.biases) else [linear_names[i] for i in s.targets]
    )
    config = MoLFConfig(
        lora_ranks=s.ranks,
        lora_alphas=s.alphas,
        use_rslora=s.use_rslora,
        lora_dropout=0.0,
        target_modules=target,
        train_base=s.train_base,
        freeze_non_wrapped=s.freeze_non_wrapped,
    )
    with torch.random.fork_rng():
        torch.manual_seed(s.seed)
        model = wrap(nn.Sequential(*layers).to(DT), config)
    if s.twins:
        with torch.no_grad():
            for m in molf_modules(model).values():
                a0 = m.lora_experts()[0][0]
                for a, _ in m.lora_experts()[1:]:
                    a.copy_(a0)
    return model


def make_opt(model: nn.Module, s: Setup, backend: str = "auto") -> MoLFAdamW:
    return MoLFAdamW(
        model,
        lr_fft=s.lr_fft,
        lr_lora=s.lr_lora[0] if s.lr_lora_scalar else s.lr_lora,
        weight_decay_fft=s.wd_fft,
        weight_decay_lora=s.wd_lora[0] if s.lr_lora_scalar else s.wd_lora,
        lr_other=s.lr_other,
        weight_decay_other=s.wd_other,
        betas=s.betas,
        eps=s.eps,
        score=s.score,
        score_eps=s.score_eps,
        decay_bias=s.decay_bias,
        top_k=s.top_k,
        backend=backend,
    )


# The default backend here (native on CPU when it builds), and the device backend (the default on
# accelerators), which runs on CPU too: the same maths, so the same oracle and tolerances.
BACKENDS = ["auto", "device"]


def for_each_backend(max_examples: int):
    """A property over `max_examples` random setups (argument `s`), run with every backend."""

    def decorate(test):
        test = given(s=setups())(settings(QUICK, max_examples=max_examples)(test))
        return pytest.mark.parametrize("backend", BACKENDS)(test)

    return decorate


# -- gradients -------------------------------------------------------------------------------


def make_grads(
    model: nn.Module, s: Setup, t: int, gen: torch.Generator
) -> dict[str, torch.Tensor | None]:
    """Gradients of step t by parameter name (None: no gradient), per `s.grad_mode`."""
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    scale = 10.0**s.grad_log10_scale

    def rand(p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen, dtype=DT) * scale

    if s.grad_mode == "loss":
        model.zero_grad(set_to_none=True)
        batch = int(torch.randint(1, 4, (), generator=gen))
        x = torch.randn(batch, s.dims[0], generator=gen, dtype=DT)
        w = torch.randn(batch, s.dims[-1], generator=gen, dtype=DT) * scale
        (model(x) * w).sum().backward()
        grads = {
            n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()
        }
        model.zero_grad(set_to_none=True)
        return grads

    grads: dict[str, torch.Tensor | None] = {n: None for n, _ in model.named_parameters()}
    routed: set[str] = set()
    for mode, m in zip(s.modes[t], molf_modules(model).values()):
        experts = m.experts()
        for params in experts:
            for p in params:
                routed.add(names[id(p)])
                if mode == "random":
                    grads[names[id(p)]] = rand(p)
                elif mode == "zeros":
                    grads[names[id(p)]] = torch.zeros_like(p)
                elif mode == "partial" and bool(torch.rand((), generator=gen) < 0.5):
                    grads[names[id(p)]] = rand(p)
        if s.twins:
            lora = m.lora_experts()
            for params in lora[1:]:
                for p, p0 in zip(params, lora[0]):
                    g0 = grads[names[id(p0)]]
                    grads[names[id(p)]] = None if g0 is None else g0.clone()
    for n, p in model.named_parameters():
        if n in trainable and n not in routed and s.others_get_grad[t]:
            grads[n] = rand(p)
    return grads


def apply_grads(model: nn.Module, grads: dict[str, torch.Tensor | None]) -> None:
    for n, p in model.named_parameters():
        g = grads[n]
        p.grad = None if g is None else g.clone()


# -- oracle ----------------------------------------------------------------------------------

STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


def snapshot(model: nn.Module, opt: MoLFAdamW) -> dict[str, tuple[torch.Tensor, dict | None]]:
    """Each parameter and its optimizer state (None before its first step), cloned."""
    out = {}
    for n, p in model.named_parameters():
        st_ = opt.state.get(p)
        state = {k: st_[k].clone() for k in STATE_KEYS} if st_ and "step" in st_ else None
        out[n] = (p.detach().clone(), state)
    return out


def unchanged_state(opt: MoLFAdamW, p: torch.Tensor, before: dict | None) -> bool:
    """Whether p's moments and step count are as `before` (None: p had none, and still has
    none; its state may hold its module's win counter only)."""
    st1 = opt.state.get(p) or {}
    if before is None:
        return "step" not in st1
    return all(torch.equal(st1[k], before[k]) for k in STATE_KEYS)


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-12) -> bool:
    return bool(((actual - expected).abs() <= tol * (1.0 + expected.abs())).all())


def expected_moments(
    old: dict | None, g: torch.Tensor, b1: float, b2: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    m0 = old["exp_avg"] if old else torch.zeros_like(g)
    v0 = old["exp_avg_sq"] if old else torch.zeros_like(g)
    t0 = float(old["step"]) if old else 0.0
    return b1 * m0 + (1 - b1) * g, b2 * v0 + (1 - b2) * g * g, t0 + 1


def expected_adam(
    p0: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    t: float,
    lr: float,
    wd: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.Tensor:
    b1, b2 = betas
    p = p0 * (1 - lr * wd)
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    return p - lr * m_hat / (v_hat.sqrt() + eps)


def expert_score(
    ms: list[torch.Tensor], vs: list[torch.Tensor], lr: float, eps: float, score: str
) -> float:
    """EPD or PFN of one expert from the raw moments of its tensors with a gradient, in float64
    (docs/method.md section 3); -inf when none has one (it cannot win)."""
    n = sum(m.numel() for m in ms)
    if n == 0:
        return -math.inf
    if score == "epd":
        total = sum(float((m * m / (v.sqrt() + eps)).sum()) for m, v in zip(ms, vs))
        return lr / n * total
    total = sum(float(((m / (v.sqrt() + eps)) ** 2).sum()) for m, v in zip(ms, vs))
    return math.sqrt(total) / math.sqrt(n)


def check_winners(winners: list[bool], logged: list[float], exact: list[float], k: int) -> None:
    """Winners are a top-k of the logged scores; exact ties go to the lower expert index.

    Two experts whose logged float32 scores are within float32 rounding may legitimately be
    ordered either way (the decision is taken on the unrounded scores), unless the oracle's
    float64 scores are exactly equal (identical moments), where the lower index must win.
    """
    win = [j for j, w in enumerate(winners) if w]
    lose = [j for j, w in enumerate(winners) if not w]
    assert len(win) == k, (winners, logged)
    for w in win:
        for lo in lose:
            assert logged[w] >= logged[lo] or math.isclose(logged[w], logged[lo], rel_tol=1e-6), (
                f"loser {lo} scored {logged[lo]} > winner {w} {logged[w]}"
            )
            if exact[w] == exact[lo]:
                assert w < lo, f"tie between experts {w} and {lo} went to the higher index"


def check_step(
    s: Setup,
    model: nn.Module,
    opt: MoLFAdamW,
    before: dict[str, tuple[torch.Tensor, dict | None]],
    grads: dict[str, torch.Tensor | None],
    n_records_before: int,
) -> list[int]:
    """Check one step against the oracle; returns each wrapped module's number of winners (0
    when inactive)."""
    b1, b2 = s.betas
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    modules = list(molf_modules(model).values())
    active = [any(grads[names[id(p)]] is not None for e in m.experts() for p in e) for m in modules]
    records = opt.routing_log.records
    assert len(records) == n_records_before + int(any(active))
    rec = records[-1] if any(active) else None
    if rec is not None:
        assert rec["winners"].dtype == torch.bool and rec["scores"].dtype == torch.float32
        assert tuple(rec["winners"].shape) == (len(modules), s.n_experts)
        assert tuple(rec["scores"].shape) == (len(modules), s.n_experts)
    checked: set[str] = set()
    n_won = [0] * len(modules)

    for mi, m in enumerate(modules):
        experts = m.experts()
        assert len(experts) == s.n_experts
        if not active[mi]:
            # Never routed: no moments, counters or weights touched; not a winner in the log.
            for e in experts:
                for p in e:
                    n = names[id(p)]
                    checked.add(n)
                    p0, st0 = before[n]
                    assert torch.equal(p.detach(), p0), n
                    assert unchanged_state(opt, p, st0), n
            if rec is not None:
                assert not rec["winners"][mi].any()
            continue

        new_moments = []  # per expert: [(m, v, t)] from the oracle, None without a gradient
        exact_scores = []
        for e, ps in enumerate(experts):
            lr, _ = s.expert_lr_wd(e)
            mv = []
            for p in ps:
                n = names[id(p)]
                g = grads[n]
                if g is None:
                    # skipped as torch's AdamW skips it: no moments, no step, not in N, no update
                    assert unchanged_state(opt, p, before[n][1]), f"gradless {n} stepped"
                    mv.append(None)
                    continue
                m_exp, v_exp, t_exp = expected_moments(before[n][1], g, b1, b2)
                st1 = opt.state[p]
                # All experts' moments advance with their exact gradient, winners or not.
                assert close(st1["exp_avg"], m_exp), f"exp_avg of {n}"
                assert close(st1["exp_avg_sq"], v_exp), f"exp_avg_sq of {n}"
                assert float(st1["step"]) == t_exp, f"step of {n}"
                mv.append((m_exp, v_exp, t_exp))
            new_moments.append(mv)
            with_grad = [p for p, x in zip(ps, mv) if x is not None]
            exact_scores.append(
                expert_score(
                    [opt.state[p]["exp_avg"] for p in with_grad],
                    [opt.state[p]["exp_avg_sq"] for p in with_grad],
                    lr,
                    s.score_eps,
                    s.score,
                )
            )

        logged = rec["scores"][mi].tolist()
        for e in range(s.n_experts):
            assert math.isclose(logged[e], exact_scores[e], rel_tol=1e-6, abs_tol=1e-30), (
                f"module {mi} expert {e}: logged {logged[e]}, recomputed {exact_scores[e]}"
            )
        winners = rec["winners"][mi].tolist()
        # the top-k, less any expert without a gradient (it scores -inf and never wins)
        with_grad = [any(x is not None for x in mv) for mv in new_moments]
        assert not any(w and not g for w, g in zip(winners, with_grad)), "a gradless expert won"
        n_won[mi] = min(s.top_k, sum(with_grad))
        check_winners(winners, logged, exact_scores, n_won[mi])

        for e, ps in enumerate(experts):
            lr, wd = s.expert_lr_wd(e)
            for p, mv in zip(ps, new_moments[e]):
                n = names[id(p)]
                checked.add(n)
                p0 = before[n][0]
                if not winners[e] or mv is None:
                    assert torch.equal(p.detach(), p0), f"loser or gradless {n} changed"
                    continue
                m_exp, v_exp, t_exp = mv
                # a wrapped layer's bias takes the FFT decay only with decay_bias
                wd_p = wd if s.decay_bias or p is not m.bias else 0.0
                want = expected_adam(p0, m_exp, v_exp, t_exp, lr, wd_p, s.betas, s.eps)
                assert close(p.detach(), want), f"winner {n} off the AdamW oracle"
                if not close(want, p0, 1e-9):
                    assert not torch.equal(p.detach(), p0), f"winner {n} unchanged"

    # Everything else: plain AdamW (no decay on 1-d tensors) when it has a gradient, else idle.
    for n, p in params.items():
        if n in checked:
            continue
        p0, st0 = before[n]
        g = grads[n]
        if not p.requires_grad or g is None:
            assert torch.equal(p.detach(), p0), n
            assert unchanged_state(opt, p, st0), n
            continue
        m_exp, v_exp, t_exp = expected_moments(st0, g, b1, b2)
        st1 = opt.state[p]
        assert close(st1["exp_avg"], m_exp) and close(st1["exp_avg_sq"], v_exp), n
        assert float(st1["step"]) == t_exp, n
        wd = s.wd_other if p.dim() >= 2 else 0.0
        want = expected_adam(p0, m_exp, v_exp, t_exp, s.lr_other, wd, s.betas, s.eps)
        assert close(p.detach(), want), f"non-routed {n} off the AdamW oracle"
    return n_won


# -- properties ------------------------------------------------------------------------------


@for_each_backend(max_examples=40)
def test_every_step_follows_the_method(backend: str, s: Setup) -> None:
    """Moments of all experts advance; only the top-k by the logged score update; wins add up."""
    model = build_model(s)
    opt = make_opt(model, s, backend)
    assert opt.routing_log.module_names == list(molf_modules(model))
    gen = torch.Generator().manual_seed(s.seed)
    n_modules = len(s.targets)
    expected_wins = [0] * n_modules
    for t in range(s.n_steps):
        grads = make_grads(model, s, t, gen)
        apply_grads(model, grads)
        before = snapshot(model, opt)
        n_records = len(opt.routing_log.records)
        opt.step()
        for mi, n in enumerate(check_step(s, model, opt, before, grads, n_records)):
            expected_wins[mi] += n
        opt.zero_grad()

    wins = opt.win_counts()
    assert wins.dtype == torch.int64 and tuple(wins.shape) == (n_modules, s.n_experts)
    assert wins.sum(dim=1).tolist() == expected_wins
    logged = torch.zeros(n_modules, s.n_experts, dtype=torch.int64)
    for rec in opt.routing_log.records:
        logged += rec["winners"].to(torch.int64)
    assert torch.equal(wins, logged)


@for_each_backend(max_examples=25)
def test_state_dict_round_trip_continues_bitwise(backend: str, s: Setup) -> None:
    """A fresh optimizer on a deep copy, loaded from a saved state_dict, takes the same steps."""
    model = build_model(s)
    opt = make_opt(model, s, backend)
    gen = torch.Generator().manual_seed(s.seed)
    for t in range(s.n_steps):
        apply_grads(model, make_grads(model, s, t, gen))
        opt.step()
        opt.zero_grad()

    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = make_opt(twin, s, backend)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(opt2.win_counts(), opt.win_counts())

    n_records = len(opt.routing_log.records)
    for t in range(s.n_steps, s.n_steps + 2):
        grads = make_grads(model, s, t, gen)
        apply_grads(model, grads)
        apply_grads(twin, grads)
        opt.step()
        opt2.step()
        opt.zero_grad()
        opt2.zero_grad()
        for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            assert torch.equal(p, q), f"step {t + 1}: {n} diverged after load_state_dict"
            sp, sq = opt.state.get(p) or {}, opt2.state.get(q) or {}
            # a module's anchor tensor may hold its win counts and no moments yet (it has had
            # no gradient): compare whatever each state holds
            assert sp.keys() == sq.keys(), n
            for k in sp:
                assert torch.equal(sp[k], sq[k]), f"step {t + 1}: state {k} of {n}"
    assert torch.equal(opt.win_counts(), opt2.win_counts())
    new = opt.routing_log.records[n_records:]
    assert len(new) == len(opt2.routing_log.records)
    for a, b in zip(new, opt2.routing_log.records):
        assert a["step"] == b["step"]
        assert torch.equal(a["winners"], b["winners"])
        assert torch.equal(a["scores"], b["scores"])


# -- invalid configurations ------------------------------------------------------------------


def _assert_names_field(exc: pytest.ExceptionInfo[ValueError], field: str) -> None:
    assert isinstance(exc.value, MolfError)
    assert re.search(rf"\b{re.escape(field)}\b", str(exc.value)), str(exc.value)


@settings(QUICK, max_examples=30)
@given(
    ranks=st.lists(st.integers(-4, 8), min_size=1, max_size=4).filter(
        lambda rs: any(r <= 0 for r in rs)
    )
)
def test_nonpositive_rank_names_lora_ranks(ranks: list[int]) -> None:
    with pytest.raises(ValueError) as exc:
        MoLFConfig(lora_ranks=ranks)
    _assert_names_field(exc, "lora_ranks")


@settings(QUICK, max_examples=30)
@given(st.data())
def test_mismatched_or_bad_alphas_name_lora_alphas(data: st.DataObject) -> None:
    ranks = data.draw(st.lists(st.integers(1, 8), min_size=1, max_size=4))
    alphas = data.draw(
        st.one_of(
            # wrong length
            st.lists(st.floats(0.1, 64.0), max_size=5).filter(lambda a: len(a) != len(ranks)),
            # right length, one alpha <= 0 or not finite
            st.lists(
                st.floats(0.1, 64.0), min_size=len(ranks) - 1, max_size=len(ranks) - 1
            ).flatmap(
                lambda good: st.tuples(
                    st.sampled_from([0.0, -1.0, float("nan"), float("inf")]),
                    st.integers(0, len(good)),
                ).map(lambda bad: good[: bad[1]] + [bad[0]] + good[bad[1] :])
            ),
        )
    )
    with pytest.raises(ValueError) as exc:
        MoLFConfig(lora_ranks=ranks, lora_alphas=alphas)
    _assert_names_field(exc, "lora_alphas")


def _tiny_wrapped(train_base: bool, n_lora: int) -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)).to(DT)
    return wrap(model, MoLFConfig(lora_ranks=(2,) * n_lora, train_base=train_base))


@st.composite
def bad_optimizer_args(draw: st.DrawFn) -> tuple[bool, int, dict, str]:
    """(train_base, n_lora, kwargs, field): MoLFAdamW kwargs with one invalid field."""
    train_base = draw(st.booleans())
    n_lora = draw(st.integers(1, 3))
    n_experts = n_lora + int(train_base)
    wrong_len = st.integers(0, 5).filter(lambda n: n != n_lora)
    kind = draw(
        st.sampled_from(
            ["top_k", "lr_lora_len", "wd_lora_len", "lr_fft", "lr_lora", "betas", "eps", "score"]
        )
    )
    if kind == "top_k":
        k = draw(st.one_of(st.integers(-3, 0), st.integers(n_experts + 1, n_experts + 4)))
        return train_base, n_lora, {"top_k": k}, "top_k"
    if kind == "lr_lora_len":
        return train_base, n_lora, {"lr_lora": [1e-3] * draw(wrong_len)}, "lr_lora"
    if kind == "wd_lora_len":
        n = draw(wrong_len)
        return train_base, n_lora, {"weight_decay_lora": [0.01] * n}, "weight_decay_lora"
    if kind == "lr_fft":
        return train_base, n_lora, {"lr_fft": draw(st.floats(-1.0, -1e-12))}, "lr_fft"
    if kind == "lr_lora":
        lrs_ = [1e-3] * n_lora
        lrs_[draw(st.integers(0, n_lora - 1))] = draw(st.floats(-1.0, -1e-12))
        return train_base, n_lora, {"lr_lora": lrs_}, "lr_lora"
    if kind == "betas":
        bad = st.one_of(st.floats(-2.0, -1e-9), st.floats(1.0, 3.0), st.just(float("nan")))
        ok = st.floats(0.0, 0.999)
        betas = draw(st.one_of(st.tuples(bad, ok), st.tuples(ok, bad)))
        return train_base, n_lora, {"betas": betas}, "betas"
    if kind == "eps":
        eps = draw(st.one_of(st.floats(-1.0, -1e-12), st.just(float("nan"))))
        return train_base, n_lora, {"eps": eps}, "eps"
    name = draw(
        st.text("abcxyz_", min_size=1, max_size=8).filter(lambda n: n not in ("epd", "pfn"))
    )
    return train_base, n_lora, {"score": name}, "score"


@settings(QUICK, max_examples=40)
@given(bad_optimizer_args())
def test_bad_optimizer_argument_names_the_field(case: tuple[bool, int, dict, str]) -> None:
    train_base, n_lora, kwargs, field = case
    model = _tiny_wrapped(train_base, n_lora)
    with pytest.raises(ValueError) as exc:
        MoLFAdamW(model, **kwargs)
    _assert_names_field(exc, field)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"lr_lora": float("nan")}, "lr_lora"),
        ({"lr_other": -1e-3}, "lr_other"),
        ({"lr_other": float("nan")}, "lr_other"),
        ({"weight_decay_lora": -0.1}, "weight_decay_lora"),
        ({"weight_decay_fft": float("nan")}, "weight_decay_fft"),
    ],
)
def test_nan_or_negative_lr_names_the_field(kwargs: dict, field: str) -> None:
    model = _tiny_wrapped(True, 1)
    with pytest.raises(ValueError) as exc:
        MoLFAdamW(model, **kwargs)
    _assert_names_field(exc, field)


_ALL_WIN_SCRIPT = """
import torch
from torch import nn
import molf

for train_base, ranks in ((False, (1,)), (True, (1,)), (False, (2, 3)), (True, (2, 3))):
    model = nn.Sequential(nn.Linear(3, 2)).double()
    molf.wrap(model, molf.MoLFConfig(lora_ranks=ranks, train_base=train_base, lora_dropout=0.0))
    opt = molf.MoLFAdamW(model, lr_lora=1e-2, lr_fft=1e-2, top_k=len(ranks) + int(train_base))
    print(getattr(opt, "backend", "eager"), flush=True)
    for _ in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        opt.step()
        for p, p0 in zip(model.parameters(), before):
            # every expert wins, so every trainable tensor moves
            assert (not p.requires_grad) or not torch.equal(p.detach(), p0)
    assert opt.win_counts().tolist() == [[2] * (len(ranks) + int(train_base))]
print("ok")
"""


def test_every_expert_winning_does_not_crash() -> None:
    """top_k == number of experts: every expert updates every step. A regression test: the
    native kernels once corrupted the heap in this case ('double free or corruption', fixed),
    which aborts the process, so it runs in a subprocess that cannot take pytest down with it."""
    env = {k: v for k, v in os.environ.items() if k != "MOLF_OPTIMIZER_BACKEND"}
    result = subprocess.run(
        [sys.executable, "-c", _ALL_WIN_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    lines = result.stdout.split()
    if lines and lines[0] != "native":
        skip_unless(False, f"the native backend (the default here is {lines[0]!r})")
    assert result.returncode == 0 and lines[-1:] == ["ok"], result.stderr[-2000:]
