"""MoLFConfig: which linears to wrap and what experts each one gets."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

from molf.errors import MolfError

# Every expert's alpha unless told otherwise: the authors' reference value (docs/method.md 7.1).
# The application (`molf.train.config.TrainConfig.lora_alpha`) reads it from here.
DEFAULT_LORA_ALPHA = 32.0


def lora_scale(alpha: float, rank: int, use_rslora: bool = True) -> float:
    """A LoRA expert's scale s: alpha / sqrt(rank) with rsLoRA (the paper's), else alpha / rank.
    The one place the formula lives: the layer, the baselines and the reports all call it."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


# -- checks shared by the core (MoLFConfig, MoLFAdamW) and the application's config keys ----------
# `name` is how the caller names the value: "MoLFConfig.lora_dropout", "lr_fft", "config key 'betas'".
def check_rate(value: float, name: str) -> None:
    """A learning rate, weight decay or eps: a finite number >= 0."""
    if isinstance(value, bool) or not (
        isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    ):
        raise MolfError(f"{name}: must be a finite number >= 0, got {value}")


def check_dropout(value: float, name: str) -> None:
    """A dropout probability, in [0, 1)."""
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise MolfError(f"{name}: must be in [0, 1), got {value}")


def check_betas(betas: Sequence[float], name: str) -> None:
    """Adam's betas: two numbers in [0, 1)."""
    values = list(betas)
    if len(values) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in values):
        raise MolfError(f"{name}: two numbers in [0, 1), got {values}")


def check_alpha(alpha: float, name: str) -> None:
    """Refuse an alpha that is not a finite number > 0 (a 0 scale trains nothing), naming it."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise MolfError(f"{name}: must be > 0 (the LoRA scale is alpha / sqrt(rank)), got {alpha}")


def _shown(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def sequence_of(value: object, kind: type, field: str, what: str, example: str) -> None:
    """Refuse `value` unless it is a list or tuple of `kind` (bools are not numbers here)."""
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    )
    if not ok:
        raise MolfError(
            f"MoLFConfig.{field}: must be a list or tuple of {what}, such as {example}; "
            f"got {_shown(value)}"
        )


@dataclass
class MoLFConfig:
    """How `molf.wrap` turns each target `nn.Linear` into `W x + b + sum_i s_i B_i A_i dropout(x)`.

    Attributes:
        lora_ranks: rank of each LoRA expert; `(128,)` is the paper's MoLF, `(32, 128)` MoLF-E.
        lora_alphas: alpha of each expert (same length as `lora_ranks`); default 32 for every one,
            the authors' reference value (docs/method.md section 7.1).
        use_rslora: scale s_i = alpha_i / sqrt(r_i) (rsLoRA, the paper's choice) instead of alpha_i / r_i.
        lora_dropout: dropout on the LoRA input; one sample is shared by all experts.
        target_modules: "all-linear", a list of module names (a name matches itself and any module
            whose dotted name ends with ".<name>"), or a regular expression matched against the
            full dotted name.
        exclude_modules: names excluded even when targeted (same matching as a list target).
        train_base: keep W and b trainable as expert 0 (MoLF). False freezes them (MoLF-E).
        freeze_non_wrapped: freeze every parameter outside the wrapped linears (embeddings, norms,
            lm_head). None means "when train_base is False", so MoLF-E is a pure adapter method.
    """

    lora_ranks: Sequence[int] = (128,)
    lora_alphas: Sequence[float] | None = None
    use_rslora: bool = True
    lora_dropout: float = 0.05
    target_modules: str | Sequence[str] = "all-linear"
    exclude_modules: Sequence[str] = field(default_factory=lambda: ("lm_head",))
    train_base: bool = True
    freeze_non_wrapped: bool | None = None

    def __post_init__(self) -> None:
        self._check_types()
        self.lora_ranks = tuple(int(r) for r in self.lora_ranks)
        if self.lora_alphas is None:
            self.lora_alphas = tuple(DEFAULT_LORA_ALPHA for _ in self.lora_ranks)
        self.lora_alphas = tuple(float(a) for a in self.lora_alphas)
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
        self.exclude_modules = tuple(self.exclude_modules)
        self.validate()

    def _check_types(self) -> None:
        """Raise MolfError naming the first field whose value has the wrong type (before the
        conversions in __post_init__, which would fail with a bare TypeError or, for a string,
        silently take its characters)."""
        sequence_of(self.lora_ranks, numbers.Integral, "lora_ranks", "ints", "(128,) or (32, 128)")
        if self.lora_alphas is not None:
            sequence_of(self.lora_alphas, numbers.Real, "lora_alphas", "numbers", "(32.0,)")
        for name in ("use_rslora", "train_base"):
            if not isinstance(getattr(self, name), bool):
                raise MolfError(
                    f"MoLFConfig.{name}: must be True or False, got {_shown(getattr(self, name))}"
                )
        if self.freeze_non_wrapped is not None and not isinstance(self.freeze_non_wrapped, bool):
            raise MolfError(
                "MoLFConfig.freeze_non_wrapped: must be True, False or None, got "
                f"{_shown(self.freeze_non_wrapped)}"
            )
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, numbers.Real):
            raise MolfError(
                f"MoLFConfig.lora_dropout: must be a number, got {_shown(self.lora_dropout)}"
            )
        if not isinstance(self.target_modules, str):
            sequence_of(
                self.target_modules, str, "target_modules", "module names", '("q_proj", "v_proj")'
            )
        sequence_of(self.exclude_modules, str, "exclude_modules", "module names", '("lm_head",)')

    def validate(self) -> None:
        """Raise MolfError (a ValueError) naming the first bad field."""
        for r in self.lora_ranks:
            if r <= 0:
                raise MolfError(f"MoLFConfig.lora_ranks: every rank must be > 0, got {r}")
        if len(self.lora_alphas) != len(self.lora_ranks):
            raise MolfError(
                f"MoLFConfig.lora_alphas: {len(self.lora_alphas)} alphas for "
                f"{len(self.lora_ranks)} lora_ranks; give one alpha per rank"
            )
        for a in self.lora_alphas:
            check_alpha(a, "MoLFConfig.lora_alphas")
        check_dropout(self.lora_dropout, "MoLFConfig.lora_dropout")
        if not self.train_base and not self.lora_ranks:
            raise MolfError(
                "MoLFConfig.train_base: False needs at least one LoRA expert (lora_ranks is empty)"
            )
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise MolfError("MoLFConfig.target_modules: empty")
        elif not self.target_modules:
            raise MolfError("MoLFConfig.target_modules: empty list")

    @property
    def n_experts(self) -> int:
        """Experts per wrapped module: the FFT expert (if train_base) plus the LoRA experts."""
        return len(self.lora_ranks) + int(self.train_base)

    @property
    def scalings(self) -> tuple[float, ...]:
        """s_i for each LoRA expert."""
        return tuple(
            lora_scale(a, r, self.use_rslora) for r, a in zip(self.lora_ranks, self.lora_alphas)
        )

    @property
    def expert_names(self) -> tuple[str, ...]:
        """Readable expert names, e.g. ("fft", "lora_r128") or ("lora_r32", "lora_r128")."""
        names = ["fft"] if self.train_base else []
        counts: dict[int, int] = {}
        for r in self.lora_ranks:
            counts[r] = counts.get(r, 0) + 1
        seen: dict[int, int] = {}
        for r in self.lora_ranks:
            if counts[r] > 1:
                seen[r] = seen.get(r, 0) + 1
                names.append(f"lora{seen[r]}_r{r}")
            else:
                names.append(f"lora_r{r}")
        return tuple(names)

    @property
    def freezes_non_wrapped(self) -> bool:
        """Whether parameters outside the wrapped linears are frozen (resolves the None default)."""
        return (not self.train_base) if self.freeze_non_wrapped is None else self.freeze_non_wrapped
