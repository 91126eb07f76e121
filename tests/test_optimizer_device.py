"""The device backend (the default on accelerators), run on CPU: the float64 oracle, agreement with
eager in every dtype, no host read with the routing log off and only non-blocking copies with it
on (the meta device stands in for an accelerator), and operator calls that do not grow with the
number of tensors (the CPU proxy for kernel launches)."""

import contextlib
import copy
import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import molf
from benchmarks.common import count_host_reads, count_ops
from molf.optim.backends import choose_backend
from molf.optim.backends import device as D
from molf.optim.backends.device import DeviceBackend, chunked
from molf.optim.backends.eager import EagerBackend
from tests.conftest import tiny_causal_lm
from tests.optim_helpers import CASES, case_id, check_against_oracle, step_on_random_grads


@pytest.mark.parametrize("chunk", [D.CHUNK_ELEMENTS, 50], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_device_backend_matches_the_float64_oracle(monkeypatch, case, chunk):
    monkeypatch.setenv("MOLF_OPTIMIZER_BACKEND", "device")
    monkeypatch.setattr(D, "CHUNK_ELEMENTS", chunk)
    steps, eager = [], []
    step = DeviceBackend.step
    monkeypatch.setattr(DeviceBackend, "step", lambda self, s: steps.append(1) or step(self, s))
    monkeypatch.setattr(EagerBackend, "step", lambda self, s: eager.append(1))
    opt = check_against_oracle(*case)
    assert opt.backend == "device" and len(steps) == 8 and not eager


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("log", [False, True], ids=["log-off", "log-on"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_on_cuda_the_default_backend_matches_the_oracle_and_never_synchronises(case, log):
    # set_sync_debug_mode("error") raises on any synchronising CUDA call inside a step
    def no_sync():
        torch.cuda.set_sync_debug_mode("error")
        return contextlib.ExitStack().callback(torch.cuda.set_sync_debug_mode, "default")

    opt = check_against_oracle(*case, device="cuda", during_step=no_sync, log=log)
    assert opt.backend == "device"


def test_chunks_hold_at_most_the_limit_and_keep_the_order():
    assert chunked([3, 4, 2, 9, 1, 1], 6) == [[0], [1, 2], [3], [4, 5]]
    assert chunked([], 6) == []


@pytest.mark.parametrize(
    "dtype,moments,atol,score_rtol",
    [
        (torch.float32, "float32", 0, 0),
        (torch.bfloat16, "float32", 0, 0),
        (torch.float16, "float32", 0, 0),
        # bfloat16 moments: eager computes the update in bfloat16, the device backend in float32
        (torch.bfloat16, "param", 2e-2, 1e-2),
    ],
)
def test_device_equals_eager_in_every_dtype(dtype, moments, atol, score_rtol):
    model = molf.wrap(
        tiny_causal_lm("qwen2", dtype=dtype), molf.MoLFConfig(lora_ranks=(2, 4), lora_dropout=0.0)
    )
    models = {b: copy.deepcopy(model) for b in ("device", "eager")}
    opts = {
        b: molf.MoLFAdamW(m, backend=b, lr_fft=1e-3, lr_lora=1e-3, moments_dtype=moments)
        for b, m in models.items()
    }
    step_on_random_grads([(models[b], opts[b]) for b in models], 4)
    dev, eag = opts["device"], opts["eager"]
    for rd, re in zip(dev.routing_log.records, eag.routing_log.records, strict=True):
        assert torch.equal(rd["winners"], re["winners"])
        torch.testing.assert_close(rd["scores"], re["scores"], rtol=score_rtol, atol=0)
    assert torch.equal(dev.win_counts(), eag.win_counts())
    assert (dev.win_counts().sum(dim=0) > 0).all()  # every expert won somewhere
    for (name, p), q in zip(models["device"].named_parameters(), models["eager"].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=name)


def _meta_model():
    model = molf.wrap(tiny_causal_lm("qwen2"), molf.MoLFConfig(lora_ranks=(2, 4))).to("meta")
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    return model


def test_device_steps_never_read_the_device_and_log_without_blocking():
    # A meta tensor holds no values: count_host_reads answers every host read with zeros and
    # counts it, so a step on the meta device shows what it would make an accelerator wait for.
    model = _meta_model()
    quiet = molf.MoLFAdamW(model, log_routing=False, backend="device")
    with count_host_reads() as reads:
        quiet.step()
        quiet.step()
    assert reads.blocking == [] and reads.non_blocking == []
    anchor = model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert quiet.state[anchor]["wins"].device.type == "meta"  # counted on the device

    logged = molf.MoLFAdamW(model, backend="device")
    with count_host_reads() as reads:
        logged.step()
        logged.step()
    # winners, scores and the active mask of each step, copied without blocking
    assert reads.blocking == [] and len(reads.non_blocking) == 2 * 3
    with count_host_reads() as reads:
        records = logged.routing_log.records  # completes the last step's record
    assert [r["step"] for r in records] == [1, 2] and reads.blocking == []
    assert records[0]["winners"].shape == (len(logged.module_names), 3)


@pytest.mark.parametrize("log", [False, True], ids=["log-off", "log-on"])
def test_eager_reads_the_winners_once_per_step(log):
    opt = molf.MoLFAdamW(_meta_model(), log_routing=log, backend="eager")
    with count_host_reads() as reads:
        opt.step()
        opt.step()
    assert len(reads.blocking) == 2 and reads.non_blocking == []


def test_auto_picks_the_device_backend_on_an_accelerator():
    model = molf.wrap(tiny_causal_lm("llama"), molf.MoLFConfig(lora_ranks=(4,)))
    layout = molf.MoLFAdamW(model).layout
    score = molf.get_score("epd")
    on_gpu = dataclasses.replace(layout, device=torch.device("cuda"))
    assert choose_backend("auto", "backend", on_gpu, score) is DeviceBackend
    assert choose_backend("auto", "backend", layout, score) is not DeviceBackend  # CPU


def _llama(layers: int) -> torch.nn.Module:
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    return molf.wrap(LlamaForCausalLM(cfg), molf.MoLFConfig(lora_ranks=(4,), lora_dropout=0.0))


def _calls(backend: str, layers: int, log: bool) -> int:
    model = _llama(layers)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = molf.MoLFAdamW(model, backend=backend, log_routing=log)
    opt.step()  # builds the plan and the state
    return count_ops(opt.step)[0]


@pytest.mark.parametrize("log", [False, True], ids=["log-off", "log-on"])
def test_device_operator_calls_do_not_grow_with_the_tensor_count(log):
    # 1 and 4 layers: 7 and 28 wrapped linears, 21 and 84 routed tensors
    assert _calls("device", 1, log) == _calls("device", 4, log)
    # the count is sensitive: eager makes calls per tensor
    assert _calls("eager", 4, log) > _calls("eager", 1, log)


def test_a_new_state_or_active_set_rebuilds_the_plan():
    model = molf.wrap(tiny_causal_lm("llama"), molf.MoLFConfig(lora_ranks=(4,), lora_dropout=0.0))
    twin = copy.deepcopy(model)
    opt = molf.MoLFAdamW(model, backend="device", lr_fft=1e-3, lr_lora=2e-3)
    ref = molf.MoLFAdamW(twin, backend="eager", lr_fft=1e-3, lr_lora=2e-3)
    runs = [(model, opt), (twin, ref)]
    step_on_random_grads(runs, 2)
    opt.load_state_dict(opt.state_dict())  # new state tensors: the plan must follow them
    ref.load_state_dict(ref.state_dict())
    step_on_random_grads(runs, 2, seed=1)
    # only the first layer's q_proj has a gradient: one active module
    for m, o in runs:
        o.zero_grad()
        w = m.model.layers[0].self_attn.q_proj.base_layer.weight
        w.grad = torch.ones_like(w)
        o.step()
        o.zero_grad()
    assert opt.routing_log.records[-1]["active"].sum() == 1
    assert torch.equal(opt.win_counts(), ref.win_counts())
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
