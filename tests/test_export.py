import json

import pytest
import torch
from peft import PeftModel

import molf
from tests.conftest import tiny_causal_lm


@pytest.mark.parametrize("arch,targets", [("llama", "all-linear"), ("qwen2", ["q_proj", "v_proj"])])
def test_peft_export_round_trip(tmp_path, tokens, arch, targets):
    model = molf.wrap(
        tiny_causal_lm(arch),
        molf.MoLFConfig(lora_ranks=(2, 6), train_base=False, target_modules=targets),
    )
    opt = molf.MoLFAdamW(model, lr_lora=1e-2)
    for _ in range(3):
        model(tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(tokens).logits.clone()
        untouched = tiny_causal_lm(arch).eval()(tokens).logits
    assert not torch.allclose(expected, untouched, atol=1e-4)  # training changed the model

    out = molf.export_peft_lora(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is False
    assert cfg["modules_to_save"] is None
    if targets != "all-linear":
        assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]

    peft_model = PeftModel.from_pretrained(tiny_causal_lm(arch), out).eval()
    with torch.no_grad():
        got = peft_model(tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left behind


def test_peft_export_refuses_trained_base(tmp_path):
    model = molf.wrap(tiny_causal_lm("llama"), molf.MoLFConfig(lora_ranks=(4,)))
    with pytest.raises(
        molf.MoLFError, match="export_peft_lora is for frozen-base models .*merge_and_unload"
    ):
        molf.export_peft_lora(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    emb = molf.wrap(
        tiny_causal_lm("llama"),
        molf.MoLFConfig(lora_ranks=(4,), train_base=False, freeze_non_wrapped=False),
    )
    with pytest.raises(ValueError, match="embed_tokens"):
        molf.export_peft_lora(emb, tmp_path / "b")
