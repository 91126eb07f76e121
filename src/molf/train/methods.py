"""The fine-tuning methods of `molf train`, one `Method` object each, and their registry.

A method says how it turns a plain causal LM into its trainable model, which optimizer trains it,
what a finished run exports, which learning-rate keys of the config it reads, how reports name it,
and which learning rates `molf compare` tries for it. The config's validation, the CLI's choices,
the training loop, checkpoints, the distributed checks, the compare grid and its report all ask
this registry, so a new method is one `register(Method(...))` below, plus its bundled config
`configs/<name>.yaml`.

Where the config's keys go (`build_model(model, cfg)`, then `build_optimizer(model, cfg)`):

| config key | fft | lora, lora-160, adalora | molf | molf-e, molf-e-k2 |
| --- | --- | --- | --- | --- |
| `lora_rank` | - | peft `r` (lora-160: sum of `molf_e_ranks`; adalora: target rank) | `MoLFConfig.lora_ranks` | - |
| `molf_e_ranks` | - | lora-160's rank | - | `MoLFConfig.lora_ranks` |
| `lora_alpha` | - | peft `lora_alpha` (adalora: s x init rank, `adalora_schedule`) | `MoLFConfig.lora_alphas` | each expert's alpha |
| `molf_e_alphas` | - | - | - | `MoLFConfig.lora_alphas` (`molf_e_alphas()`) |
| `use_rslora`, `lora_dropout`, `target_modules` | - | peft config | `MoLFConfig` | `MoLFConfig` |
| `lr_fft`, `weight_decay_fft` | torch AdamW | - | `MoLFAdamW` FFT expert (and other params) | - |
| `lr_lora`, `weight_decay_lora` | - | torch AdamW | `MoLFAdamW` LoRA expert | `MoLFAdamW` both experts |
| `betas`, `eps` | AdamW | AdamW | `MoLFAdamW` | `MoLFAdamW` |
| `score`, `score_eps`, `decay_bias`, `top_k` | - | - | `MoLFAdamW` | `MoLFAdamW` (`molf-e-k2` implies `top_k: 2`) |

The schedule, batch, data and evaluation keys are the loop's (`molf.train.loop`), the same for
every method.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import molf
from molf.config import lora_scale as core_lora_scale
from molf.errors import MolfError

if TYPE_CHECKING:
    from molf.train.settings import TrainConfig


# one learning-rate candidate: a value for every lr key, or one value per key (in order)
LRCandidate = float | tuple[float, ...]


def lr_values(keys: tuple[str, ...], candidate: LRCandidate) -> dict[str, float]:
    """The config values of one learning-rate candidate (`Method.lr_grids`)."""
    if isinstance(candidate, tuple):
        return dict(zip(keys, candidate, strict=True))
    return {k: candidate for k in keys}


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    `build_model(model, cfg, total_steps)` makes the trainable model in place (new adapter
    weights draw from the global RNG; `total_steps` is for methods with a schedule of their
    own); `build_optimizer(model, cfg)` its optimizer. `merge(model)` gives the plain
    transformers model a run saves as `final/model`; `save_adapter(model, cfg, directory)`, when
    set, also writes a PEFT adapter into the empty `directory` (`final/adapter`).

    `lr_keys`: the config keys holding its learning rates. `lr_grids`: the candidates `molf
    compare` tries per budget name, first value = the default (docs/compare.md says why each
    grid is what it is); a number sets every key of `lr_keys`, a tuple one value per key, in
    order (MoLF at lr_lora = 5 x lr_fft: `(1e-4, 5e-4)`).

    Routed methods (MoLFAdamW chooses an expert per module and step) give `n_experts(cfg)`, which
    bounds `top_k`, and `routing`, what the routing chooses between, for the report.

    `after_step(model, step)` runs after every optimizer step; `save_state` / `load_state` carry
    state the method keeps outside the model and optimizer through checkpoints.
    `fsdp2_refusal`: why it cannot run under FSDP2, if it cannot.
    `implies`: config values the method stands for (MoLF-E at top_k 2 is `molf-e` with
    `top_k: 2`): a config naming the method gets them unless it sets them, and a config that
    sets another value is refused.

    `claim_roles`: the parts the method plays in the report's paper claims (`ROLES`), so that
    the report asks the registry rather than comparing method names.
    """

    name: str
    label: str
    lr_keys: tuple[str, ...]
    build_model: Callable[[nn.Module, TrainConfig, int], nn.Module]
    build_optimizer: Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]
    merge: Callable[[nn.Module], nn.Module]
    save_adapter: Callable[[nn.Module, TrainConfig, Path], None] | None = None
    lr_grids: Mapping[str, tuple[LRCandidate, ...]] = field(default_factory=dict)
    n_experts: Callable[[TrainConfig], int] | None = None
    routing: str | None = None
    after_step: Callable[[nn.Module, int], None] | None = None
    save_state: Callable[[nn.Module], dict[str, Any]] | None = None
    load_state: Callable[[nn.Module, dict[str, Any]], None] | None = None
    fsdp2_refusal: str | None = None
    implies: Mapping[str, Any] = field(default_factory=dict)
    claim_roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.claim_roles) - set(ROLES))
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown claim roles {unknown}")
        if (self.n_experts is None) != (self.routing is None):
            raise ValueError(f"method {self.name!r}: give both n_experts and routing, or neither")
        if (self.save_state is None) != (self.load_state is None):
            raise ValueError(f"method {self.name!r}: give both save_state and load_state")
        for budget, grid in self.lr_grids.items():
            for lr in grid:
                if isinstance(lr, tuple) and len(lr) != len(self.lr_keys):
                    raise ValueError(
                        f"method {self.name!r}: lr_grids[{budget!r}] candidate {lr} needs one "
                        f"value per key of {self.lr_keys}"
                    )

    @property
    def routed(self) -> bool:
        return self.n_experts is not None

    @property
    def exports(self) -> tuple[str, ...]:
        """The directories under `final/` a finished run holds."""
        return ("adapter", "model") if self.save_adapter is not None else ("model",)


# What a method can stand for in the report's claims (docs/compare.md, Claims):
ROLES = {
    "full": "the full fine-tuning baseline of claim 1",
    "lora": "the LoRA baseline of claim 1 (and the bar claim 2's baseline must reach)",
    "mixture": "the method claim 1 is about (MoLF)",
    "efficient": "the method claim 2 is about (MoLF-E)",
    "adaptive": "the adaptive-LoRA baseline of claim 2",
    "same_size": "a plain LoRA with MoLF-E's parameter count",
    "efficient_variant": "another MoLF-E setting set against the same-size LoRA",
}

# the roles of the two claims themselves (the others are side comparisons)
CLAIM_ROLES = frozenset({"full", "lora", "mixture", "efficient", "adaptive"})

REGISTRY: dict[str, Method] = {}


def in_claims(name: str) -> bool:
    """Whether method `name` takes part in one of the two paper claims."""
    return bool(CLAIM_ROLES & set(get(name).claim_roles))


def with_role(role: str, among: list[str] | tuple[str, ...] | None = None) -> str | None:
    """The first registered method (of `among`, when given) that plays `role`, or None."""
    if role not in ROLES:
        raise ValueError(f"unknown claim role {role!r}")
    for method in REGISTRY.values():
        if role in method.claim_roles and (among is None or method.name in among):
            return method.name
    return None


def register(method: Method) -> Method:
    """Add `method` to the registry (a name already taken is an error)."""
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered already")
    REGISTRY[method.name] = method
    return method


def names() -> tuple[str, ...]:
    """Every registered method's name, in registration order."""
    return tuple(REGISTRY)


def get(name: str) -> Method:
    """The method called `name`; a MolfError naming the known ones otherwise."""
    method = REGISTRY.get(name)
    if method is None:
        raise MolfError(f"unknown method '{name}' (known: {', '.join(REGISTRY)})")
    return method


def label(name: str) -> str:
    """How tables and plots name a method; an unknown name (an old grid's) stays as it is."""
    method = REGISTRY.get(name)
    return method.label if method is not None else name


# -- models ----------------------------------------------------------------------------------------
def _train_everything(model: nn.Module, cfg: TrainConfig, total_steps: int) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _peft_options(cfg: TrainConfig) -> dict[str, Any]:
    return dict(
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )


def _peft_model(model: nn.Module, peft_config: Any) -> nn.Module:
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as e:  # peft's words for "no module matched"
        raise MolfError(f"config key 'target_modules': {e}") from None


def _lora_model(model: nn.Module, cfg: TrainConfig, total_steps: int) -> nn.Module:
    from peft import LoraConfig

    return _peft_model(model, LoraConfig(r=cfg.lora_rank, **_peft_options(cfg)))


def _lora_sum_model(model: nn.Module, cfg: TrainConfig, total_steps: int) -> nn.Module:
    """Plain LoRA of rank r1 + r2 (MoLF-E's ranks): the same trainable parameters as MoLF-E."""
    from peft import LoraConfig

    return _peft_model(model, LoraConfig(r=sum(cfg.molf_e_ranks), **_peft_options(cfg)))


def lora_scale(cfg: TrainConfig, rank: int | None = None) -> float:
    """LoRA's scale s of a run's config at `rank` (default `lora_rank`), `molf.config.lora_scale`."""
    return core_lora_scale(cfg.lora_alpha, cfg.lora_rank if rank is None else rank, cfg.use_rslora)


# AdaLoRA's orthogonality regulariser weight: the AdaLoRA authors' scripts use 0.1 (peft: 0.5)
ADALORA_ORTH_REG_WEIGHT = 0.1


def adalora_schedule(cfg: TrainConfig, total_steps: int) -> dict[str, Any]:
    """AdaLoRA's ranks, scale and rank schedule, fitted to the run (docs/compare.md, AdaLoRA).

    peft scales AdaLoRA's update by `lora_alpha / init_r` (init_r stays the divisor while ranks
    are pruned; rsLoRA does not apply), so `lora_alpha = s * init_r` makes its scale LoRA's s at
    the target rank: the two start from the same footing. The ranks start at 1.5x the target;
    pruning waits out the warmup (tinit), ends with a fifth of the run left to train at the
    final ranks (tfinal), and masks every ~5% of the run (deltaT), whatever the step count.
    The orthogonality regulariser's weight is 0.1, the AdaLoRA authors' value in their GLUE,
    SQuAD and summarisation scripts (peft's default is 0.5): at 0.5 it adds about half the
    task's loss at the start of a short run and pulls A and B towards orthonormality.
    """
    init_r = max(cfg.lora_rank * 3 // 2, cfg.lora_rank)
    total = max(int(total_steps), 1)
    tinit = max(math.ceil(cfg.warmup_ratio * total), int(0.1 * total))
    tfinal = int(0.2 * total)
    if tinit + tfinal >= total:  # too short a run to prune in: prune at once, as peft allows
        tinit, tfinal = 0, 0
    return dict(
        init_r=init_r,
        target_r=cfg.lora_rank,
        lora_alpha=lora_scale(cfg) * init_r,
        total_step=total,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=max(1, total // 20),
        orth_reg_weight=ADALORA_ORTH_REG_WEIGHT,
    )


def _adalora_model(model: nn.Module, cfg: TrainConfig, total_steps: int) -> nn.Module:
    from peft import AdaLoraConfig

    options = _peft_options(cfg)
    options.update(adalora_schedule(cfg, total_steps))
    options.pop("use_rslora")  # AdaLoRA ignores it; its scale is set through lora_alpha above
    return _peft_model(model, AdaLoraConfig(**options))


def _molf_model(model: nn.Module, cfg: TrainConfig, total_steps: int, **config: Any) -> nn.Module:
    """MoLF's layer on every target: an FFT expert and one LoRA expert of `lora_rank` (`config`:
    other MoLFConfig fields, for the ablations)."""
    settings = dict(
        lora_ranks=(cfg.lora_rank,),
        lora_alphas=(cfg.lora_alpha,),
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        target_modules=cfg.target_modules,
    )
    return molf.wrap(model, molf.MoLFConfig(**(settings | config)))


def _hybrid_model(model: nn.Module, cfg: TrainConfig, total_steps: int) -> nn.Module:
    """MoLF's layer with the routing fixed by module type: in the types of `hybrid_fft_types`
    only the FFT expert trains, elsewhere only the LoRA expert. MoLFAdamW then steps the one
    expert with a gradient (the other scores -inf), so everything else is trained as MoLF
    trains it: the ablation that asks whether per-step routing adds anything over this split."""
    from molf.routing import module_type

    model = _molf_model(model, cfg, total_steps)
    fft_types = set(cfg.hybrid_fft_types)
    found = {module_type(n) for n in molf.molf_modules(model)}
    unknown = sorted(fft_types - found)
    if unknown:
        raise MolfError(
            f"config key 'hybrid_fft_types': {unknown[0]!r} is not a type of this model's wrapped "
            f"modules ({', '.join(sorted(found))})"
        )
    for name, m in molf.molf_modules(model).items():
        full = module_type(name) in fft_types
        for p in m.fft_expert():
            p.requires_grad_(full)
        for expert in m.lora_experts():
            for p in expert:
                p.requires_grad_(not full)
    return model


def _lora_other_model(model: nn.Module, cfg: TrainConfig, total_steps: int) -> nn.Module:
    """A LoRA expert in every target layer, base weights frozen, and the parameters outside them
    (embeddings, norms, a tied head) trained as MoLF trains them: the ablation that separates
    what MoLF gains over plain LoRA from those parameters from what it gains from routing."""
    return _molf_model(model, cfg, total_steps, train_base=False, freeze_non_wrapped=False)


def molf_e_alphas(cfg: TrainConfig) -> tuple[float, ...]:
    """MoLF-E's alpha per expert: `molf_e_alphas`, else `lora_alpha` for each rank."""
    if cfg.molf_e_alphas is not None:
        return tuple(float(a) for a in cfg.molf_e_alphas)
    return tuple(float(cfg.lora_alpha) for _ in cfg.molf_e_ranks)


def _molf_e_model(model: nn.Module, cfg: TrainConfig, total_steps: int) -> nn.Module:
    config = molf.MoLFConfig(
        lora_ranks=tuple(cfg.molf_e_ranks),
        lora_alphas=molf_e_alphas(cfg),
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        target_modules=cfg.target_modules,
        train_base=False,
    )
    return molf.wrap(model, config)


# -- optimizers ------------------------------------------------------------------------------------
def _adamw(lr_key: str, decay_key: str) -> Callable[[nn.Module, TrainConfig], torch.optim.AdamW]:
    """torch's AdamW over the trainable parameters at the config's `lr_key` and `decay_key`;
    tensors with dim < 2 (biases, norms) are not decayed (docs/method.md section 7.10)."""

    def build(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
        lr, decay = getattr(cfg, lr_key), getattr(cfg, decay_key)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": decay},
            {"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)

    return build


def _molf_adamw(model: nn.Module, cfg: TrainConfig, **overrides: Any) -> molf.MoLFAdamW:
    """MoLFAdamW at the config's settings (`overrides` replace some of them)."""
    settings = dict(
        lr_fft=cfg.lr_fft,
        lr_lora=cfg.lr_lora,
        weight_decay_fft=cfg.weight_decay_fft,
        weight_decay_lora=cfg.weight_decay_lora,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        score=cfg.score,
        score_eps=cfg.score_eps,
        decay_bias=cfg.decay_bias,
        top_k=cfg.top_k,
    )
    return molf.MoLFAdamW(model, **(settings | overrides))


def _lora_other_adamw(model: nn.Module, cfg: TrainConfig) -> molf.MoLFAdamW:
    """MoLFAdamW with the parameters outside the LoRA experts at MoLF's settings for them: the
    FFT learning rate and weight decay (MoLF's `lr_other` default), not the LoRA ones."""
    return _molf_adamw(
        model, cfg, lr_other=cfg.lr_fft, weight_decay_other=cfg.weight_decay_fft, top_k=1
    )


# -- exports ---------------------------------------------------------------------------------------
def _unchanged(model: nn.Module) -> nn.Module:
    return model


def _peft_merge(model: nn.Module) -> nn.Module:
    return model.merge_and_unload()


def adapter_base(model: nn.Module, cfg: TrainConfig) -> str:
    """The base an adapter names: where `load_model` found the model's files (the hub id, the
    absolute local directory, an embedded model's cached safetensors directory), so that peft's
    `AutoPeftModelForCausalLM` resolves it; the run's model name for the in-memory tiny models."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = getattr(getattr(base, "config", None), "_name_or_path", None)
    return str(found) if found else cfg.model


def _save_peft_adapter(model: nn.Module, cfg: TrainConfig, directory: Path) -> None:
    model.peft_config["default"].base_model_name_or_path = adapter_base(model, cfg)
    # save_embedding_layers=False: embeddings are not trained, and "auto" looks up the hub
    model.save_pretrained(directory, save_embedding_layers=False)


def _save_molf_e_adapter(model: nn.Module, cfg: TrainConfig, directory: Path) -> None:
    # export_peft_lora writes a directory atomically by itself: let it make a subdirectory of
    # ours, then lift its files up.
    inner = directory / "adapter"
    molf.export_peft_lora(model, inner, base_model_name_or_path=adapter_base(model, cfg))
    for f in inner.iterdir():
        f.rename(directory / f.name)
    inner.rmdir()


# -- AdaLoRA's rank allocator ----------------------------------------------------------------------
def _adalora_after_step(model: nn.Module, step: int) -> None:
    model.base_model.update_and_allocate(step)


_ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def _adalora_state(model: nn.Module) -> dict[str, Any]:
    allocator = model.base_model.rankallocator
    return {k: dict(getattr(allocator, k)) for k in _ALLOCATOR_STATE}


def _load_adalora_state(model: nn.Module, state: dict[str, Any]) -> None:
    allocator = model.base_model.rankallocator
    for k, v in state.items():
        setattr(allocator, k, dict(v))


# -- the methods -----------------------------------------------------------------------------------
# The learning-rate grids of `molf compare`, per budget; docs/compare.md gives the reasons.
register(
    Method(
        name="fft",
        label="FFT",
        lr_keys=("lr_fft",),
        build_model=_train_everything,
        build_optimizer=_adamw("lr_fft", "weight_decay_fft"),
        merge=_unchanged,
        lr_grids={"smoke": (1e-3,), "small": (1e-4, 5e-5), "paper": (1e-4, 5e-5, 2e-5)},
        claim_roles=("full",),
    )
)
register(
    Method(
        name="lora",
        label="LoRA",
        lr_keys=("lr_lora",),
        build_model=_lora_model,
        build_optimizer=_adamw("lr_lora", "weight_decay_lora"),
        merge=_peft_merge,
        save_adapter=_save_peft_adapter,
        # smoke: two values, so that the tests exercise the choice on validation
        lr_grids={"smoke": (1e-3, 1e-4), "small": (5e-4, 5e-5), "paper": (5e-4, 5e-5)},
        claim_roles=("lora",),
    )
)
register(
    Method(
        name="adalora",
        label="AdaLoRA",
        lr_keys=("lr_lora",),
        build_model=_adalora_model,
        build_optimizer=_adamw("lr_lora", "weight_decay_lora"),
        merge=_peft_merge,
        save_adapter=_save_peft_adapter,
        lr_grids={"smoke": (1e-3,), "small": (1e-2, 5e-3), "paper": (5e-4, 5e-5)},
        after_step=_adalora_after_step,
        save_state=_adalora_state,
        load_state=_load_adalora_state,
        fsdp2_refusal="peft's AdaLoRA reads its weights outside the forward pass, where FSDP2 "
        "keeps them sharded",
        claim_roles=("adaptive",),
    )
)
MOLF = register(
    Method(
        name="molf",
        label="MoLF",
        lr_keys=("lr_fft", "lr_lora"),
        build_model=_molf_model,
        build_optimizer=_molf_adamw,
        merge=molf.merge_and_unload,
        lr_grids={"smoke": (1e-3,), "small": (1e-4, 5e-5), "paper": (5e-5,)},
        n_experts=lambda cfg: 2,
        routing="FFT expert vs LoRA expert",
        claim_roles=("mixture",),
    )
)
# MoLF routed by the paper's other score, PFN, beside EPD in one grid.
register(
    dataclasses.replace(
        MOLF,
        name="molf-pfn",
        label="MoLF (PFN)",
        routing="FFT expert vs LoRA expert, by the PFN score",
        implies={"score": "pfn"},
        claim_roles=(),
    )
)
# Ablations of MoLF (no part in the paper's claims): the routing frozen into a split by module
# type, and LoRA with the parameters MoLF trains outside the wrapped layers; MoLF's learning rates.
register(
    dataclasses.replace(
        MOLF,
        name="hybrid",
        label="Fixed hybrid",
        build_model=_hybrid_model,
        routing="fixed by module type (hybrid_fft_types to FFT)",
        claim_roles=(),
    )
)
register(
    dataclasses.replace(
        MOLF,
        name="lora-other",
        label="LoRA + embeddings/norms",
        build_model=_lora_other_model,
        build_optimizer=_lora_other_adamw,
        n_experts=lambda cfg: 1,
        routing="none (one LoRA expert)",
        claim_roles=(),
    )
)
MOLF_E = register(
    Method(
        name="molf-e",
        label="MoLF-E",
        lr_keys=("lr_lora",),
        build_model=_molf_e_model,
        build_optimizer=_molf_adamw,
        merge=molf.merge_and_unload,
        save_adapter=_save_molf_e_adapter,
        lr_grids={"smoke": (1e-3,), "small": (5e-4, 5e-5), "paper": (5e-4, 5e-5)},
        n_experts=lambda cfg: len(cfg.molf_e_ranks),
        routing="between the two ranks",
        claim_roles=("efficient",),
    )
)
register(
    dataclasses.replace(
        MOLF_E,
        name="molf-e-k2",
        label="MoLF-E (top-2)",
        routing="between the two ranks (both update every step at top_k 2)",
        # the reference's MoLF-E quickstart: every expert updates every step
        implies={"top_k": 2},
        claim_roles=("efficient_variant",),
    )
)
register(
    Method(
        name="lora-160",
        label="LoRA-160",
        lr_keys=("lr_lora",),
        build_model=_lora_sum_model,
        build_optimizer=_adamw("lr_lora", "weight_decay_lora"),
        merge=_peft_merge,
        save_adapter=_save_peft_adapter,
        # rank r1 + r2 of molf_e_ranks (160 at the default 32 + 128): MoLF-E's parameter count,
        # so the comparison shows what MoLF-E's routing adds over one LoRA of that size
        lr_grids={"smoke": (1e-3,), "small": (5e-4, 5e-5), "paper": (5e-4, 5e-5)},
        claim_roles=("same_size",),
    )
)
