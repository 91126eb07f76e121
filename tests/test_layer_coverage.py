"""Layer types beyond nn.Linear: GPT-2's Conv1D, tied lm_heads, refused and unwrapped types."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import molf
from tests.conftest import VOCAB, tiny_causal_lm


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer random GPT-2: its attention and MLP are transformers Conv1D (W stored [in, out]),
    its lm_head is tied to the token embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0
    )
    config.eos_token_id = 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config).eval()


def tied_llama(seed: int = 0) -> nn.Module:
    model = tiny_causal_lm("llama", seed, tie_word_embeddings=True).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _perturb(model: nn.Module) -> None:
    """Move every LoRA expert away from B = 0, so that merging and exporting matter."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(3)
        for m in molf.molf_modules(model).values():
            for b in m.lora_B:
                b.normal_(0, 0.1)


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.clone()


def _molf_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith(("molf.", "merge_"))]


# -- transformers Conv1D (GPT-2) -------------------------------------------------------------------
def test_conv1d_forward_merge_and_peft_export_are_exact(tmp_path, tokens):
    from peft import PeftModel

    from molf.layer import MoLFLinear

    model = tiny_gpt2()
    base = _logits(model, tokens)
    cfg = molf.MoLFConfig(lora_ranks=(2, 6), train_base=False, lora_dropout=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        molf.wrap(model, cfg)
    assert _molf_warnings(caught) == []  # every weight of GPT-2 but embeddings/norms is wrapped
    wrapped = molf.molf_modules(model)
    assert sorted({n.rsplit(".", 1)[-1] for n in wrapped}) == ["c_attn", "c_fc", "c_proj"]
    assert len(wrapped) == 8
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, MoLFLinear) and c_attn.kind.fan_in_fan_out
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)  # W is stored [32, 96]
    assert c_attn.lora_A[0].shape == (2, 32) and c_attn.lora_B[0].shape == (96, 2)
    torch.testing.assert_close(_logits(model, tokens), base, rtol=0, atol=0)

    _perturb(model)
    expected = _logits(model, tokens)
    assert not torch.allclose(expected, base, atol=1e-3)
    # the LoRA term is x A^T B^T, whatever the layout of W: check one layer by hand
    x = torch.randn(3, 32)
    by_hand = x @ c_attn.base_layer.weight + c_attn.base_layer.bias
    for s, a, b in zip(c_attn.scalings, c_attn.lora_A, c_attn.lora_B):
        by_hand = by_hand + s * (x @ a.t() @ b.t())
    with torch.no_grad():
        torch.testing.assert_close(c_attn(x), by_hand)

    out = molf.export_peft_lora(model, tmp_path / "adapter", base_model_name_or_path="gpt2")
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["fan_in_fan_out"] is True
    assert adapter_config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(tiny_gpt2(), out).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    torch.testing.assert_close(_logits(peft_model, tokens), expected, rtol=1e-5, atol=1e-5)

    plain = molf.merge_and_unload(model)
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(_logits(plain, tokens), expected, rtol=1e-5, atol=1e-5)


def test_conv1d_molf_trains_its_fft_expert_and_merges(tokens):
    model = molf.wrap(tiny_gpt2(), molf.MoLFConfig(lora_ranks=(4,), lora_dropout=0.0))
    w0 = model.transformer.h[0].attn.c_attn.base_layer.weight.detach().clone()
    opt = molf.MoLFAdamW(model, lr_fft=1e-2, lr_lora=1e-2)
    model.train()
    for _ in range(3):
        model(tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert opt.win_counts().sum() > 0
    w = model.transformer.h[0].attn.c_attn.base_layer.weight
    assert w.shape == w0.shape == (32, 96)
    expected = _logits(model, tokens)
    plain = molf.merge_and_unload(model)
    torch.testing.assert_close(_logits(plain, tokens), expected, rtol=1e-5, atol=1e-5)


# -- tied lm_head ----------------------------------------------------------------------------------
def test_merge_unties_a_wrapped_lm_head_shared_with_the_embeddings(tmp_path, tokens):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tied_llama()
    embeddings = model.model.embed_tokens.weight.detach().clone()
    # alpha 16 (s = 8 at rank 4) as when this tolerance was set: the default 32 doubles the
    # perturbed update and with it the float32 rounding gap between peft's and molf's sums
    cfg = molf.MoLFConfig(
        lora_ranks=(4,), lora_alphas=(16,), train_base=False, exclude_modules=(), lora_dropout=0.0
    )
    molf.wrap(model, cfg)
    assert "lm_head" in molf.molf_modules(model)
    assert molf.layer.shared_base_weights(model) == {"lm_head": ["model.embed_tokens.weight"]}
    _perturb(model)
    expected = _logits(model, tokens)
    # peft applies the exported lm_head adapter on top of the tied matrix, leaving it tied
    adapter = molf.export_peft_lora(model, tmp_path / "adapter", base_model_name_or_path="x")
    peft_model = PeftModel.from_pretrained(tied_llama(), adapter).eval()
    torch.testing.assert_close(_logits(peft_model, tokens), expected, rtol=1e-5, atol=1e-5)

    with pytest.warns(UserWarning, match=r"untied 'lm_head' with model\.embed_tokens\.weight"):
        plain = molf.merge_and_unload(model)
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight
    assert plain.config.tie_word_embeddings is False
    assert torch.equal(plain.model.embed_tokens.weight, embeddings)  # the lookup did not change
    torch.testing.assert_close(_logits(plain, tokens), expected, rtol=1e-5, atol=1e-5)

    plain.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    torch.testing.assert_close(_logits(reloaded, tokens), expected, rtol=1e-5, atol=1e-5)


def test_molf_on_a_tied_lm_head_routes_the_shared_matrix_once(tokens):
    """Under MoLF the FFT expert of a tied lm_head is the embedding matrix itself: it is in the
    optimizer once (routed, never also stepped as a plain parameter), and the embeddings move
    exactly when the FFT expert wins on lm_head."""
    model = tied_llama()
    with pytest.warns(UserWarning, match=r"'lm_head' shares its weight with model\.embed_tokens"):
        molf.wrap(model, molf.MoLFConfig(lora_ranks=(4,), exclude_modules=(), lora_dropout=0.0))
    shared = model.model.embed_tokens.weight
    assert model.lm_head.base_layer.weight is shared
    model.train()

    def run(**lrs: float) -> tuple[molf.MoLFAdamW, torch.Tensor]:
        opt = molf.MoLFAdamW(model, lr_other=1e-2, **lrs)
        listed = [p for g in opt.param_groups for p in g["params"]]
        assert sum(p is shared for p in listed) == 1
        assert len({id(p) for p in listed}) == len(listed)
        before = shared.detach().clone()
        for _ in range(2):
            model(tokens, labels=tokens).loss.backward()
            opt.step()
            opt.zero_grad()
        return opt, before

    # lr_fft = 0 gives the FFT expert a zero score: the LoRA expert wins on lm_head, and the
    # embeddings stay put although plain parameters (norms) train at lr_other.
    norm = model.model.norm.weight.detach().clone()
    opt, before = run(lr_fft=0.0, lr_lora=1e-2)
    head = opt.module_names.index("lm_head")
    assert (opt.routing_log.winner_indices()[:, head] == 1).all()
    assert torch.equal(shared, before)
    assert not torch.equal(model.model.norm.weight, norm)

    opt, before = run(lr_fft=1e-2, lr_lora=0.0)
    assert (opt.routing_log.winner_indices()[:, head] == 0).all()
    assert not torch.equal(shared, before)
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight


def test_molf_e_on_a_tied_lm_head_keeps_the_embeddings_frozen():
    cfg = molf.MoLFConfig(
        lora_ranks=(4,), train_base=False, freeze_non_wrapped=False, exclude_modules=()
    )
    with pytest.warns(UserWarning, match="stays frozen with the base"):
        model = molf.wrap(tied_llama(), cfg)
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.model.norm.weight.requires_grad
    with warnings.catch_warnings(record=True) as caught:  # frozen either way: nothing to say
        warnings.simplefilter("always")
        molf.wrap(
            tied_llama(), molf.MoLFConfig(lora_ranks=(4,), train_base=False, exclude_modules=())
        )
    assert _molf_warnings(caught) == []


# -- refused and unwrapped types -------------------------------------------------------------------
class ScaledLinear(nn.Linear):
    """An nn.Linear subclass molf does not know (its forward may use the weight differently)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_no_match_names_the_types_the_patterns_matched():
    with pytest.raises(molf.MolfError, match=r"\['mlp'\].*it matched 2 LlamaMLP"):
        molf.wrap(tiny_causal_lm("llama"), molf.MoLFConfig(target_modules=["mlp"]))
    with pytest.raises(molf.MolfError, match="it matched no module"):
        molf.wrap(tiny_causal_lm("llama"), molf.MoLFConfig(target_modules=["nope"]))
    with pytest.raises(molf.MolfError, match=r"all-linear.*it matched 1 Conv2d"):
        molf.wrap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), molf.MoLFConfig())


def test_named_unsupported_types_are_refused_not_skipped():
    net = nn.Sequential(nn.Linear(4, 8), ScaledLinear(8, 8), nn.Linear(8, 2))
    before = [type(m) for m in net]
    with pytest.raises(
        molf.MolfError, match=r"matches '1', a ScaledLinear, which molf cannot wrap"
    ):
        molf.wrap(net, molf.MoLFConfig(target_modules=r"\d"))
    assert [type(m) for m in net] == before  # nothing half-wrapped
    molf.wrap(net, molf.MoLFConfig(target_modules=r"\d", exclude_modules=("1",)))
    assert sorted(molf.molf_modules(net)) == ["0", "2"]

    # torch's MultiheadAttention reads out_proj.weight without calling out_proj: not wrappable
    mha = nn.Module()
    mha.attn = nn.MultiheadAttention(8, 2)
    with pytest.raises(molf.MolfError, match="NonDynamicallyQuantizableLinear"):
        molf.wrap(mha, molf.MoLFConfig(target_modules=["out_proj"]))


def test_all_linear_warns_about_weights_it_left_unwrapped():
    net = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), ScaledLinear(8, 8), nn.LayerNorm(8))
    net.head = nn.Linear(8, 10)
    with pytest.warns(
        UserWarning,
        match=r"left 1 weight tensors unwrapped.*: 2\.weight \[8, 8\] \(ScaledLinear, trainable\)\.",
    ):
        molf.wrap(net, molf.MoLFConfig(exclude_modules=("head",)))
    assert sorted(molf.molf_modules(net)) == ["1"]


def test_all_linear_lists_fused_moe_experts():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MixtralForCausalLM(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        molf.wrap(model, molf.MoLFConfig(lora_ranks=(4,), train_base=False))
    (message,) = _molf_warnings(caught)
    assert "left 6 weight tensors unwrapped" in message
    assert (
        "model.layers.*.mlp.experts.gate_up_proj [4, 96, 32] (MixtralExperts, frozen) x2" in message
    )
    assert "model.layers.*.mlp.experts.down_proj [4, 32, 48] (MixtralExperts, frozen) x2" in message
    assert "model.layers.*.mlp.gate.weight [4, 32]" in message
    assert "embed_tokens" not in message and "lm_head" not in message and "norm" not in message
    assert len(molf.molf_modules(model)) == 8  # q, k, v, o in two layers


def test_import_molf_imports_neither_transformers_nor_bitsandbytes():
    code = (
        "import sys, molf; "
        "print(sorted(m for m in ('transformers', 'bitsandbytes', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
