"""The MoLF layer: a linear layer with an FFT expert {W, b} and any number of LoRA experts.

    y = x W^T + b + sum_i s_i * B_i A_i dropout(x)

All experts are trainable in one dense forward pass; the optimizer (molf.optim.adamw) decides per
step which of them is updated.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from molf import guard
from molf.config import MoLFConfig
from molf.errors import MolfError


@dataclass(frozen=True)
class BaseLayerKind:
    """One type of base layer `wrap` accepts, and what molf must know to wrap it.

    A new base type is one more entry in `BASE_LAYER_KINDS`, never an `if` in the layer.

    Attributes:
        name: how messages and the README call it.
        matches: whether a module is of this kind.
        features: (in_features, out_features) of such a module.
        fan_in_fan_out: the weight is stored [in, out] (transformers' Conv1D), not [out, in], so
            merging adds the transposed update and the PEFT adapter says `fan_in_fan_out`.
        quantized: the weight is packed integers (bitsandbytes): it can only stay frozen (MoLF-E)
            and an update cannot be merged into it.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    features: Callable[[nn.Module], tuple[int, int]]
    fan_in_fan_out: bool = False
    quantized: bool = False


def _imported_class(module: str, name: str) -> type | None:
    """`module.name` if that module has been imported, else None.

    A library that was never imported cannot have built a layer of its types, so molf detects
    transformers' Conv1D and bitsandbytes layers without importing either: `import molf` stays
    torch-only.
    """
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def _instance_of(module: str, name: str) -> Callable[[nn.Module], bool]:
    def matches(layer: nn.Module) -> bool:
        cls = _imported_class(module, name)
        return cls is not None and isinstance(layer, cls)

    return matches


def _linear_features(layer: nn.Module) -> tuple[int, int]:
    return layer.in_features, layer.out_features


def _conv1d_features(layer: nn.Module) -> tuple[int, int]:
    n_in, n_out = layer.weight.shape  # Conv1D computes x @ W + b with W stored [in, out]
    return int(n_in), int(n_out)


BASE_LAYER_KINDS: list[BaseLayerKind] = [
    # Exactly nn.Linear: a subclass may use its weight in ways a wrapper cannot see (torch's
    # MultiheadAttention reads out_proj.weight without calling out_proj), so each needs its entry.
    BaseLayerKind("nn.Linear", lambda m: type(m) is nn.Linear, _linear_features),
    BaseLayerKind(
        "transformers Conv1D (GPT-2)",
        _instance_of("transformers.pytorch_utils", "Conv1D"),
        _conv1d_features,
        fan_in_fan_out=True,
    ),
    BaseLayerKind(
        "bitsandbytes Linear4bit",
        _instance_of("bitsandbytes.nn", "Linear4bit"),
        _linear_features,
        quantized=True,
    ),
    BaseLayerKind(
        "bitsandbytes Linear8bitLt",
        _instance_of("bitsandbytes.nn", "Linear8bitLt"),
        _linear_features,
        quantized=True,
    ),
]


def base_layer_kind(layer: nn.Module) -> BaseLayerKind | None:
    """The entry of `BASE_LAYER_KINDS` that `layer` is, or None when molf cannot wrap it."""
    return next((k for k in BASE_LAYER_KINDS if k.matches(layer)), None)


def _supported_names() -> str:
    return ", ".join(k.name for k in BASE_LAYER_KINDS)


class MoLFLinear(nn.Module):
    """Wraps a linear layer (kept as `base_layer`) and adds LoRA experts `lora_A[i]`, `lora_B[i]`.

    The base layer is any kind in `BASE_LAYER_KINDS`: `nn.Linear`, transformers' `Conv1D`, or a
    bitsandbytes 4-/8-bit linear (frozen, MoLF-E only). The experts always have PEFT's layout,
    A [r, in] and B [out, r], whatever the layout of the base weight.
    """

    def __init__(self, base_layer: nn.Module, config: MoLFConfig) -> None:
        super().__init__()
        kind = base_layer_kind(base_layer)
        if kind is None:
            raise MolfError(
                f"MoLFLinear: cannot wrap a {type(base_layer).__name__}; "
                f"supported: {_supported_names()}"
            )
        if kind.quantized and config.train_base:
            raise MolfError(
                f"MoLFConfig.train_base: True, but the base layer is a {kind.name} whose "
                "quantized weights cannot be fully fine-tuned; use MoLF-E (train_base=False) on "
                "a quantized base, or load the base unquantized for MoLF"
            )
        self.base_layer = base_layer
        # the entry's name, not the entry: its match functions are closures, which would make a
        # wrapped model unpicklable (deepcopy and pickle must keep working)
        self.kind_name = kind.name
        self.in_features, self.out_features = kind.features(base_layer)
        self.ranks = tuple(config.lora_ranks)
        self.scalings = tuple(config.scalings)
        self.train_base = config.train_base
        self.expert_names = config.expert_names
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        w = base_layer.weight
        # Experts on a packed integer weight train in float32, as peft's do on a quantized base.
        dtype = torch.float32 if kind.quantized else w.dtype
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=dtype))
            for r in self.ranks
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=dtype))
            for r in self.ranks
        )
        self.reset_lora_parameters()
        if not config.train_base:
            for p in base_layer.parameters():
                p.requires_grad_(False)

    @property
    def kind(self) -> BaseLayerKind:
        """The `BASE_LAYER_KINDS` entry of the base layer (how to read, merge and export it)."""
        return next(k for k in BASE_LAYER_KINDS if k.name == self.kind_name)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's init: A kaiming-uniform(a=sqrt(5)), B = 0, so the wrapped layer equals the base."""
        for a, b in zip(self.lora_A, self.lora_B):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b.zero_()

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads `module.weight` (e.g. dtype checks) keeps working."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def fft_expert(self) -> list[nn.Parameter]:
        """Parameters of expert 0, the full fine-tuning expert: W and b."""
        return [p for p in (self.base_layer.weight, self.base_layer.bias) if p is not None]

    def lora_experts(self) -> list[list[nn.Parameter]]:
        """[A_i, B_i] for each LoRA expert."""
        return [[a, b] for a, b in zip(self.lora_A, self.lora_B)]

    def experts(self) -> list[list[nn.Parameter]]:
        """The routed experts, in routing order: FFT first (when trained), then the LoRA experts."""
        return ([self.fft_expert()] if self.train_base else []) + self.lora_experts()

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """sum_i s_i B_i A_i computed in `dtype`, laid out [out, in] (transpose for Conv1D)."""
        delta = torch.zeros(
            self.out_features, self.in_features, dtype=dtype, device=self.weight.device
        )
        for s, a, b in zip(self.scalings, self.lora_A, self.lora_B):
            delta += s * (b.to(dtype) @ a.to(dtype))
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.ranks:
            return y
        xd = self.dropout(x).to(self.lora_A[0].dtype)
        for s, a, b in zip(self.scalings, self.lora_A, self.lora_B):
            y = y + (xd @ a.t() @ b.t()).to(y.dtype) * s
        return y

    def extra_repr(self) -> str:
        return f"experts={list(self.expert_names)}, scalings={[round(s, 4) for s in self.scalings]}"


def _name_matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_target(name: str, config: MoLFConfig) -> bool:
    if _name_matches(name, tuple(config.exclude_modules)):
        return False
    target = config.target_modules
    if target == "all-linear":
        return True
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return _name_matches(name, tuple(target))


def _output_head(model: nn.Module, config: MoLFConfig) -> str | None:
    """The dotted name of the model's output layer when "all-linear" must leave it alone: the
    default exclusion `lm_head` means the output layer whatever the model calls it (GPT-NeoX's
    `embed_out`), found as transformers does, by `get_output_embeddings()`. None otherwise."""
    if config.target_modules != "all-linear" or "lm_head" not in config.exclude_modules:
        return None
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        head = get()
    except (AttributeError, NotImplementedError):  # a model class without an output layer
        return None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head and n), None)


def _own_weights(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters of 2+ dims held by `module` itself (not its children): weight-like tensors."""
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]


def _shown(target: str | tuple[str, ...]) -> str:
    return repr(target if isinstance(target, str) else list(target))


def _type_counts(modules: list[nn.Module]) -> str:
    counts: dict[str, int] = {}
    for m in modules:
        counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


# Called with every model `wrap` returns. molf.saving registers the guard that makes a wrapped
# transformers model's own save_pretrained write molf's format: the saving code depends on the
# layer, never the other way round.
_WRAP_HOOKS: list[Callable[[nn.Module], None]] = []


def on_wrap(hook: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Run `hook(model)` on every model `wrap` returns (for `molf.saving`'s guard)."""
    _WRAP_HOOKS.append(hook)
    return hook


def wrap(model: nn.Module, config: MoLFConfig | None = None) -> nn.Module:
    """Replace every target linear layer of `model` by a `MoLFLinear`, in place; returns `model`.

    Targets are the modules `config.target_modules` selects whose type is in `BASE_LAYER_KINDS`.
    Raises MolfError, before changing anything, when nothing can be wrapped (naming the types the
    patterns did match), when named targets include a weight-holding module of another type, when
    the model is already wrapped, or when MoLF (train_base=True) targets a quantized layer. Under
    "all-linear" it warns about weight tensors it left unwrapped (e.g. fused MoE experts) and, for
    every wrapped layer whose weight is shared (a tied lm_head), about what training does to it.
    """
    config = config or MoLFConfig()
    if molf_modules(model):
        raise MolfError("wrap: the model is already wrapped by molf")
    head = _output_head(model, config)
    matched = [
        (n, m) for n, m in model.named_modules() if n and n != head and _is_target(n, config)
    ]
    targets = [(n, m) for n, m in matched if base_layer_kind(m) is not None]
    named = config.target_modules != "all-linear"
    if named:
        # A module the user named but molf cannot wrap is an error, never a silent skip.
        refused = [(n, m) for n, m in matched if base_layer_kind(m) is None and _own_weights(m)]
        if refused:
            name, module = refused[0]
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            raise MolfError(
                f"MoLFConfig.target_modules: {_shown(config.target_modules)} matches '{name}'{more}, a "
                f"{type(module).__name__}, which molf cannot wrap (supported: "
                f"{_supported_names()}); narrow target_modules or add it to exclude_modules"
            )
    if not targets:
        seen = [m for _, m in matched if named or _own_weights(m)]
        what = f"it matched {_type_counts(seen)}" if seen else "it matched no module"
        raise MolfError(
            f"MoLFConfig.target_modules: no layer molf can wrap ({_supported_names()}) in "
            f"{type(model).__name__} matches {_shown(config.target_modules)} (excluding "
            f"{list(config.exclude_modules)}); {what}"
        )
    if config.train_base:
        quantized = [(n, m) for n, m in targets if base_layer_kind(m).quantized]
        if quantized:
            name, module = quantized[0]
            raise MolfError(
                f"MoLFConfig.train_base: True, but '{name}' is a {base_layer_kind(module).name} "
                f"({len(quantized)} quantized target layers): quantized weights cannot be fully "
                "fine-tuned; use MoLF-E (train_base=False) on a quantized base (QLoRA-style), or "
                "load the base unquantized for MoLF"
            )
    for name, _ in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoLFLinear(getattr(parent, child), config))
    if config.freezes_non_wrapped:
        wrapped_params = {
            id(p) for m in molf_modules(model).values() for e in m.lora_experts() for p in e
        }
        if config.train_base:
            wrapped_params |= {id(p) for m in molf_modules(model).values() for p in m.fft_expert()}
        for p in model.parameters():
            if id(p) not in wrapped_params:
                p.requires_grad_(False)
    model.molf_config = config
    guard.watch(p for m in molf_modules(model).values() for e in m.experts() for p in e)
    _warn_shared(model, config)
    if not named:
        _warn_unwrapped(model, config, head)
    for hook in _WRAP_HOOKS:
        hook(model)
    return model


def shared_base_weights(model: nn.Module) -> dict[str, list[str]]:
    """Wrapped modules whose base weight is also held elsewhere in `model` (a tied lm_head), with
    the other names of that tensor: {"lm_head": ["model.embed_tokens.weight"]}."""
    holders: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(n)
    shared = {}
    for name, m in molf_modules(model).items():
        others = [n for n in holders.get(id(m.weight), []) if n != f"{name}.base_layer.weight"]
        if others:
            shared[name] = others
    return shared


def _warn_shared(model: nn.Module, config: MoLFConfig) -> None:
    for name, others in shared_base_weights(model).items():
        also = ", ".join(others)
        if config.train_base:
            what = (
                "its FFT expert is that one matrix: it is scored on the gradient of both uses and, "
                f"when the FFT expert wins on '{name}', {also} moves with it"
            )
        elif not config.freezes_non_wrapped:
            what = f"so {also} stays frozen with the base, although freeze_non_wrapped=False"
        else:
            continue  # frozen either way; merge_and_unload says what it does
        warnings.warn(
            f"molf.wrap: '{name}' shares its weight with {also}; {what}. "
            "molf.merge_and_unload unties them.",
            stacklevel=3,
        )


def _warn_unwrapped(model: nn.Module, config: MoLFConfig, head: str | None) -> None:
    """Under "all-linear": name the weight tensors of 2+ dims left unwrapped, other than
    embeddings, norms and excluded modules (lm_head, the output layer `head`): fused MoE experts,
    routers, convolutions, linear subclasses molf does not know. The same name in every layer is
    listed once."""
    skip: set[int] = set()
    for name, m in model.named_modules():
        if (
            isinstance(m, (MoLFLinear, nn.Embedding))
            or "norm" in type(m).__name__.lower()
            or (name and _name_matches(name, tuple(config.exclude_modules)))
            or (name and name == head)
        ):
            skip |= {id(p) for p in m.parameters()}
    groups: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        for pname, p in _own_weights(m):
            if id(p) in skip:
                continue
            skip.add(id(p))
            full = f"{name}.{pname}" if name else pname
            key = re.sub(r"\.\d+\.", ".*.", full)
            if key not in groups:
                state = "trainable" if p.requires_grad else "frozen"
                groups[key] = [f"{list(p.shape)} ({type(m).__name__}, {state})"]
            groups[key].append(full)
    if not groups:
        return
    listed = [
        f"{key} {v[0]}" + (f" x{len(v) - 1}" if len(v) > 2 else "") for key, v in groups.items()
    ]
    warnings.warn(
        f"molf.wrap: target_modules='all-linear' left {sum(len(v) - 1 for v in groups.values())} "
        f"weight tensors unwrapped, of types molf cannot wrap (supported: {_supported_names()}): "
        + "; ".join(listed)
        + ". Trainable ones train as plain parameters, outside the routing "
        "(freeze_non_wrapped=True freezes them)",
        stacklevel=3,
    )


def molf_modules(model: nn.Module) -> dict[str, MoLFLinear]:
    """The wrapped modules of `model` by dotted name, in `named_modules` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoLFLinear)}
