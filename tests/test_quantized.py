"""MoLF-E on a quantized, frozen base (QLoRA-style): bitsandbytes 4-bit (NF4) and 8-bit linears.

The dispatch is tested everywhere with stand-in classes registered under bitsandbytes' module
name; the real bitsandbytes tests (its CPU backend) skip where it is not installed.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

import molf
from tests.conftest import VOCAB, needs, tiny_causal_lm

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


# -- dispatch, with stand-ins (no bitsandbytes needed) -------------------------------------------
@pytest.fixture
def fake_bnb(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A `bitsandbytes.nn` whose Linear4bit / Linear8bitLt are plain-float nn.Linear subclasses:
    molf must dispatch on the type, whatever the weight holds."""
    fake = types.ModuleType("bitsandbytes.nn")
    fake.Linear4bit = type("Linear4bit", (nn.Linear,), {})
    fake.Linear8bitLt = type("Linear8bitLt", (nn.Linear,), {})
    monkeypatch.setitem(sys.modules, "bitsandbytes.nn", fake)
    return fake


def _swap_linears(model: nn.Module, cls: type, names: tuple[str, ...]) -> nn.Module:
    """Replace the linears called `names` by `cls` layers with the same weights."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in names:
            new = cls(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                dtype=module.weight.dtype,
            )
            new.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model


@pytest.mark.parametrize("kind", ["Linear4bit", "Linear8bitLt"])
def test_quantized_layers_take_molf_e_and_refuse_molf(fake_bnb, kind, tokens, tmp_path):
    cls = getattr(fake_bnb, kind)
    model = _swap_linears(tiny_causal_lm("llama", dtype=torch.bfloat16), cls, ("q_proj", "v_proj"))
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(molf.MolfError, match=f"bitsandbytes {kind}.*cannot be fully fine-tuned"):
        molf.wrap(model, molf.MoLFConfig(lora_ranks=(4,)))  # MoLF trains W: refused
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing half-wrapped
    with pytest.raises(molf.MolfError, match="cannot be fully fine-tuned"):
        molf.MoLFLinear(cls(4, 4), molf.MoLFConfig(lora_ranks=(2,)))

    molf.wrap(model, molf.MoLFConfig(lora_ranks=(2, 4), train_base=False))
    wrapped = molf.molf_modules(model)
    assert len(wrapped) == 14  # the quantized q/v and the plain k/o/gate/up/down
    q = wrapped["model.layers.0.self_attn.q_proj"]
    assert type(q.base_layer) is cls and q.kind.quantized
    assert all(p.dtype == torch.float32 for e in q.lora_experts() for p in e)  # as peft does
    k = wrapped["model.layers.0.self_attn.k_proj"]
    assert not k.kind.quantized and k.lora_A[0].dtype == torch.bfloat16

    opt = molf.MoLFAdamW(model, lr_lora=1e-2)
    model.train()
    model(tokens, labels=tokens).loss.backward()
    opt.step()
    assert opt.win_counts().sum() == 14
    with pytest.raises(molf.MolfError, match=f"'model.layers.0.self_attn.q_proj' .*{kind}"):
        molf.merge_and_unload(model)
    assert molf.molf_modules(model)  # the refusal changed nothing
    molf.export_peft_lora(model, tmp_path / "adapter")


# -- the real bitsandbytes, on its CPU backend ----------------------------------------------------
needs_bnb = needs(HAS_BNB, "bitsandbytes (extra 'quant')")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Llama saved to disk, 64 wide: bitsandbytes' CPU inference kernel repacks 4-bit
    weights in blocks of 64 input features and fails on narrower layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    return path


def load_quantized(path, bits: int = 4) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant, device_map="cpu", dtype=torch.float32
    )


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.clone()


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_molf_e_on_a_bitsandbytes_base_routes_and_exports_to_peft(base_dir, tmp_path, tokens, bits):
    from peft import PeftModel

    model = load_quantized(base_dir, bits)
    packed = {n: m.weight.detach().clone() for n, m in model.named_modules() if "proj" in n}
    assert {p.dtype for p in packed.values()} == {torch.uint8 if bits == 4 else torch.int8}
    with pytest.raises(molf.MolfError, match="cannot be fully fine-tuned"):
        molf.wrap(model, molf.MoLFConfig(lora_ranks=(4,)))

    torch.manual_seed(0)  # the experts' init (it was unseeded, and the test flaky)
    molf.wrap(model, molf.MoLFConfig(lora_ranks=(2, 4), train_base=False, lora_dropout=0.0))
    wrapped = molf.molf_modules(model)
    assert len(wrapped) == 14
    expected_type = "Linear4bit" if bits == 4 else "Linear8bitLt"
    assert {type(m.base_layer).__name__ for m in wrapped.values()} == {expected_type}
    opt = molf.MoLFAdamW(model, lr_lora=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert min(losses[1:]) < losses[0]  # at lr 1e-2 later steps oscillate; the first one helps
    assert len(opt.routing_log) == 4 and opt.win_counts().sum() == 4 * 14
    for name, weight in packed.items():  # the base stayed quantized and untouched
        assert torch.equal(model.get_submodule(name).weight, weight), name

    # Compared in train mode (no dropout): in eval mode bitsandbytes' CPU backend switches 4-bit
    # layers to a bfloat16 kernel, whose rounding would blur an exact comparison.
    expected = _logits(model, tokens)
    with pytest.raises(molf.MolfError, match="export_peft_lora"):
        molf.merge_and_unload(model)
    out = molf.export_peft_lora(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    fresh = load_quantized(base_dir, bits).train()
    assert not torch.allclose(_logits(fresh, tokens), expected, atol=1e-3)
    peft_model = PeftModel.from_pretrained(fresh, out).train()
    assert type(
        peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    ).__name__ == (expected_type)
    torch.testing.assert_close(_logits(peft_model, tokens), expected, rtol=1e-4, atol=1e-4)


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_from_pretrained_rebuilds_a_quantized_base(base_dir, tmp_path, tokens, bits):
    """A MoLF-E save on a 4-/8-bit base reloads with the same quantized layers and tensors:
    logits bit for bit, the same parameters trainable, and routed training continues."""
    import json

    model = load_quantized(base_dir, bits)
    torch.manual_seed(0)
    molf.wrap(model, molf.MoLFConfig(lora_ranks=(2, 4), train_base=False, lora_dropout=0.0))
    opt = molf.MoLFAdamW(model, lr_lora=1e-2)
    model.train()
    for _ in range(2):
        model(tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    expected = _logits(model, tokens)  # train mode: see the test above
    molf.save_pretrained(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "molf_config.json").read_text())["dtype"] == "float32"

    again = molf.from_pretrained(tmp_path / "saved").train()
    kind = "Linear4bit" if bits == 4 else "Linear8bitLt"
    wrapped = molf.molf_modules(again)
    assert {type(m.base_layer).__name__ for m in wrapped.values()} == {kind}
    assert torch.equal(_logits(again, tokens), expected)
    trainable = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    opt = molf.MoLFAdamW(again, lr_lora=1e-2)
    again(tokens, labels=tokens).loss.backward()
    opt.step()
    assert opt.win_counts().sum() == len(wrapped)
    assert not torch.equal(_logits(again, tokens), expected)

    # a save from before quantized bases recorded their float dtype (it said the packed one)
    config = tmp_path / "saved" / "molf_config.json"
    info = json.loads(config.read_text())
    config.write_text(json.dumps(info | {"dtype": "uint8" if bits == 4 else "int8"}))
    assert torch.equal(_logits(molf.from_pretrained(tmp_path / "saved").train(), tokens), expected)
