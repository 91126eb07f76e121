"""TrainConfig: every setting of one `molf train` run, and the checks each key gets on its own.

The dataclass and its per-key checks live here, apart from `molf.train.config` (reading YAML and
overrides, the bundled configs, the checks that need the method registry), so that the method
registry can name the config type without an import circle.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molf.config import DEFAULT_LORA_ALPHA, check_alpha, check_betas, check_dropout, check_rate
from molf.errors import MolfError
from molf.tasks.rows import FILE_SUFFIXES

__all__ = ["TrainConfig", "data_label", "describe_keys", "key"]


def key(default: Any, help: str) -> Any:
    """A config key: its default and its help text, the one place both live (`describe_keys`
    gives them to `molf train --keys` and the docs' key table)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: default.copy(), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def describe_keys() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) of every config key, in the dataclass's order."""
    hints = typing.get_type_hints(TrainConfig)
    rows = []
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("internal"):
            continue
        kind = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
        rows.append((f.name, kind, _yaml_value(f.default), f.metadata.get("help", "")))
    return rows


def _yaml_value(value: Any) -> str:
    """A default as it is written in a YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class TrainConfig:
    """Settings of one fine-tuning run. Defaults follow the paper's setup (docs/method.md section 1)
    where it has one; docs/method.md section 6 lists every default next to the reference's. Sizes
    default to a CPU-sized run. `method` names an entry of `molf.train.methods`."""

    # what
    model: str = key(
        "smollm2-135m", "smollm2-135m, gemma3-270m, tiny-llama, a local path or a hub id"
    )
    task: str = key("fact-geo", "a task name (`molf train --help` lists them); sft: your own data")
    data: str | None = key(None, "data file, `save_to_disk` directory or hub id of the task")
    method: str = key("molf", "fft, lora, lora-160, adalora, molf, molf-e, molf-e-k2")
    output_dir: str | None = key(None, "null: runs/<task>-<method> (sft: runs/sft-<file>-<method>)")
    # data
    seed: int = key(0, "training randomness (adapter init, dropout, batch order) and the split")
    data_seed: int | None = key(None, "the split's seed when it should differ from seed")
    n_train: int | None = key(256, "training examples (null: all the task's)")
    n_val: int | None = key(None, "validation records (null: the task's 32, for sft a tenth)")
    n_test: int | None = key(None, "test records (null: the task's 64, for sft a tenth)")
    max_length: int = key(256, "tokens per example")
    too_long: str = key("truncate", "truncate or refuse examples over max_length")
    packing: bool = key(False, "concatenate examples up to max_length, each keeping its positions")
    # own data, task 'sft' (molf.tasks.sft; checked there, as molf.tasks.TaskOptions)
    val_data: str | None = key(None, "sft: a validation file (default: a split of data)")
    prompt_field: str | None = key(None, "sft: the prompt column (default: prompt)")
    completion_field: str | None = key(None, "sft: the completion column (default: completion)")
    messages_field: str | None = key(None, "sft: the conversation column (default: messages)")
    text_field: str | None = key(None, "sft: the plain-text column (default: text)")
    generation_metric: str = key("none", "sft: none, exact_match or contains (greedy generation)")
    max_new_tokens: int | None = key(None, "sft: tokens generated for generation_metric")
    train_split: str | None = key(None, "sft: the data set's training split, if not train")
    val_split: str | None = key(None, "sft: its validation split, if not validation")
    test_split: str | None = key(None, "sft: its test split, if not test")
    # schedule
    epochs: float = key(2.0, "passes over the training examples")
    max_steps: int | None = key(None, "optimizer steps, overriding epochs")
    batch_size: int = key(8, "examples per micro-batch")
    grad_accum: int = key(4, "micro-batches per optimizer step")
    schedule: str = key("cosine", "cosine, linear or constant, after the warmup")
    warmup_ratio: float = key(0.1, "share of the steps spent warming the learning rate up")
    max_grad_norm: float = key(1.0, "gradient clipping norm (0: off)")
    # optimiser (paper: MoLF 5e-5 both, weight decay 0.1 / 0.01)
    lr_fft: float = key(5e-5, "learning rate of the FFT expert (and of FFT)")
    lr_lora: float = key(5e-5, "learning rate of the LoRA experts (and of the LoRA baselines)")
    weight_decay_fft: float = key(0.1, "decoupled weight decay of the FFT expert")
    weight_decay_lora: float = key(0.01, "decoupled weight decay of the LoRA experts")
    betas: tuple[float, float] = key((0.9, 0.999), "Adam's betas")
    eps: float = key(1e-8, "Adam's eps")
    score: str = key("epd", "the routing score: epd (the paper's) or pfn")
    score_eps: float = key(1e-8, "the eps inside the score, not Adam's (the reference's 1e-8)")
    decay_bias: bool = key(False, "decay wrapped layers' biases with the FFT expert")
    top_k: int = key(1, "experts updated per module and step")
    # adapters
    lora_rank: int = key(128, "rank of MoLF's LoRA expert and of the LoRA baselines")
    molf_e_ranks: tuple[int, ...] = key((32, 128), "MoLF-E's two ranks")
    lora_alpha: float = key(
        DEFAULT_LORA_ALPHA, "alpha of every LoRA expert and baseline (scale alpha / sqrt(rank))"
    )
    molf_e_alphas: tuple[float, ...] | None = key(None, "MoLF-E per expert (null: lora_alpha each)")
    lora_dropout: float = key(0.05, "dropout on the LoRA input, one sample for all experts")
    use_rslora: bool = key(
        True, "scale alpha / sqrt(rank) (rsLoRA, the paper's); false: alpha / rank"
    )
    target_modules: str | list[str] = key("all-linear", "all-linear, a list of names or a regex")
    hybrid_fft_types: tuple[str, ...] = key(
        ("k", "o", "down"), "method hybrid: the module types that train the FFT expert"
    )
    # numerics and memory
    dtype: str = key("float32", "float32 or bfloat16")
    gradient_checkpointing: bool = key(False, "recompute activations in the backward pass")
    threads: int | None = key(None, "torch's CPU threads (null: torch's default)")
    # evaluation
    eval_batch_size: int = key(16, "records per evaluation batch")
    eval_before: bool = key(True, "evaluate the untrained model on the test split first")
    eval_every: int = key(0, "steps between validation evaluations (0: none)")
    keep_best: bool = key(False, "export the best evaluated checkpoint as final/, not the last")
    best_metric: str | None = key(None, "what keep_best compares (null: the task's headline)")
    early_stopping_patience: int = key(0, "stop after this many evaluations without improvement")
    # bookkeeping
    log_every: int = key(1, "steps between metrics.jsonl records")
    save_every: int = key(0, "steps between checkpoints (0: none by step count)")
    save_every_minutes: float = key(
        15.0, "minutes of training between checkpoints (0: none by time); bounds what a kill loses"
    )
    keep_checkpoints: int = key(2, "newest checkpoints kept (0: all)")
    routing_forecast: bool = key(
        True, "MoLF: predict the step-1 routing first and warn when it is one-sided"
    )
    max_bad_steps: int = key(5, "consecutive non-finite steps before the run stops")
    logger: str = key("none", "none, tensorboard or wandb")
    progress: bool = key(True, "progress bars")
    distributed: str = key("none", "none, ddp or fsdp2")
    trust_remote_code: bool = key(False, "let transformers run a hub model's own code")
    # The keys the user set (a YAML of theirs, overrides, flags), filled in by `load_config`;
    # None: not known (a TrainConfig built in code), and nothing is adapted to the data.
    user_keys: frozenset[str] | None = dataclasses.field(
        default=None, repr=False, compare=False, metadata={"internal": True}
    )

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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("user_keys")
        d["betas"] = list(self.betas)
        d["molf_e_ranks"] = list(self.molf_e_ranks)
        d["hybrid_fft_types"] = list(self.hybrid_fft_types)
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
            check_rate(getattr(self, key), f"config key '{key}'")
        if not self.score_eps > 0:
            raise MolfError(
                f"config key 'score_eps': must be > 0 (it keeps the score finite where a moment "
                f"is 0), got {self.score_eps}"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise MolfError(
                f"config key 'warmup_ratio': must be in [0, 1), got {self.warmup_ratio}"
            )
        check_dropout(self.lora_dropout, "config key 'lora_dropout'")
        check_betas(self.betas, "config key 'betas'")
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
