"""The native CPU kernels and the distributed (two-phase) native step, against the float64 oracle
and against eager; the backend registry and the kernels' build. (The device backend has its own
file, test_optimizer_device.py.)"""

import copy

import pytest
import torch
from torch import nn

import molf
from molf.optim import functional as F
from molf.optim import kernels as K
from molf.optim.backends import BACKENDS
from molf.optim.backends.eager import EagerBackend
from molf.optim.backends.native import NativeBackend
from molf.optim.scores import SCORES, Score
from tests.conftest import needs, skip_unless, tiny_causal_lm
from tests.optim_helpers import CASES, case_id, check_against_oracle, step_on_random_grads

native_available = K.cpu_kernels() is not None
needs_native = needs(native_available, f"the native kernels ({K.KERNEL_STATE['error']})")


def test_the_default_cpu_backend_is_the_native_one_where_it_can_be_built():
    """Where a compiler exists MoLFAdamW steps through the native kernels by default; without
    one it falls back to eager, which CI must not mistake for testing the default."""
    skip_unless(native_available, f"the native kernels ({K.KERNEL_STATE['error']})")
    model = molf.wrap(torch.nn.Sequential(torch.nn.Linear(8, 8)), molf.MoLFConfig(lora_ranks=(2,)))
    assert molf.MoLFAdamW(model).backend == "native"


def _spy(monkeypatch, cls, name):
    """Count the calls of cls.<name>."""
    calls = []
    orig = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        calls.append(name)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)
    return calls


def _with_score_reducer(monkeypatch, reducer):
    """Every MoLFAdamW built from now on gets `reducer` as its score_reducer."""
    orig_init = molf.MoLFAdamW.__init__

    def init(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        self.score_reducer = reducer

    monkeypatch.setattr(molf.MoLFAdamW, "__init__", init)


@needs_native
@pytest.mark.parametrize("two_phase", [False, True], ids=["fused", "score_reducer"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_native_kernels_match_the_float64_oracle(monkeypatch, case, two_phase):
    monkeypatch.setenv("MOLF_OPTIMIZER_BACKEND", "native")
    reduced = []
    if two_phase:  # the distributed path: all totals pass the reducer before any decision
        _with_score_reducer(monkeypatch, lambda t: reduced.append(t.shape) or t.clone())
    eager_steps = _spy(monkeypatch, EagerBackend, "step")
    native_steps = _spy(monkeypatch, NativeBackend, "step")
    check_against_oracle(*case)
    assert not eager_steps and len(native_steps) == 8
    assert len(reduced) == (8 if two_phase else 0)


def _twin_runs(model, steps, **kwargs):
    """A copy of `model` stepped by each backend on the same gradients."""
    models = {b: copy.deepcopy(model) for b in ("native", "eager")}
    opts = {b: molf.MoLFAdamW(m, backend=b, **kwargs) for b, m in models.items()}
    step_on_random_grads([(models[b], opts[b]) for b in models], steps)
    return models, opts


@needs_native
@pytest.mark.parametrize(
    "dtype,moments,atol,moment_rtol",
    [
        (torch.float32, "float32", 1e-6, 1e-5),
        (torch.bfloat16, "float32", 2e-2, 1e-5),
        (torch.bfloat16, "param", 2e-2, 3e-2),
        (torch.float16, "float32", 2e-3, 1e-5),
    ],
)
def test_native_equals_eager_in_every_supported_dtype(dtype, moments, atol, moment_rtol):
    # Low-precision parameters: eager rounds after the decay and after the step, the kernels
    # once, so the two differ by about an ulp; routing must agree everywhere.
    model = molf.wrap(
        tiny_causal_lm("qwen2", dtype=dtype),
        molf.MoLFConfig(lora_ranks=(2, 4), lora_dropout=0.0),
    )
    models, opts = _twin_runs(model, 4, lr_fft=1e-3, lr_lora=1e-3, moments_dtype=moments)
    nat, eag = opts["native"], opts["eager"]
    assert nat.backend == "native" and eag.backend == "eager"
    for rn, re in zip(nat.routing_log.records, eag.routing_log.records):
        assert torch.equal(rn["winners"], re["winners"])
        torch.testing.assert_close(rn["scores"], re["scores"], rtol=max(moment_rtol, 1e-4), atol=0)
    assert torch.equal(nat.win_counts(), eag.win_counts())
    assert (nat.win_counts().sum(dim=0) > 0).all()  # every expert won somewhere
    for (name, p), q in zip(models["native"].named_parameters(), models["eager"].parameters()):
        torch.testing.assert_close(p.float(), q.float(), rtol=0, atol=atol, msg=name)
        if p.requires_grad:
            for key in ("exp_avg", "exp_avg_sq"):
                mn, me = nat.state[p][key], eag.state[q][key]
                assert mn.dtype == me.dtype
                torch.testing.assert_close(mn.float(), me.float(), rtol=moment_rtol, atol=1e-12)


@needs_native
def test_native_losers_are_bitwise_untouched_and_nan_scores_win_like_torch():
    model = molf.wrap(tiny_causal_lm("llama"), molf.MoLFConfig(lora_ranks=(4,), lora_dropout=0.0))
    opt = molf.MoLFAdamW(model, lr_fft=1e-3, lr_lora=3e-3, backend="native")
    x = torch.randint(0, 96, (2, 10))
    model(x, labels=x).loss.backward()
    q = model.model.layers[0].self_attn.q_proj
    q.lora_B[0].grad[0, 0] = float("nan")  # the LoRA expert of q_proj scores NaN
    before = {id(p): p.detach().clone() for p in model.parameters()}
    opt.step()
    winners = opt.routing_log.records[-1]["winners"]
    assert winners[opt.module_names.index("model.layers.0.self_attn.q_proj")].tolist() == [
        False,
        True,
    ]  # torch.argmax also ranks NaN first
    for mi, m in enumerate(molf.molf_modules(model).values()):
        for e, params in enumerate(m.experts()):
            for p in params:
                if not winners[mi, e]:
                    assert torch.equal(p.detach(), before[id(p)])
                else:
                    assert not torch.equal(p.detach(), before[id(p)])


@needs_native
def test_score_reducer_sees_all_totals_before_any_decision():
    model = molf.wrap(tiny_causal_lm("llama"), molf.MoLFConfig(lora_ranks=(4,), lora_dropout=0.0))
    opt = molf.MoLFAdamW(model, lr_fft=1e-3, lr_lora=1e-6, backend="native")
    seen = []

    def reducer(totals):  # what an all-reduce would return if another rank saw LoRA moments
        seen.append(totals.clone())
        return totals * torch.tensor([0.0, 1.0], dtype=totals.dtype)

    opt.score_reducer = reducer
    x = torch.randint(0, 96, (2, 10))
    model(x, labels=x).loss.backward()
    opt.step()
    assert seen[0].shape == (len(opt.module_names), 2) and seen[0].dtype == torch.float64
    assert (seen[0][:, 0] > 0).all()  # the FFT expert has moments, its total is zeroed anyway
    assert opt.win_counts()[:, 1].tolist() == [1] * len(opt.module_names)


@needs_native
def test_state_dicts_move_between_backends(tmp_path):
    model = molf.wrap(tiny_causal_lm("llama"), molf.MoLFConfig(lora_ranks=(4,), lora_dropout=0.0))
    kwargs = {"lr_fft": 2e-3, "lr_lora": 4e-3}
    native = molf.MoLFAdamW(model, backend="native", **kwargs)
    step_on_random_grads([(model, native)], 3)
    torch.save(native.state_dict(), tmp_path / "state.pt")
    twin = copy.deepcopy(model)
    eager = molf.MoLFAdamW(twin, backend="eager", **kwargs)
    eager.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    step_on_random_grads([(model, native), (twin, eager)], 3, seed=1)
    assert eager.routing_log.records[0]["step"] == 4
    assert torch.equal(eager.win_counts(), native.win_counts())
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    # and back: a native optimizer continues an eager state
    back = molf.MoLFAdamW(copy.deepcopy(twin), backend="native", **kwargs)
    back.load_state_dict(eager.state_dict())
    assert torch.equal(back.win_counts(), eager.win_counts())


@needs_native
def test_gradless_tensors_of_an_active_module_and_inactive_modules():
    net = nn.ModuleDict({"a": nn.Linear(4, 6), "b": nn.Linear(4, 6)})
    molf.wrap(net, molf.MoLFConfig(lora_ranks=(2,), lora_dropout=0.0))
    twins = {b: copy.deepcopy(net) for b in ("native", "eager")}
    for backend, m in twins.items():
        opt = molf.MoLFAdamW(m, lr_fft=1e-2, lr_lora=1e-2, backend=backend)
        for _ in range(2):  # only W of module a has a gradient: a is active, b is not
            m["a"].base_layer.weight.grad = torch.ones_like(m["a"].base_layer.weight)
            opt.step()
        assert opt.routing_log.records[-1]["active"].tolist() == [True, False]
        # a tensor without a gradient is skipped, as torch's AdamW skips it: no moments, no step
        assert "step" not in opt.state.get(m["a"].lora_B[0], {})
        assert opt.state[m["a"].base_layer.weight]["step"].item() == 2.0
        assert not opt.state[m["b"].base_layer.weight]
        # the LoRA expert has no gradient at all, so the FFT expert wins both steps
        assert opt.win_counts()[0].tolist() == [2, 0]
    for p, q in zip(twins["native"].parameters(), twins["eager"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@needs_native
def test_unsupported_layouts_step_eager_with_a_warning():
    model = molf.wrap(tiny_causal_lm("llama"), molf.MoLFConfig(lora_ranks=(4,), lora_dropout=0.0))
    twin = copy.deepcopy(model)
    opt = molf.MoLFAdamW(model, backend="native")
    ref = molf.MoLFAdamW(twin, backend="eager")
    x = torch.randint(0, 96, (2, 10))
    for m in (model, twin):
        m(x, labels=x).loss.backward()
        w = m.model.layers[0].mlp.up_proj.base_layer.weight
        w.grad = w.grad.t().contiguous().t()  # same values, transposed strides
    with pytest.warns(UserWarning, match="not a contiguous CPU tensor"):
        opt.step()
    ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_backend_choice_and_its_errors(monkeypatch):
    model = molf.wrap(nn.Sequential(nn.Linear(4, 4)), molf.MoLFConfig(lora_ranks=(2,)))
    monkeypatch.setenv("MOLF_OPTIMIZER_BACKEND", "eager")
    assert molf.MoLFAdamW(model).backend == "eager"
    monkeypatch.setenv("MOLF_OPTIMIZER_BACKEND", "fast")
    with pytest.raises(ValueError, match="MOLF_OPTIMIZER_BACKEND"):
        molf.MoLFAdamW(model)
    monkeypatch.delenv("MOLF_OPTIMIZER_BACKEND")
    with pytest.raises(ValueError, match="backend"):
        molf.MoLFAdamW(model, backend="triton")
    custom = Score("custom_test", lambda m, v, eps: m.sum(), lambda t, n, lr: t)
    molf.register_score(custom)
    try:
        assert molf.MoLFAdamW(model, score="custom_test").backend == "eager"
        with pytest.raises(ValueError, match="has no kernel"):
            molf.MoLFAdamW(model, score="custom_test", backend="native")
    finally:
        del SCORES["custom_test"]
    with pytest.raises(ValueError, match="Score.kernel"):
        Score("bad", custom.partial, custom.finalize, kernel="fast")


def test_kernels_that_cannot_be_built_fall_back_to_eager(monkeypatch, tmp_path):
    monkeypatch.setattr(K, "KERNEL_STATE", {"kernels": None, "error": None, "tried": False})
    monkeypatch.setenv("MOLF_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    assert K.cpu_kernels() is None
    assert K.KERNEL_STATE["error"]
    model = molf.wrap(nn.Sequential(nn.Linear(4, 4)), molf.MoLFConfig(lora_ranks=(2,)))
    assert molf.MoLFAdamW(model).backend == "eager"
    with pytest.raises(ValueError, match="could not be built"):
        molf.MoLFAdamW(model, backend="native")


def test_missing_kernel_source_falls_back_to_eager(monkeypatch, tmp_path):
    monkeypatch.setattr(K, "KERNEL_STATE", {"kernels": None, "error": None, "tried": False})
    monkeypatch.setattr(K, "KERNEL_SOURCE", tmp_path / "absent.cpp")
    K.kernel_source.cache_clear()
    try:
        assert K.cpu_kernels() is None
        assert "kernel source missing" in K.KERNEL_STATE["error"]
        model = molf.wrap(nn.Sequential(nn.Linear(4, 4)), molf.MoLFConfig(lora_ranks=(2,)))
        assert molf.MoLFAdamW(model).backend == "eager"
    finally:
        K.kernel_source.cache_clear()


@needs_native
def test_kernels_build_into_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(K, "KERNEL_STATE", {"kernels": None, "error": None, "tried": False})
    monkeypatch.setenv("MOLF_CACHE_DIR", str(tmp_path))
    assert K.cpu_kernels() is not None
    built = list((tmp_path / "kernels").glob("molf_kernels_*.so"))
    assert len(built) == 1
    assert K.cpu_kernels() is K.KERNEL_STATE["kernels"]  # built once per process


@pytest.mark.parametrize("batch", [1 << 24, 50, 1])
def test_kernel_partials_equal_the_formulas_in_any_batching(monkeypatch, batch):
    monkeypatch.setattr(F, "PARTIAL_BATCH_ELEMENTS", batch)
    g = torch.Generator().manual_seed(0)
    ms = [torch.randn(n, generator=g, dtype=torch.float64) for n in (3, 70, 1)]
    vs = [torch.rand(n, generator=g, dtype=torch.float64) for n in (3, 70, 1)]
    eps = 1e-3
    formulas = {  # docs/method.md section 3, written out
        "epd": lambda m, v: (m * m / (v.sqrt() + eps)).sum(),
        "pfn": lambda m, v: ((m / (v.sqrt() + eps)) ** 2).sum(),
    }
    assert set(formulas) == set(F.SCORE_KERNELS)
    for kernel, formula in formulas.items():
        expected = torch.stack([formula(m, v) for m, v in zip(ms, vs)])
        got = F.kernel_partials(kernel, ms, vs, eps)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
        score = SCORES[kernel]
        torch.testing.assert_close(score.partials(ms, vs, eps), got, rtol=1e-12, atol=0)
        torch.testing.assert_close(score.partial(ms[1], vs[1], eps), got[1], rtol=1e-12, atol=0)


@needs_native
def test_the_cpp_kernels_implement_exactly_the_python_score_kernels():
    kernels = K.cpu_kernels()
    assert sorted(kernels.score_ids) == sorted(F.SCORE_KERNELS)
    assert sorted(kernels.score_ids.values()) == list(range(len(F.SCORE_KERNELS)))


@needs_native
def test_kernel_args_are_filled_completely_and_unknown_kernel_ids_are_refused():
    names = [name for name, _ in K.KernelArgs._fields_]
    values = dict.fromkeys(names, 0)
    with pytest.raises(ValueError, match="missing \\['wins'\\]"):
        K.KernelArgs.filled({k: v for k, v in values.items() if k != "wins"})
    with pytest.raises(ValueError, match="unknown \\['winner'\\]"):
        K.KernelArgs.filled(values | {"winner": 0})
    args = K.KernelArgs.filled(values | {"kind": len(F.SCORE_KERNELS), "n_threads": 1})
    with pytest.raises(RuntimeError, match="unknown score kernel"):
        K.cpu_kernels().run(args)


def test_a_registered_backend_is_selectable_and_auto_tries_the_registry_in_order(monkeypatch):
    stepped = []

    class Recording(EagerBackend):
        name = "recording_test"

        @staticmethod
        def preferred_on(device):
            return True

        def step(self, settings):
            stepped.append(settings.slot_lrs)
            return super().step(settings)

    monkeypatch.setitem(BACKENDS, "recording_test", Recording)
    model = molf.wrap(nn.Sequential(nn.Linear(4, 4)), molf.MoLFConfig(lora_ranks=(2,)))
    opt = molf.MoLFAdamW(model, backend="recording_test", lr_fft=1e-3, lr_lora=2e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert opt.backend == "recording_test" and stepped == [(1e-3, 2e-3)]
    # "auto" takes the first registered backend that prefers the device and is available
    auto_first = {"recording_test": Recording, **BACKENDS}  # the same entries, this one first
    monkeypatch.setattr("molf.optim.backends.BACKENDS", auto_first)
    assert molf.MoLFAdamW(model).backend == "recording_test"
