"""Model loading: tiny models, local checkpoints, PEFT adapters, the embedded GGUF conversion and
the cache it lives in."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from molf._files import looks_like_path
from molf.errors import MolfError
from molf.optim import kernels
from molf.train import models
from molf.train.models import EMBEDDED_MODELS, TINY_MODELS, cache_root, load_model

ARCHS = {
    "tiny-llama": "LlamaForCausalLM",
    "tiny-qwen2": "Qwen2ForCausalLM",
    "tiny-gemma3": "Gemma3ForCausalLM",
}


@pytest.fixture(scope="session")
def molf_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One cache for the whole session: extracting the SmolLM2 tokenizer costs a few seconds."""
    return str(tmp_path_factory.mktemp("molf-cache"))


def _batch(tokenizer, texts=("The cat sat on the mat.", "Hi")) -> dict[str, torch.Tensor]:
    return dict(tokenizer(list(texts), return_tensors="pt", padding=True))


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_names_and_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert set(TINY_MODELS) == set(ARCHS)
    assert EMBEDDED_MODELS == ("smollm2-135m", "gemma3-270m")
    monkeypatch.delenv("MOLF_CACHE", raising=False)
    monkeypatch.setenv("MOLF_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert kernels.cache_dir() == tmp_path / "c" / "kernels"  # one variable for the whole cache
    assert cache_root(str(tmp_path / "d")) == tmp_path / "d"
    monkeypatch.delenv("MOLF_CACHE_DIR")
    monkeypatch.setenv("MOLF_CACHE", str(tmp_path / "old"))  # the old name, still read
    with pytest.warns(DeprecationWarning, match="MOLF_CACHE_DIR"):
        assert cache_root() == tmp_path / "old"
    monkeypatch.delenv("MOLF_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == Path.home() / ".cache" / "molf"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "molf"


@pytest.mark.parametrize(
    "name,is_path",
    [
        ("Qwen/Qwen2.5-1.5B", False),
        ("gpt2", False),
        ("./tiny-llama", True),
        ("/abs/model", True),
        ("~/models/x", True),
        ("runs/a/final", True),
        ("model/", True),
        ("C:\\models\\x", True),
        ("model.gguf", True),
    ],
)
def test_a_local_path_is_told_from_a_hub_id(name: str, is_path: bool) -> None:
    assert looks_like_path(name) is is_path


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_trains_and_generates(name: str, molf_cache: str) -> None:
    model, tokenizer = load_model(name, cache_dir=molf_cache)
    assert type(model).__name__ == ARCHS[name]
    assert model.name_or_path == name
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert model.config.vocab_size == len(tokenizer)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(model.config, attr)
        assert token_id is not None and 0 <= token_id < model.config.vocab_size, attr

    batch = _batch(tokenizer)
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # padded
    model.train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    model.eval()
    tokenizer.padding_side = "left"
    gen_batch = _batch(tokenizer)
    generated = model.generate(**gen_batch, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, gen_batch["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_is_deterministic(name: str, molf_cache: str) -> None:
    state = torch.get_rng_state()
    first, _ = load_model(name, cache_dir=molf_cache)
    assert torch.equal(torch.get_rng_state(), state), "the caller's RNG must not move"
    torch.manual_seed(999)  # a different global seed must not change the weights
    second, _ = load_model(name, cache_dir=molf_cache)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.embed_tokens.weight"].std() > 0  # really initialised

    half, _ = load_model(name, dtype=torch.bfloat16, cache_dir=molf_cache)
    assert next(half.parameters()).dtype == torch.bfloat16
    h = half.state_dict()
    assert all(torch.equal(h[k], a[k].to(torch.bfloat16)) for k in a)


def test_tiny_tied_embeddings(molf_cache: str) -> None:
    llama, _ = load_model("tiny-llama", cache_dir=molf_cache)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    qwen, _ = load_model("tiny-qwen2", cache_dir=molf_cache)
    assert qwen.lm_head.weight is not qwen.model.embed_tokens.weight


def test_local_directory_round_trip(molf_cache: str, tmp_path: Path) -> None:
    model, tokenizer = load_model("tiny-qwen2", cache_dir=molf_cache)
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    loaded, loaded_tok = load_model(str(tmp_path / "ckpt"))
    assert type(loaded) is type(model)
    assert loaded_tok.pad_token == tokenizer.pad_token
    batch = _batch(tokenizer)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    assert loaded.name_or_path == str((tmp_path / "ckpt").resolve())

    half, _ = load_model(tmp_path / "ckpt", dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_local_directory_without_tokenizer_or_config(molf_cache: str, tmp_path: Path) -> None:
    model, _ = load_model("tiny-llama", cache_dir=molf_cache)
    model.save_pretrained(tmp_path / "no-tok")
    with pytest.raises(MolfError, match="no tokenizer files"):
        load_model(str(tmp_path / "no-tok"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MolfError, match="neither config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(MolfError, match="no such directory"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(MolfError, match="is a file"):
        load_model(str(tmp_path / "no-tok" / "config.json"))


def _save_adapter(base, out: Path) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        peft_model = get_peft_model(base, config)
    # No embedding-layer check: it would look the base name up on the hub.
    peft_model.save_pretrained(out, save_embedding_layers=False)
    return peft_model


def test_peft_adapter_on_embedded_name(molf_cache: str, tmp_path: Path) -> None:
    base, tokenizer = load_model("tiny-llama", cache_dir=molf_cache)
    batch = _batch(tokenizer)
    base_logits = _logits(base, batch)
    peft_model = _save_adapter(base, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == ("tiny-llama")
    expected = _logits(peft_model, batch)
    assert not torch.allclose(expected, base_logits)  # the adapter does something

    merged, adapter_tok = load_model(str(tmp_path / "adapter"), cache_dir=molf_cache)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert adapter_tok.pad_token is not None
    torch.testing.assert_close(_logits(merged, batch), expected, rtol=1e-4, atol=1e-4)

    unmerged, _ = load_model(tmp_path / "adapter", cache_dir=molf_cache, merge_adapter=False)
    assert type(unmerged).__name__ == "PeftModelForCausalLM"
    assert hasattr(unmerged, "get_base_model")  # a PEFT model, its adapter not merged
    torch.testing.assert_close(_logits(unmerged, batch), expected, rtol=1e-4, atol=1e-4)


def test_peft_adapter_on_local_base(
    molf_cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, tokenizer = load_model("tiny-gemma3", cache_dir=molf_cache)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    local_base, _ = load_model(tmp_path / "base")
    peft_model = _save_adapter(local_base, tmp_path / "adapter")
    batch = _batch(tokenizer)
    expected = _logits(peft_model, batch)
    merged, _ = load_model(tmp_path / "adapter")
    torch.testing.assert_close(_logits(merged, batch), expected)

    # A relative base path is also found next to the adapter, whatever the working directory.
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    config["base_model_name_or_path"] = "../base"
    config_file.write_text(json.dumps(config))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    merged, _ = load_model(tmp_path / "adapter")
    torch.testing.assert_close(_logits(merged, batch), expected)


def test_adapter_on_an_embedded_cache_of_another_machine(
    molf_cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter names an embedded model by its cache directory; where that directory does not
    exist (another machine, another cache), the embedded model is loaded by name instead."""
    base, tokenizer = load_model("tiny-llama", cache_dir=molf_cache)
    peft_model = _save_adapter(base, tmp_path / "adapter")
    batch = _batch(tokenizer)
    expected = _logits(peft_model, batch)
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "elsewhere" / "models" / "smollm2-135m")
    config_file.write_text(json.dumps(config))
    asked: list[str] = []

    def embedded(name: str, dtype: torch.dtype, root: Path):  # the tiny model stands in
        asked.append(name)
        return load_model("tiny-llama", cache_dir=molf_cache)

    monkeypatch.setattr(models, "_load_embedded", embedded)
    merged, _ = load_model(tmp_path / "adapter", cache_dir=molf_cache)
    assert asked == ["smollm2-135m"]
    torch.testing.assert_close(_logits(merged, batch), expected, rtol=1e-4, atol=1e-4)


def test_adapter_without_base_name(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(MolfError, match="missing field 'base_model_name_or_path'"):
        load_model(tmp_path)


def test_unknown_name_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(MolfError) as info:
        load_model("no-such-org/no-such-model")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("model 'no-such-org/no-such-model': not an embedded name (")
    assert "tiny-llama" in message and "HF_HUB_OFFLINE" in message


def test_unknown_name_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the connection check the hub client retries for ~45 s before giving up.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    start = time.monotonic()
    with pytest.raises(MolfError, match="cannot connect to 127.0.0.1:9") as info:
        load_model("no-such-model")
    assert time.monotonic() - start < 10
    assert "\n" not in str(info.value)


def test_bad_dtype() -> None:
    with pytest.raises(MolfError, match="dtype 'float8'"):
        load_model("tiny-llama", dtype="float8")


def test_cache_builds_once_under_concurrency(tmp_path: Path) -> None:
    calls: list[int] = []

    def build(out: Path) -> None:
        calls.append(1)
        time.sleep(0.2)  # long enough for the other thread to arrive while this one builds
        (out / "payload.txt").write_text("ok")

    target = tmp_path / "models" / "thing"
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(models._ensure_cached(target, build, {"v": 1}))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target, target]
    assert len(calls) == 1
    assert (target / "payload.txt").read_text() == "ok"
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(".thing.tmp")]
    assert leftovers == []

    # Another source (or cache format) rebuilds in place.
    models._ensure_cached(target, build, {"v": 2})
    assert len(calls) == 2
    assert json.loads((target / "molf_cache.json").read_text())["v"] == 2


def test_cache_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def build(out: Path) -> None:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    target = tmp_path / "thing"
    with pytest.raises(RuntimeError, match="disk full"):
        models._ensure_cached(target, build, {"v": 1})
    assert not target.exists()
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_smollm2_conversion_matches_gguf(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, molf_cache: str
) -> None:
    """Converts the embedded SmolLM2 GGUF (~15 s on 2 cores) into a fresh cache and checks the
    cached checkpoint against the GGUF-loaded model it was made from."""
    gguf_models: list[torch.nn.Module] = []
    original = models._load_gguf

    def spy(path: Path) -> torch.nn.Module:
        gguf_models.append(original(path))
        return gguf_models[-1]

    monkeypatch.setattr(models, "_load_gguf", spy)
    # The tokenizer from the session cache saves its extraction; the model dir is new.
    load_model("tiny-llama", cache_dir=molf_cache)  # makes sure the session tokenizer exists
    cache = tmp_path / "cache"
    (cache / "tokenizers").mkdir(parents=True)
    os.symlink(Path(molf_cache) / "tokenizers" / "smollm2", cache / "tokenizers" / "smollm2")

    model, tokenizer = load_model("smollm2-135m", cache_dir=str(cache))
    assert len(gguf_models) == 1
    target = cache / "models" / "smollm2-135m"
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    # Adapters saved from it name the cached directory, which peft can load without molf.
    assert model.name_or_path == str(target.resolve())
    assert model.lm_head.weight is model.model.embed_tokens.weight

    batch = _batch(tokenizer)
    torch.testing.assert_close(_logits(model, batch), _logits(gguf_models[0], batch))
    assert tokenizer.pad_token is not None and tokenizer.chat_template

    # The second load reads the cached checkpoint and never touches the GGUF file.
    start = time.monotonic()
    again, _ = load_model("smollm2-135m", cache_dir=str(cache))
    assert time.monotonic() - start < 10
    assert len(gguf_models) == 1
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
