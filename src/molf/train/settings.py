"""TrainConfig: every setting of one `molf train` run, and the checks each key gets on its own.

The dataclass and its per-key checks live here, apart from `molf.train.config` (reading YAML and
overrides, the bundled configs, the checks that need the method registry), so that the method
registry can name the config type without an import circle.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molf.config import DEFAULT_LORA_ALPHA, check_alpha
from molf.errors import MolfError
from molf.tasks.rows import FILE_SUFFIXES

__all__ = ["TrainConfig", "data_label"]


@dataclass
class TrainConfig:
    """Settings of one fine-tuning run. Defaults follow the paper's setup (docs/method.md section 1)
    where it has one; docs/method.md section 6 lists every default next to the reference's. Sizes
    default to a CPU-sized run. `method` names an entry of `molf.train.methods`."""

    # what
    model: str = "smollm2-135m"
    task: str = "fact-geo"
    data: str | None = None
    method: str = "molf"
    output_dir: str | None = None
    # data
    seed: int = 0  # training randomness (adapter init, dropout, batch order), and the split's
    data_seed: int | None = None  # the split's seed when it should differ (compare's seeds)
    n_train: int | None = 256
    # null: the task's default (32 and 64), or for `sft` about a tenth of the rows each
    n_val: int | None = None
    n_test: int | None = None
    max_length: int = 256
    too_long: str = "truncate"
    packing: bool = False  # concatenate examples up to max_length (molf.train.data.pack)
    # own data, task 'sft' (molf.tasks.sft; checked there, as molf.tasks.TaskOptions)
    val_data: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None
    messages_field: str | None = None
    text_field: str | None = None
    generation_metric: str = "none"  # none | exact_match | contains
    max_new_tokens: int | None = None
    train_split: str | None = None  # a data set's split names, when not train/validation/test
    val_split: str | None = None
    test_split: str | None = None
    # schedule
    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 4
    schedule: str = "cosine"
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    # optimiser: FFT and LoRA learning rates and weight decays (paper: MoLF 5e-5 both, wd 0.1/0.01)
    lr_fft: float = 5e-5
    lr_lora: float = 5e-5
    weight_decay_fft: float = 0.1
    weight_decay_lora: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    score: str = "epd"
    score_eps: float = 1e-8  # the eps inside the score, not Adam's (the reference's 1e-8)
    decay_bias: bool = False  # decay wrapped layers' biases with the FFT expert (reference: no)
    top_k: int = 1
    # adapters
    lora_rank: int = 128
    molf_e_ranks: tuple[int, ...] = (32, 128)
    lora_alpha: float = DEFAULT_LORA_ALPHA  # the reference's, every expert and the LoRA baselines
    molf_e_alphas: tuple[float, ...] | None = None  # MoLF-E per expert (default: lora_alpha each)
    lora_dropout: float = 0.05
    use_rslora: bool = True
    target_modules: str | list[str] = "all-linear"
    # numerics and memory
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    threads: int | None = None  # torch's CPU threads (torch.set_num_threads); null: torch's default
    # evaluation
    eval_batch_size: int = 16
    eval_before: bool = True
    # evaluation during training on the validation split (molf.train.loop.BestTracker)
    eval_every: int = 0  # steps between evaluations (0: none); the last step is always evaluated
    keep_best: bool = False  # export the best evaluated checkpoint as final/, not the last
    best_metric: str | None = None  # default: the task's headline metric
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement
    # bookkeeping
    log_every: int = 1
    save_every: int = 0  # steps between checkpoints (0: none by step count)
    # minutes of training between checkpoints (0: none by time): a kill -9 or an out-of-memory
    # kill loses at most this much; with save_every, whichever comes first
    save_every_minutes: float = 15.0
    keep_checkpoints: int = 2
    # before a MoLF run's first step: predict its step-1 routing from the first batch and warn
    # when one expert would take (nearly) every module (molf.train.forecast_check)
    routing_forecast: bool = True
    max_bad_steps: int = 5
    logger: str = "none"
    progress: bool = True
    distributed: str = "none"
    trust_remote_code: bool = False

    # -- derived ---------------------------------------------------------------------------------
    @property
    def split_seed(self) -> int:
        """The seed the task's splits are drawn with: `data_seed`, else `seed`."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def run_dir(self) -> Path:
        """`output_dir`, else runs/<task>-<method>; for `sft` on a data file, runs/sft-<its
        name>-<method>, so that runs on two files do not share a directory."""
        if self.output_dir:
            return Path(self.output_dir)
        if self.task == "sft" and self.data:
            return Path(f"runs/sft-{data_label(self.data)}-{self.method}")
        return Path(f"runs/{self.task}-{self.method}")

    # The keys the user set (a YAML of theirs, overrides, flags), filled in by `load_config`;
    # None: not known (a TrainConfig built in code), and nothing is adapted to the data.
    user_keys: frozenset[str] | None = dataclasses.field(
        default=None, repr=False, compare=False, metadata={"internal": True}
    )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("user_keys")
        d["betas"] = list(self.betas)
        d["molf_e_ranks"] = list(self.molf_e_ranks)
        if self.molf_e_alphas is not None:
            d["molf_e_alphas"] = list(self.molf_e_alphas)
        return d

    def validate(self) -> None:
        """Range, choice and name checks of every key; raise MolfError naming the key. What
        depends on the method (its learning rates, implied values, expert count) is checked by
        `molf.train.config.load_config`, which knows the method registry."""
        choices = {
            "too_long": ("truncate", "refuse"),
            "schedule": ("cosine", "linear", "constant"),
            "dtype": ("float32", "bfloat16"),
            "logger": ("none", "tensorboard", "wandb"),
            "distributed": ("none", "ddp", "fsdp2"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise MolfError(
                    f"config key '{key}': must be one of {', '.join(allowed)}, got {getattr(self, key)!r}"
                )
        positive = [
            "batch_size",
            "grad_accum",
            "max_length",
            "lora_rank",
            "eval_batch_size",
            "log_every",
        ]
        for key in positive:
            if getattr(self, key) <= 0:
                raise MolfError(f"config key '{key}': must be > 0, got {getattr(self, key)}")
        for key in (
            "save_every",
            "max_bad_steps",
            "keep_checkpoints",
            "eval_every",
            "early_stopping_patience",
        ):
            if getattr(self, key) < 0:
                raise MolfError(f"config key '{key}': must be >= 0, got {getattr(self, key)}")
        for key in ("n_train", "n_test", "max_steps", "threads"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise MolfError(f"config key '{key}': must be > 0 or null, got {value}")
        if self.n_val is not None and self.n_val < 0:
            raise MolfError(f"config key 'n_val': must be >= 0 or null, got {self.n_val}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise MolfError(f"config key 'epochs': must be a finite number > 0, got {self.epochs}")
        for key in (
            "lr_fft",
            "lr_lora",
            "weight_decay_fft",
            "weight_decay_lora",
            "max_grad_norm",
            "lora_alpha",
            "eps",
            "score_eps",
            "save_every_minutes",
        ):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise MolfError(f"config key '{key}': must be a finite number >= 0, got {value}")
        if not self.score_eps > 0:
            raise MolfError(
                f"config key 'score_eps': must be > 0 (it keeps the score finite where a moment "
                f"is 0), got {self.score_eps}"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise MolfError(
                f"config key 'warmup_ratio': must be in [0, 1), got {self.warmup_ratio}"
            )
        if not 0 <= self.lora_dropout < 1:
            raise MolfError(
                f"config key 'lora_dropout': must be in [0, 1), got {self.lora_dropout}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise MolfError(f"config key 'betas': two numbers in [0, 1), got {list(self.betas)}")
        check_alpha(self.lora_alpha, "config key 'lora_alpha'")
        if self.molf_e_alphas is not None:
            if len(self.molf_e_alphas) != len(self.molf_e_ranks):
                raise MolfError(
                    f"config key 'molf_e_alphas': one alpha per rank of molf_e_ranks "
                    f"{list(self.molf_e_ranks)}, got {list(self.molf_e_alphas)}"
                )
            for a in self.molf_e_alphas:
                check_alpha(a, "config key 'molf_e_alphas'")
        if not self.molf_e_ranks or any(r <= 0 for r in self.molf_e_ranks):
            raise MolfError(
                f"config key 'molf_e_ranks': ranks must be > 0, got {list(self.molf_e_ranks)}"
            )
        for key in ("keep_best", "early_stopping_patience", "best_metric"):
            if getattr(self, key) and not self.eval_every:
                raise MolfError(
                    f"config key '{key}': needs eval_every > 0 (steps between evaluations)"
                )
        if self.eval_every and self.distributed != "none":
            raise MolfError(
                "config key 'eval_every': evaluation during training runs in one process only "
                "(distributed=none)"
            )
        self._validate_names()

    def _validate_names(self) -> None:
        """The keys that name things: the model, the routing score, the target modules, the
        task with its options and data, and the metric `keep_best` compares by."""
        from molf.optim.scores import get_score
        from molf.tasks import TaskOptions, get_task, resolve_source

        if not self.model.strip():
            raise MolfError("config key 'model': empty; give a model name, path or hub id")
        try:
            get_score(self.score)
        except MolfError as e:
            raise MolfError(f"config key 'score': {str(e).removeprefix('score: ')}") from None
        targets = [self.target_modules] if isinstance(self.target_modules, str) else []
        if isinstance(self.target_modules, list):
            targets = self.target_modules
            if not targets or not all(t.strip() for t in targets):
                raise MolfError(
                    f"config key 'target_modules': module names must be non-empty, got {targets}"
                )
        elif self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise MolfError(
                    f"config key 'target_modules': {self.target_modules!r} is neither "
                    f"'all-linear' nor a valid regular expression ({e})"
                ) from None
        for key in (
            "data",
            "val_data",
            "output_dir",
            "prompt_field",
            "completion_field",
            "messages_field",
            "text_field",
            "train_split",
            "val_split",
            "test_split",
            "best_metric",
        ):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise MolfError(f"config key '{key}': empty; leave it unset (null) instead")
        options = TaskOptions.from_config(self)
        task = get_task(self.task, options)
        resolve_source(self.task, self.data)
        known = getattr(task, "metrics", None)
        if self.best_metric is not None and known is not None and self.best_metric not in known:
            raise MolfError(
                f"config key 'best_metric': task '{self.task}' reports {', '.join(known)}, "
                f"not '{self.best_metric}'"
            )


def data_label(data: str) -> str:
    """A data file's name without its extension (a directory's or hub id's last part), in
    characters safe for a directory name: 'my data.jsonl' -> 'my-data'."""
    name = Path(data.rstrip("/\\")).name
    stem = Path(name).stem if Path(name).suffix.lower() in FILE_SUFFIXES else name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "data"
