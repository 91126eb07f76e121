"""Saving and reloading a wrapped, unmerged model (molf.saving) and the trainable summary."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import molf
from molf import saving
from molf.saving import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import VOCAB, tiny_causal_lm

MOLF = molf.MoLFConfig(lora_ranks=(8,))
MOLF_E = molf.MoLFConfig(lora_ranks=(4, 8), train_base=False)


@pytest.fixture(autouse=True)
def fresh_format_notice(monkeypatch):
    """Each test starts as a fresh process would: the format notice not yet given."""
    monkeypatch.setattr(saving, "_format_notice_given", False)


def batch(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (4, 12), generator=g)


def train_steps(model: nn.Module, opt: molf.MoLFAdamW, seeds: range) -> None:
    model.train()
    for seed in seeds:
        torch.manual_seed(seed)  # the same dropout masks for every model trained with these seeds
        ids = batch(seed)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def trained(arch: str, config: molf.MoLFConfig, steps: int = 3) -> nn.Module:
    model = molf.wrap(tiny_causal_lm(arch), config)
    train_steps(model, molf.MoLFAdamW(model, lr_fft=1e-2, lr_lora=1e-2), range(steps))
    return model


def logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch(99)).logits


@pytest.mark.parametrize(
    "arch, config",
    [("llama", MOLF), ("llama", MOLF_E), ("gemma3", MOLF), ("gemma3", MOLF_E)],
    ids=["llama-molf", "llama-molf-e", "gemma3-tied-molf", "gemma3-tied-molf-e"],
)
def test_reload_is_bitwise_and_routed_training_continues(tmp_path, arch, config):
    model = trained(arch, config)
    before = logits(model)
    molf.save_pretrained(model, tmp_path / "saved")
    loaded = molf.from_pretrained(tmp_path / "saved")

    assert type(loaded) is type(model) and loaded.molf_config == config
    assert list(molf.molf_modules(loaded)) == list(molf.molf_modules(model))
    assert torch.equal(logits(loaded), before)
    for (name, p), (name2, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert name == name2 and torch.equal(p, q) and p.requires_grad == q.requires_grad, name
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    # Continue training both with a fresh optimizer: the reloaded model routes and steps exactly
    # as the original does.
    opt_a = molf.MoLFAdamW(model, lr_fft=1e-2, lr_lora=1e-2)
    opt_b = molf.MoLFAdamW(loaded, lr_fft=1e-2, lr_lora=1e-2)
    train_steps(model, opt_a, range(3, 6))
    train_steps(loaded, opt_b, range(3, 6))
    assert torch.equal(opt_a.win_counts(), opt_b.win_counts())
    assert int(opt_b.win_counts().sum()) == 3 * len(molf.molf_modules(loaded))
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), name
    if not config.train_base:
        base = molf.from_pretrained(tmp_path / "saved")  # the base stayed frozen across the steps
        for name, m in molf.molf_modules(loaded).items():
            assert torch.equal(m.weight, molf.molf_modules(base)[name].weight)


def test_bfloat16_model_reloads_in_bfloat16(tmp_path):
    model = molf.wrap(tiny_causal_lm("qwen2", dtype=torch.bfloat16), MOLF_E)
    with torch.no_grad():
        for m in molf.molf_modules(model).values():
            for b in m.lora_B:
                b.normal_()
    before = logits(model)
    molf.save_pretrained(model, tmp_path)
    loaded = molf.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(logits(loaded), before)


def test_model_save_pretrained_writes_molf_format_that_plain_transformers_refuses(tmp_path):
    model = trained("llama", MOLF, steps=1)
    before = logits(model)
    out = tmp_path / "out"
    tiny_causal_lm("llama").save_pretrained(out)  # a plain checkpoint was saved there before
    (out / "notes.txt").write_text("kept")
    with pytest.warns(UserWarning, match="molf's format"):
        model.save_pretrained(out)
    assert not (out / "model.safetensors").exists()
    assert (out / "notes.txt").read_text() == "kept"
    assert json.loads((out / CONFIG_NAME).read_text())["format"] == "molf-wrapped"
    assert any(k.endswith("base_layer.weight") for k in load_file(out / WEIGHTS_NAME))
    # Plain transformers finds no weights it knows, so it refuses rather than loading a plain
    # model with randomly initialised linears...
    for loader in (AutoModelForCausalLM, LlamaForCausalLM):
        with pytest.raises(OSError, match="no file named model.safetensors"):
            loader.from_pretrained(out)
    # ... molf can.
    assert torch.equal(logits(molf.from_pretrained(out)), before)
    with pytest.raises(molf.MolfError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)


def test_the_format_notice_is_given_once_per_process(tmp_path):
    """Every Trainer checkpoint goes through save_pretrained, and model_init or a resumed run
    brings new wrapped models: the notice comes once, however many models and saves."""
    models = [trained("llama", MOLF, steps=1), trained("llama", MOLF_E, steps=1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            for j, model in enumerate(models):
                model.save_pretrained(tmp_path / f"checkpoint-{i}-{j}")
    notices = [w for w in caught if "molf's format" in str(w.message)]
    assert len(notices) == 1
    assert all((tmp_path / f"checkpoint-{i}-1" / CONFIG_NAME).is_file() for i in range(3))


def test_merged_model_saves_as_plain_transformers(tmp_path):
    model = trained("llama", MOLF, steps=1)
    before = logits(model)
    molf.merge_and_unload(model)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.allclose(logits(plain), before, atol=1e-5)


def test_copies_and_pickles_of_a_wrapped_model_save_themselves(tmp_path):
    model = trained("llama", MOLF_E, steps=1)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            next(iter(molf.molf_modules(clone).values())).lora_B[0].add_(1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the format notice: given once per process
            clone.save_pretrained(tmp_path / "clone")
        assert torch.equal(logits(molf.from_pretrained(tmp_path / "clone")), logits(clone))
        assert not torch.equal(logits(clone), logits(model))


def test_load_is_strict_and_names_what_differs(tmp_path):
    model = trained("llama", MOLF, steps=1)
    molf.save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "model.layers.0.self_attn.q_proj.lora_A.0"

    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(molf.MolfError, match=rf"missing {key}"):
        molf.from_pretrained(tmp_path)

    save_file({**tensors, "extra.weight": torch.zeros(1)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(molf.MolfError, match=r"unexpected extra\.weight"):
        molf.from_pretrained(tmp_path)

    save_file({**tensors, key: torch.zeros(3, 32)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(molf.MolfError, match=rf"{key} has shape \(3, 32\)"):
        molf.from_pretrained(tmp_path)

    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(molf.MolfError, match="already wrapped"):
        molf.load_wrapped(model, tmp_path)
    info = json.loads((tmp_path / CONFIG_NAME).read_text())
    info["molf_config"]["target_modules"] = ["q_proj"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(info))
    with pytest.raises(molf.MolfError, match="wraps other modules"):
        molf.from_pretrained(tmp_path)


def test_directories_that_are_not_molf_saves_are_refused(tmp_path):
    with pytest.raises(molf.MolfError, match="no such directory"):
        molf.from_pretrained(tmp_path / "absent")
    with pytest.raises(molf.MolfError, match="interrupted"):
        molf.from_pretrained(tmp_path)
    plain = tiny_causal_lm("llama")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(molf.MolfError, match="plain transformers checkpoint"):
        molf.from_pretrained(tmp_path / "plain")
    with pytest.raises(molf.MolfError, match="no MoLF modules"):
        molf.save_pretrained(plain, tmp_path / "x")


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 12)
        self.down = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_a_plain_torch_model_reloads_through_load_wrapped(tmp_path):
    torch.manual_seed(0)
    model = molf.wrap(TwoLayer(), molf.MoLFConfig(lora_ranks=(2,), lora_dropout=0.0))
    with torch.no_grad():
        model.up.lora_B[0].normal_()
    x = torch.randn(3, 6)
    molf.save_pretrained(model, tmp_path)
    with pytest.raises(molf.MolfError, match="load_wrapped"):
        molf.from_pretrained(tmp_path)
    loaded = molf.load_wrapped(TwoLayer(), tmp_path)
    assert torch.equal(loaded(x), model(x))


def test_import_molf_does_not_import_transformers():
    code = "import molf, sys; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_trainable_parameters_per_expert_slot():
    model = molf.wrap(tiny_causal_lm("llama"), MOLF)
    s = molf.trainable_parameters(model)
    modules = molf.molf_modules(model).values()
    fft = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in modules)
    lora = sum(8 * (m.in_features + m.out_features) for m in modules)
    total = sum(p.numel() for p in model.parameters())
    assert list(s["slots"]) == ["fft", "lora_r8", "other"]
    assert s["slots"]["fft"]["params"] == fft
    assert s["slots"]["lora_r8"]["params"] == lora
    assert s["slots"]["other"]["params"] == total - fft - lora  # embeddings, norms, lm_head
    assert s["all"] == total and s["trainable"] == total
    assert s["slots"]["fft"]["percent"] == pytest.approx(100 * fft / total)

    model.model.embed_tokens.weight.requires_grad_(False)  # frozen by hand: no longer counted
    assert molf.trainable_parameters(model)["slots"]["other"]["params"] == (
        total - fft - lora - model.model.embed_tokens.weight.numel()
    )


def test_trainable_parameters_of_molf_e_match_peft_lora_of_the_summed_rank(capsys):
    from peft import LoraConfig, get_peft_model

    model = molf.wrap(tiny_causal_lm("llama"), MOLF_E)
    s = molf.trainable_parameters(model)
    assert list(s["slots"]) == ["lora_r4", "lora_r8", "other"]
    assert s["slots"]["other"]["params"] == 0
    assert s["slots"]["lora_r8"]["params"] == 2 * s["slots"]["lora_r4"]["params"]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=12, target_modules=targets))
    assert (s["trainable"], s["all"]) == peft_model.get_nb_trainable_parameters()

    molf.print_trainable_parameters(model)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[0] == "lora_r4" and printed[2].split()[0] == "other"
    assert printed[-1] == (
        f"trainable params: {s['trainable']:,d} || all params: {s['all']:,d} || "
        f"trainable%: {s['trainable_percent']:.4f}"
    )


def test_a_molf_save_is_a_base_model_for_molf_train(tmp_path, capsys):
    """`molf train --model DIR` (and `molf eval`) on a molf.save_pretrained directory: it loads as
    the plain model it computes (experts merged), and the method wraps it afresh."""
    from molf.cli import main
    from molf.train.models import load_model

    base, tok = load_model("tiny-llama")
    model = molf.wrap(base, molf.MoLFConfig(lora_ranks=(4,)))
    with torch.no_grad():
        for m in molf.molf_modules(model).values():
            m.lora_B[0].normal_(0, 0.05)
    ids = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    molf.save_pretrained(model, tmp_path / "no-tokenizer")
    with pytest.raises(molf.MolfError, match="no tokenizer files"):
        load_model(tmp_path / "no-tokenizer")
    molf.save_pretrained(model, tmp_path / "saved", tokenizer=tok)

    plain, _ = load_model(tmp_path / "saved")
    assert not molf.molf_modules(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"{i} plus one is", "completion": f" {i + 1}"}) + "\n"
            for i in range(12)
        )
    )
    argv = ["train", "molf", "--model", str(tmp_path / "saved"), "--task", "sft"]
    argv += ["--data", str(data), "--output-dir", str(tmp_path / "run"), "max_steps=1"]
    argv += ["batch_size=2", "grad_accum=1", "lora_rank=4", "progress=false"]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["before"]["loss"] != summary["after"]["loss"]
