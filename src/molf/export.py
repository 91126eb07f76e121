"""Leaving molf: fold the experts into plain weights, or export MoLF-E as a standard PEFT LoRA."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from molf._files import atomic_directory
from molf.errors import MolfError
from molf.layer import MoLFLinear, molf_modules, shared_base_weights

# what an adapter directory holds (peft writes the README; molf train adds its run info)
_ADAPTER_FILES = frozenset(
    {"adapter_model.safetensors", "adapter_config.json", "README.md", "molf_run.json"}
)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """W <- W + sum_i s_i B_i A_i in float32 (cast back once), then put the plain layers back.

    Returns the same model object, now free of molf modules: a transformers model saves and
    reloads with plain transformers and gives the same logits. A wrapped layer whose weight is
    shared (an `lm_head` tied to the input embeddings) gets its own merged weight, leaving the
    other holders as they were, and `config.tie_word_embeddings` becomes False; a warning says so.
    Quantized base layers (bitsandbytes) are refused: rounding the merged weight back to 4 or 8
    bits would lose most of the update, so export the adapter with `export_peft_lora` instead.
    """
    modules = molf_modules(model)
    if not modules:
        raise MolfError("merge_and_unload: the model has no MoLF modules")
    quantized = [(n, m) for n, m in modules.items() if m.kind.quantized]
    if quantized:
        name, m = quantized[0]
        raise MolfError(
            f"merge_and_unload: '{name}' ({len(quantized)} layers) is a {m.kind.name}; merging "
            "into quantized weights would round the update away. Export the adapter with "
            "molf.export_peft_lora and merge it into an unquantized copy of the base"
        )
    shared = shared_base_weights(model)
    for name, m in modules.items():
        base = m.base_layer
        delta = m.delta_weight(torch.float32)
        if m.kind.fan_in_fan_out:
            delta = delta.t()  # the base stores W as [in, out]
        merged = (base.weight.detach().float() + delta).to(base.weight.dtype)
        if name in shared:
            # A new tensor for this layer only: the embeddings keep the unmerged matrix, which is
            # what the wrapped model's embedding lookup used.
            base.weight = nn.Parameter(merged, requires_grad=True)
        else:
            base.weight.data = merged
        for p in base.parameters():
            p.requires_grad_(True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, base)
    if shared:
        _untie_config(model)
        listed = "; ".join(f"'{n}' with {', '.join(o)}" for n, o in shared.items())
        warnings.warn(
            f"merge_and_unload: untied {listed}: the merged layer got its own weight, the other "
            "holders keep the unmerged one, and config.tie_word_embeddings is now False, so the "
            "merged model gives the wrapped model's logits (and saves both matrices)",
            stacklevel=3,  # past torch.no_grad's wrapper, to the caller
        )
    if hasattr(model, "molf_config"):
        del model.molf_config
    return model


def _untie_config(model: nn.Module) -> None:
    """Tell transformers the output embeddings are no longer tied, so that neither a reload nor
    `tie_weights()` ties them again."""
    config = getattr(model, "config", None)
    if config is None:
        return
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for c in configs:
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False


def _module_key_names(model: nn.Module, wrapped: dict[str, MoLFLinear]) -> list[str]:
    """Short target names (q_proj, ...) when they select exactly the wrapped modules, else full names.

    Short names are what vLLM and most PEFT tooling expect. peft matches a short name against
    every module whose dotted name ends with it, whatever its type, so all modules count here.
    """
    short = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    named = [
        n
        for n, _ in model.named_modules()
        if n.rsplit(".", 1)[-1] in short and not n.endswith(".base_layer")
    ]
    if sorted(named) == sorted(wrapped):
        return short
    return sorted(wrapped)


@torch.no_grad()
def export_peft_lora(
    model: nn.Module,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the LoRA experts of a frozen-base (MoLF-E) model as one standard PEFT LoRA adapter.

    Experts concatenate exactly into rank R = sum r_i: A = [A_1; A_2], B = [s_1 B_1, s_2 B_2],
    lora_alpha = R (scale 1). The adapter holds float32 weights; `peft.PeftModel.from_pretrained`
    and vLLM load it as plain LoRA, also on a quantized (bitsandbytes) copy of the base.
    `base_model_name_or_path` defaults to the model's `config.name_or_path`: give a hub id or a
    local directory, so that `AutoPeftModelForCausalLM.from_pretrained(out_dir)` finds the base.
    Refuses a model that trains anything outside its LoRA experts (MoLF's FFT expert, unfrozen
    embeddings or norms), naming it: an adapter cannot carry those changes.
    """
    wrapped = molf_modules(model)
    if not wrapped:
        raise MolfError("export_peft_lora: the model has no MoLF modules")
    lora_ids = {id(p) for m in wrapped.values() for e in m.lora_experts() for p in e}
    trained = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids]
    if trained:
        raise MolfError(
            "export_peft_lora is for frozen-base models (MoLF-E: train_base=False with "
            f"embeddings and norms frozen), but {trained[0]} (and {len(trained) - 1} more) "
            "trained, which a LoRA adapter cannot carry: use molf.merge_and_unload (or "
            "molf.save_pretrained) for MoLF and other models that train base weights"
        )
    ranks = {sum(m.ranks) for m in wrapped.values()}
    if len(ranks) != 1:
        raise MolfError(f"export_peft_lora: modules have different total ranks {sorted(ranks)}")
    rank = ranks.pop()
    tensors: dict[str, torch.Tensor] = {}
    for name, m in wrapped.items():
        a = torch.cat([x.detach().float() for x in m.lora_A], dim=0)
        b = torch.cat([s * y.detach().float() for s, y in zip(m.scalings, m.lora_B)], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    config = getattr(model, "molf_config", None)
    base_name = base_model_name_or_path
    if base_name is None:
        base_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": float(config.lora_dropout) if config else 0.0,
        "use_rslora": False,
        "target_modules": _module_key_names(model, wrapped),
        "bias": "none",
        # peft's flag for bases that store W as [in, out] (GPT-2's Conv1D); peft resets it per
        # layer for plain linears of a mixed model, so it is set when any wrapped layer needs it.
        "fan_in_fan_out": any(m.kind.fan_in_fan_out for m in wrapped.values()),
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))

    out = Path(out_dir)
    if out.is_dir():
        # the export replaces the directory whole: only an earlier adapter may be in the way
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _ADAPTER_FILES)
        if foreign:
            raise MolfError(
                f"export_peft_lora: {out} holds files that are not a PEFT adapter's "
                f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); "
                "export into a new or empty directory"
            )
    return atomic_directory(out, fill)
