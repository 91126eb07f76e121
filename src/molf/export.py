"""Leaving molf: fold the experts into plain weights, or export MoLF-E as a standard PEFT LoRA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from molf._files import atomic_directory
from molf.errors import MolfError
from molf.layer import MoLFLinear, molf_modules


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """W <- W + sum_i s_i B_i A_i in float32 (cast back once), then put the plain `nn.Linear`s back.

    Returns the same model object, now free of molf modules: a transformers model saves and
    reloads with plain transformers and gives the same logits.
    """
    modules = molf_modules(model)
    if not modules:
        raise MolfError("merge_and_unload: the model has no MoLF modules")
    for name, m in modules.items():
        base = m.base_layer
        merged = base.weight.detach().float() + m.delta_weight(torch.float32)
        base.weight.data = merged.to(base.weight.dtype)
        for p in base.parameters():
            p.requires_grad_(True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, base)
    if hasattr(model, "molf_config"):
        del model.molf_config
    return model


def _module_key_names(model: nn.Module, wrapped: dict[str, MoLFLinear]) -> list[str]:
    """Short target names (q_proj, ...) when they select exactly the wrapped modules, else full names.

    Short names are what vLLM and most PEFT tooling expect.
    """
    short = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    linears = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, MoLFLinear)) and n.rsplit(".", 1)[-1] in short
    ]
    inner = {n for n in linears if n.endswith(".base_layer")}
    linears = [n for n in linears if n not in inner]
    if sorted(linears) == sorted(wrapped):
        return short
    return sorted(wrapped)


@torch.no_grad()
def export_peft_lora(
    model: nn.Module,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the LoRA experts of a MoLF-E model as one standard PEFT LoRA adapter.

    Experts concatenate exactly into rank R = sum r_i: A = [A_1; A_2], B = [s_1 B_1, s_2 B_2],
    lora_alpha = R (scale 1). The adapter holds float32 weights; `peft.PeftModel.from_pretrained`
    and vLLM load it as plain LoRA. Refuses a model whose base weights were trainable (MoLF with
    an FFT expert, or unfrozen embeddings/norms): an adapter cannot carry those changes.
    """
    wrapped = molf_modules(model)
    if not wrapped:
        raise MolfError("export_peft_lora: the model has no MoLF modules")
    lora_ids = {id(p) for m in wrapped.values() for e in m.lora_experts() for p in e}
    trained = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids]
    if trained:
        raise MolfError(
            f"export_peft_lora: base weights were trainable ({trained[0]} and {len(trained) - 1} more); "
            "a LoRA adapter cannot carry them. Use molf.merge_and_unload for MoLF/FFT models."
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
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))

    return atomic_directory(Path(out_dir), fill)
