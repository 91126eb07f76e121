"""Save a wrapped (unmerged) model and load it back, so routed training can continue from it.

A saved directory holds

    molf_model.safetensors    the wrapped model's state dict, tied tensors once: base weights
                              under `*.base_layer.*`, experts under `*.lora_A.<i>`, `*.lora_B.<i>`;
    molf_buffers.safetensors  its non-persistent buffers (rotary frequencies, ...): their values
                              depend on how the model was built and cast, so a rebuilt model
                              would compute slightly different ones; with them it computes bit
                              for bit what the saved one did;
    molf_config.json          the MoLFConfig, the wrapped module names, the tied and the frozen
                              parameters, the model class; written last, so a directory without
                              it is not a complete save;
    config.json, generation_config.json and the tokenizer files of a transformers model.

The weights deliberately do not use a transformers file name (`model.safetensors`, ...), and
saving removes stale ones: transformers' `from_pretrained` would load the wrapped keys into a plain
model and leave every targeted linear randomly initialised (and, with no config.json, a class's
`from_pretrained` builds the architecture's default, multi-billion-parameter configuration). With
none of its weight files in the directory it refuses it.

`molf.wrap` makes `save_pretrained` of a transformers model write this format, so
`Trainer.save_model` and the Trainer's checkpoints do too (`use_molf` in
molf.integrations.transformers teaches the Trainer to resume from them), until
`molf.merge_and_unload` turns the model back into a plain one.

Only torch and safetensors are imported here; transformers is imported inside `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from molf.config import MoLFConfig
from molf.errors import MolfError, one_line
from molf.layer import molf_modules, on_wrap, wrap

WEIGHTS_NAME = "molf_model.safetensors"
BUFFERS_NAME = "molf_buffers.safetensors"
CONFIG_NAME = "molf_config.json"
FORMAT = "molf-wrapped"
FORMAT_VERSION = 1
_INFO_KEYS = {
    "format_version",
    "molf_config",
    "wrapped_modules",
    "tied",
    "nonpersistent_buffers",
    "frozen",
    "dtype",
    "architecture",
}
# transformers' weight files: a plain from_pretrained would load these as a different model.
_HF_WEIGHTS = re.compile(
    r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?"
)


def _aliases(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: first name} for every state-dict name bound to the same tensor as an earlier one
    (tied weights, e.g. lm_head.weight and model.embed_tokens.weight)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def _tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's state dict (parameters and persistent buffers, as the live objects) and its
    non-persistent buffers, by name."""
    state = model.state_dict(keep_vars=True)
    buffers = {n: b for n, b in model.named_buffers(remove_duplicate=False) if n not in state}
    return state, buffers


def _for_file(tensors: dict[str, torch.Tensor], skip: dict[str, str]) -> dict[str, torch.Tensor]:
    """CPU copies (or the tensors themselves on the CPU) to write, each buffer once."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if name in skip:
            continue
        if type(t.data) is not torch.Tensor:
            raise MolfError(
                f"save_pretrained: {name} is a {type(t.data).__name__} (a sharded model); gather a "
                "full state dict and pass it as state_dict="
            )
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in storages:  # a view into another tensor's memory: safetensors refuses those
            t = t.clone()
        storages.add(storage)
        out[name] = t
    return out


def _is_expert(name: str) -> bool:
    return re.search(r"\.lora_[AB]\.\d+$", name) is not None


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The float dtype the model computes in: its wrapped layers' weight dtype, or, on a
    quantized base (packed integer weights), that of its first float tensor outside the wrapped
    layers (the experts there are float32 whatever the model's dtype, as in peft)."""
    weight = next(iter(molf_modules(model).values())).weight
    if weight.dtype.is_floating_point:
        return weight.dtype
    wrapped = tuple(f"{n}." for n in molf_modules(model))
    for name, p in model.named_parameters():
        if p.dtype.is_floating_point and not name.startswith(wrapped):
            return p.dtype
    return torch.float32


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _write_replacing(path: Path, write: Any) -> None:
    """`write(tmp)` then rename over `path`, so `path` is either the old file or the whole new one."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@torch.no_grad()
def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike[str],
    tokenizer: Any | None = None,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a `molf.wrap`ped model, experts unmerged, so `molf.from_pretrained` rebuilds it.

    `tokenizer` (anything with `save_pretrained`) is saved alongside. `state_dict` replaces the
    model's own tensors (same names), e.g. a full state dict gathered from a sharded model. Other
    files in `directory` are kept, except transformers weight files, which plain transformers
    would load instead. `molf_config.json` is removed first and written last: a directory without
    it is not a complete save.
    """
    if not molf_modules(model):
        raise MolfError(
            "save_pretrained: the model has no MoLF modules; a plain model saves with its own "
            "save_pretrained (transformers) or torch"
        )
    config = getattr(model, "molf_config", None)
    if not isinstance(config, MoLFConfig):
        raise MolfError(
            "save_pretrained: the model has MoLF modules but no molf_config; wrap it with molf.wrap"
        )
    live, buffers = _tensors(model)
    aliases = _aliases({**live, **buffers})
    source = live
    if state_dict is not None:
        unknown = sorted(set(state_dict) - set(live))
        lacking = sorted(set(live) - set(state_dict) - set(aliases))
        if unknown or lacking:
            raise MolfError(
                "save_pretrained: state_dict does not match the model: "
                f"unknown {_few(unknown) or 'none'}; lacking {_few(lacking) or 'none'}"
            )
        source = state_dict
    tensors = _for_file(source, aliases)
    buffer_tensors = _for_file(buffers, aliases)

    info: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "molf_config": dataclasses.asdict(config),
        "wrapped_modules": list(molf_modules(model)),
        "tied": aliases,
        "nonpersistent_buffers": list(buffers),
        "frozen": [
            n
            for n, t in live.items()
            if isinstance(t, nn.Parameter) and not t.requires_grad and n not in aliases
        ],
        "dtype": str(_model_dtype(model)).removeprefix("torch."),
        "architecture": None,
    }
    hf_config = getattr(model, "config", None)
    transformers_model = type(model).__module__.startswith("transformers.") and hasattr(
        hf_config, "save_pretrained"
    )
    if transformers_model:
        info["architecture"] = type(model).__name__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / CONFIG_NAME
    marker.unlink(missing_ok=True)
    for stale in directory.iterdir():
        if _HF_WEIGHTS.fullmatch(stale.name) and stale.is_file():
            stale.unlink()
    for name, content in ((WEIGHTS_NAME, tensors), (BUFFERS_NAME, buffer_tensors)):
        _write_replacing(
            directory / name,
            lambda p, c=content: save_file(c, str(p), metadata={"format": "pt", "molf": FORMAT}),
        )
    if transformers_model:
        hf_config.save_pretrained(directory)
        generation_config = getattr(model, "generation_config", None)
        if hasattr(generation_config, "save_pretrained"):
            generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    _write_replacing(marker, lambda p: p.write_text(json.dumps(info, indent=1)))
    return directory


def _read_info(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        if not directory.is_dir():
            raise MolfError(f"{directory}: no such directory")
        if (directory / "adapter_config.json").is_file():
            hint = "it is a PEFT adapter: load it with peft (or molf.train.models.load_model)"
        elif any(_HF_WEIGHTS.fullmatch(p.name) for p in directory.iterdir()):
            hint = "it is a plain transformers checkpoint: load it with from_pretrained and molf.wrap it"
        else:
            hint = "not saved by molf.save_pretrained, or its save was interrupted"
        raise MolfError(f"{directory}: no {CONFIG_NAME} ({hint})")
    try:
        info = json.loads(path.read_text())
    except ValueError as e:
        raise MolfError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise MolfError(f"{path}: not a molf save (format is not {FORMAT!r})")
    lacking = sorted(_INFO_KEYS - set(info))
    if lacking:
        raise MolfError(f"{path}: incomplete, no {', '.join(lacking)}")
    if info["format_version"] > FORMAT_VERSION:
        raise MolfError(
            f"{path}: format version {info['format_version']} is newer than this molf reads "
            f"({FORMAT_VERSION}); upgrade molf"
        )
    for name in (WEIGHTS_NAME, BUFFERS_NAME):
        if not (directory / name).is_file():
            raise MolfError(f"{directory}: no {name}")
    return info


def _molf_config(info: dict[str, Any], path: Path) -> MoLFConfig:
    saved = dict(info["molf_config"])
    known = {f.name for f in dataclasses.fields(MoLFConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise MolfError(
            f"{path}: MoLFConfig fields this molf does not know: {', '.join(unknown)} (saved by a newer molf?)"
        )
    return MoLFConfig(**saved)


def _load_file(
    path: Path,
    targets: dict[str, torch.Tensor],
    skip: dict[str, str],
    derived: frozenset[str] = frozenset(),
) -> None:
    """Copy every tensor of `path` into `targets` (the live objects), strictly. `derived` names
    entries a module computes for its state dict rather than holds (a 4-bit layer's quantization
    statistics): those must equal the saved ones, since copying into them would change nothing."""
    expected = [n for n in targets if n not in skip]
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        missing = [n for n in expected if n not in keys]
        unexpected = sorted(keys - set(expected))
        if missing or unexpected:
            problems = [f"missing {_few(missing)}"] if missing else []
            problems += [f"unexpected {_few(unexpected)}"] if unexpected else []
            raise MolfError(f"{path}: does not match the wrapped model: {'; '.join(problems)}")
        for name in expected:
            target = targets[name]
            saved = f.get_tensor(name)
            if saved.shape != target.shape:
                raise MolfError(
                    f"{path}: {name} has shape {tuple(saved.shape)}, the model expects "
                    f"{tuple(target.shape)}"
                )
            if name in derived:
                if not torch.equal(saved, target.to(saved.device)):
                    raise MolfError(f"{path}: {name} differs from the rebuilt model's")
            elif saved.dtype == target.dtype:
                target.copy_(saved)
            else:  # keep the saved dtype; `.data` keeps the Parameter object (and its ties)
                target.data = saved.to(target.device)


@torch.no_grad()
def _load_tensors(
    model: nn.Module, directory: Path, info: dict[str, Any], restore_frozen: bool = True
) -> None:
    """Load every saved tensor into `model` (already wrapped), strictly; with `restore_frozen`,
    freeze exactly the parameters that were frozen when it was saved."""
    live, buffers = _tensors(model)
    aliases = _aliases({**live, **buffers})
    if list(buffers) != info["nonpersistent_buffers"]:
        raise MolfError(
            f"{directory}: the saved model had the non-persistent buffers "
            f"{_few(info['nonpersistent_buffers']) or 'none'}, the rebuilt one has "
            f"{_few(list(buffers)) or 'none'}"
        )
    if aliases != info["tied"]:
        raise MolfError(
            f"{directory}: the saved model tied {info['tied'] or 'no weights'}, the rebuilt one "
            f"ties {aliases or 'none'}"
        )
    held = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    held |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    _load_file(directory / WEIGHTS_NAME, live, aliases, frozenset(set(live) - held))
    _load_file(directory / BUFFERS_NAME, buffers, aliases)
    if not restore_frozen:
        return
    frozen = set(info["frozen"])
    for name, t in live.items():
        if isinstance(t, nn.Parameter) and name not in aliases:
            t.requires_grad_(name not in frozen)


def load_wrapped(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Wrap the plain `model` with the MoLFConfig saved in `directory` and load every saved tensor
    into it; returns `model`. For models transformers cannot rebuild by class name; otherwise
    `from_pretrained` builds the model too.

    Strict: a missing or unexpected tensor, another shape, other wrapped modules or other tied
    weights raise MolfError naming them. Parameters frozen at save time are frozen again.
    """
    directory = Path(directory)
    info = _read_info(directory)
    if molf_modules(model):
        raise MolfError("load_wrapped: the model is already wrapped; pass the plain model")
    wrap(model, _molf_config(info, directory / CONFIG_NAME))
    wrapped = list(molf_modules(model))
    if wrapped != info["wrapped_modules"]:
        saved = info["wrapped_modules"]
        lacking = [n for n in saved if n not in wrapped]
        extra = [n for n in wrapped if n not in saved]
        raise MolfError(
            f"{directory}: the saved MoLFConfig wraps other modules of this model than were saved "
            f"(not wrapped now: {_few(lacking) or 'none'}; wrapped now only: {_few(extra) or 'none'})"
        )
    _load_tensors(model, directory, info)
    return model


def restore_wrapped(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Load a save into `model`, already wrapped with the same MoLFConfig (a training run resuming
    from its own checkpoint); strict like `load_wrapped`. requires_grad is left as it is."""
    directory = Path(directory)
    info = _read_info(directory)
    saved = _molf_config(info, directory / CONFIG_NAME)
    if getattr(model, "molf_config", None) != saved:
        raise MolfError(
            f"{directory}: saved with {saved}, the model is wrapped with "
            f"{getattr(model, 'molf_config', None)}"
        )
    if list(molf_modules(model)) != info["wrapped_modules"]:
        raise MolfError(f"{directory}: the model wraps other modules than were saved")
    _load_tensors(model, directory, info, restore_frozen=False)
    return model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def from_pretrained(
    directory: str | os.PathLike[str], *, device: str | torch.device | None = None
) -> nn.Module:
    """Rebuild a transformers model saved by `molf.save_pretrained`: the same class from its saved
    config, wrapped with the saved MoLFConfig, every tensor loaded strictly (see `load_wrapped`).

    Returns it in eval mode, like transformers' `from_pretrained`; call `.train()` and build a new
    `MoLFAdamW` to continue routed training. The tokenizer, if one was saved, loads with
    `AutoTokenizer.from_pretrained(directory)`.
    """
    directory = Path(directory)
    info = _read_info(directory)
    arch = info.get("architecture")
    if arch is None:
        raise MolfError(
            f"{directory}: saved from a model that is not a transformers model; build the plain "
            "model and call molf.load_wrapped(model, directory)"
        )
    import transformers

    cls = getattr(transformers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise MolfError(
            f"{directory}: transformers {transformers.__version__} has no model class {arch}"
        )
    dtype = getattr(torch, str(info.get("dtype")), None)
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        dtype = _saved_float_dtype(directory)  # saved before quantized bases recorded theirs
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MolfError(
            f"{directory / CONFIG_NAME}: dtype {info.get('dtype')!r} is not a float dtype"
        )
    if not (directory / "config.json").is_file():
        raise MolfError(f"{directory}: no config.json (the {arch} configuration)")
    config = cls.config_class.from_pretrained(directory)
    if getattr(config, "quantization_config", None) is not None:
        model = _quantized_base(cls, config, directory, dtype, device)
    else:
        from transformers.initialization import no_init_weights

        # Every parameter and persistent buffer is overwritten by the strict load below, so the
        # random initialisation would be wasted work; buffers computed in __init__ are still
        # built. no_init_weights also skips the tying that init_weights does: tie explicitly,
        # as transformers' from_pretrained does (the load checks the ties against the saved
        # ones).
        with _default_dtype(dtype), no_init_weights():
            model = cls(config)
        model.tie_weights()
    load_wrapped(model, directory)
    if (directory / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    if device is not None and getattr(config, "quantization_config", None) is None:
        model.to(device)
    return model.eval()


def _saved_float_dtype(directory: Path) -> torch.dtype:
    """The dtype of the first float tensor of a save outside its wrapped layers (embeddings,
    norms): the model's dtype when its base layers hold packed integers."""
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        for name in f.keys():
            if ".base_layer." in name or _is_expert(name):
                continue
            dtype = f.get_slice(name).get_dtype()
            found = getattr(
                torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dtype, ""), None
            )
            if isinstance(found, torch.dtype):
                return found
    return torch.float32


def _quantized_base(
    cls: type, config: Any, directory: Path, dtype: torch.dtype, device: Any
) -> nn.Module:
    """The unwrapped model of a save on a bitsandbytes-quantized base, built by transformers from
    the saved base tensors (packed weights and their quantization statistics), so that its
    quantized layers are what they were; `load_wrapped` then wraps it and loads the experts."""
    from safetensors.torch import load_file

    base = {
        name.replace(".base_layer.", "."): t
        for name, t in load_file(str(directory / WEIGHTS_NAME)).items()
        if not _is_expert(name)
    }
    target = "cpu" if device is None else str(device)
    try:
        return cls.from_pretrained(
            None, config=config, state_dict=base, dtype=dtype, device_map={"": target}
        )
    except (ImportError, OSError, ValueError, RuntimeError) as e:
        raise MolfError(f"{directory}: cannot rebuild its quantized base ({one_line(e)})") from None


_format_notice_given = False  # the notice below is given once per process


class _WrappedSavePretrained:
    """`save_pretrained` of a wrapped transformers model: molf's format (see the module
    docstring), or the class's own once the model has been merged back into a plain one. A
    callable object rather than a bound method, so that the model still pickles."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(
        self,
        save_directory: str | os.PathLike[str],
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        model = self.model
        if not molf_modules(model):
            type(model).save_pretrained(
                model,
                save_directory,
                is_main_process=is_main_process,
                state_dict=state_dict,
                push_to_hub=push_to_hub,
                **kwargs,
            )
            return
        if push_to_hub:
            raise MolfError(
                "save_pretrained: push_to_hub of a molf-wrapped model is not supported; merge it "
                "first (molf.merge_and_unload) or upload the directory molf.save_pretrained writes"
            )
        if not is_main_process:
            return
        global _format_notice_given
        # Once per process, not per model or per save: a Trainer saves every checkpoint through
        # here, and `model_init` or a resumed run brings a new wrapped model each time.
        if not _format_notice_given:
            warnings.warn(
                "save_pretrained: the model is wrapped by molf, so it is saved in molf's format "
                "(experts unmerged; reload with molf.from_pretrained; a Trainer resumes from it "
                "after molf.integrations.transformers.use_molf(trainer)). For a plain "
                "transformers checkpoint, molf.merge_and_unload(model) first.",
                stacklevel=2,
            )
            _format_notice_given = True
        save_pretrained(model, save_directory, state_dict=state_dict)


@on_wrap
def guard_save_pretrained(model: nn.Module) -> None:
    """Route `model.save_pretrained` (transformers) to molf's format while `model` is wrapped: the
    transformers format of a wrapped model reloads as a different, randomly initialised model."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = _WrappedSavePretrained(model)
