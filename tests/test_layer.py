import pytest
import torch
from torch import nn

import molf
from molf.layer import MoLFLinear
from tests.conftest import tiny_causal_lm

ARCHS = ["llama", "qwen2", "gemma3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_wrapped_equals_base_at_init_and_merge_equals_wrapped(arch, tokens):
    model = tiny_causal_lm(arch).eval()
    with torch.no_grad():
        base_logits = model(tokens).logits.clone()
    molf.wrap(model, molf.MoLFConfig(lora_ranks=(4, 8), lora_dropout=0.0))
    wrapped = molf.molf_modules(model)
    assert len(wrapped) == 14  # 7 linears x 2 layers, lm_head excluded
    assert not any(n.endswith("lm_head") for n in wrapped)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, base_logits, rtol=0, atol=0)
        for m in wrapped.values():  # move away from the identity so that merging matters
            for b in m.lora_B:
                b.normal_(0, 0.05)
        wrapped_logits = model(tokens).logits.clone()
        assert not torch.allclose(wrapped_logits, base_logits)
    plain = molf.merge_and_unload(model)
    assert not molf.molf_modules(plain)
    assert all(type(m) is not MoLFLinear for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, wrapped_logits, rtol=1e-5, atol=1e-5)


def test_merged_model_reloads_with_plain_transformers(tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    model = molf.wrap(tiny_causal_lm("qwen2"), molf.MoLFConfig(lora_ranks=(4,)))
    with torch.no_grad():
        for m in molf.molf_modules(model).values():
            m.lora_B[0].normal_(0, 0.05)
    model.eval()
    with torch.no_grad():
        expected = model(tokens).logits.clone()
    molf.merge_and_unload(model).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_target_selection_by_names_regex_and_exclusion():
    model = tiny_causal_lm("llama")
    molf.wrap(model, molf.MoLFConfig(lora_ranks=(2,), target_modules=["q_proj", "v_proj"]))
    assert sorted({n.rsplit(".", 1)[-1] for n in molf.molf_modules(model)}) == ["q_proj", "v_proj"]

    model = tiny_causal_lm("llama")
    molf.wrap(model, molf.MoLFConfig(lora_ranks=(2,), target_modules=r".*layers\.1\.mlp\..*"))
    assert sorted(molf.molf_modules(model)) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]

    model = tiny_causal_lm("llama")
    molf.wrap(model, molf.MoLFConfig(lora_ranks=(2,), exclude_modules=("lm_head", "o_proj")))
    assert len(molf.molf_modules(model)) == 12

    model = tiny_causal_lm("llama")
    molf.wrap(model, molf.MoLFConfig(lora_ranks=(2,), exclude_modules=()))
    assert "lm_head" in molf.molf_modules(model)


class _NeoXLike(nn.Module):
    """A causal LM whose output layer is not called lm_head (GPT-NeoX's `embed_out`)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.embed_out = nn.Linear(8, 16, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.embed_out


def test_all_linear_leaves_the_output_layer_alone_whatever_its_name(recwarn):
    from transformers import BertConfig, BertLMHeadModel

    neox = molf.wrap(_NeoXLike(), molf.MoLFConfig(lora_ranks=(2,)))
    assert sorted(molf.molf_modules(neox)) == ["layers.0", "layers.1"]
    bert = BertLMHeadModel(
        BertConfig(
            vocab_size=32,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            is_decoder=True,
        )
    )
    molf.wrap(bert, molf.MoLFConfig(lora_ranks=(2,)))
    wrapped = molf.molf_modules(bert)
    assert "cls.predictions.decoder" not in wrapped  # its get_output_embeddings()
    assert "cls.predictions.transform.dense" in wrapped and len(wrapped) == 7
    assert not [w for w in recwarn if "left" in str(w.message)]  # not listed as unwrapped
    # clearing the exclusions, or naming the layer, still wraps it
    assert "embed_out" in molf.molf_modules(
        molf.wrap(_NeoXLike(), molf.MoLFConfig(lora_ranks=(2,), exclude_modules=()))
    )
    named = molf.MoLFConfig(lora_ranks=(2,), target_modules=["embed_out"])
    assert list(molf.molf_modules(molf.wrap(_NeoXLike(), named))) == ["embed_out"]


def test_no_match_is_a_clear_error():
    with pytest.raises(ValueError, match="target_modules"):
        molf.wrap(tiny_causal_lm("llama"), molf.MoLFConfig(target_modules=["nope"]))


def test_plain_module_tree_and_scalings():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    cfg = molf.MoLFConfig(lora_ranks=(4, 16), lora_alphas=(8, 8))
    molf.wrap(net, cfg)
    assert isinstance(net[0], MoLFLinear) and isinstance(net[2], MoLFLinear)
    assert net[0].scalings == pytest.approx((8 / 2, 8 / 4))  # rsLoRA: alpha / sqrt(r)
    classic = molf.MoLFConfig(lora_ranks=(4, 16), lora_alphas=(8, 8), use_rslora=False)
    assert classic.scalings == pytest.approx((2.0, 0.5))
    # PEFT init: A kaiming-uniform(a=sqrt(5)) => |A| <= 1/sqrt(fan_in); B = 0
    a = net[2].lora_A[1]
    assert a.abs().max() <= 1 / 8**0.5 + 1e-7 and a.std() > 0
    assert all(float(b.detach().abs().sum()) == 0 for b in net[2].lora_B)


def test_molf_e_freezes_base_and_non_wrapped():
    model = molf.wrap(tiny_causal_lm("llama"), molf.MoLFConfig(lora_ranks=(2, 4), train_base=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    keep = molf.wrap(
        tiny_causal_lm("llama"),
        molf.MoLFConfig(lora_ranks=(2,), train_base=False, freeze_non_wrapped=False),
    )
    names = [n for n, p in keep.named_parameters() if p.requires_grad]
    assert "model.embed_tokens.weight" in names
    assert not any(n.endswith("base_layer.weight") for n in names)


def test_dropout_sample_is_shared_by_experts():
    torch.manual_seed(0)
    layer = MoLFLinear(nn.Linear(6, 5), molf.MoLFConfig(lora_ranks=(3, 3), lora_dropout=0.5))
    with torch.no_grad():
        for b in layer.lora_B:  # nonzero B, so that every expert's path shows in the output
            b.normal_()
    seen = []
    layer.dropout.register_forward_hook(lambda mod, inp, out: seen.append(out))
    layer.train()
    x = torch.randn(2, 6)
    y = layer(x)
    assert len(seen) == 1  # one dropout sample feeds every LoRA expert
    dropped = seen[0]
    assert not torch.equal(dropped, x)  # the sample really dropped (and rescaled) something
    # by hand: the base layer on x, each expert on the one dropped sample, scaled
    expected = layer.base_layer(x)
    for a, b, s in zip(layer.lora_A, layer.lora_B, layer.scalings):
        expected = expected + s * (dropped @ a.T) @ b.T
    torch.testing.assert_close(y, expected)
    # an expert fed the undropped x would give another output
    wrong = layer.base_layer(x) + layer.scalings[0] * (x @ layer.lora_A[0].T) @ layer.lora_B[0].T
    wrong = wrong + layer.scalings[1] * (dropped @ layer.lora_A[1].T) @ layer.lora_B[1].T
    assert not torch.allclose(y, wrong)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_generate_and_gradient_checkpointing(arch, tokens):
    model = molf.wrap(tiny_causal_lm(arch, dtype=torch.bfloat16), molf.MoLFConfig(lora_ranks=(4,)))
    model.gradient_checkpointing_enable()
    model.train()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    m = next(iter(molf.molf_modules(model).values()))
    assert m.lora_B[0].grad is not None and m.lora_B[0].grad.dtype == torch.bfloat16
    assert m.base_layer.weight.grad is not None
    opt = molf.MoLFAdamW(model, lr_fft=1e-3, lr_lora=1e-3)
    opt.step()
    assert opt.state[m.lora_B[0]]["exp_avg"].dtype == torch.float32
    model.eval()
    out = model.generate(tokens[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7) and torch.equal(out[:, :4], tokens[:1, :4])
    # greedy generation is the argmax of the wrapped model's own logits, token by token
    with torch.no_grad():
        for k in range(4, 7):
            step = model(out[:, :k]).logits[:, -1].float()
            assert int(step.argmax(-1)) == int(out[0, k])
