"""Everything a training run builds before its first step: the checks that can fail early, the
task and its splits, the model and tokens, the method's trainable model, optimizer and schedule
(`prepare`), and the evaluation helper the loop and the end of a run share."""

from __future__ import annotations

import inspect
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import molf
from molf.errors import MolfError
from molf.optim.sharded import attach_score_reducer, check_model
from molf.tasks import Task, TaskOptions, TaskSplits, build_task, lower_is_better
from molf.train import distributed, methods
from molf.train.config import TrainConfig
from molf.train.data import StepOrder, Tokenized, check_packable, pack, tokenize_examples
from molf.train.distributed import DistContext
from molf.train.methods import Method
from molf.train.run_dir import check_output_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(kw_only=True)
class Loaded:
    """What each rank builds on its own before the first collective (see `prepare`): the plain
    model, the task and its splits, the tokenized training examples and their order."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    task: Task
    splits: TaskSplits
    data: Tokenized
    order: StepOrder
    total_steps: int
    device: torch.device
    before: dict[str, float] = field(default_factory=dict)  # test metrics of the untrained model


@dataclass
class BestTracker:
    """Evaluation during training: the best validation value of `metric` so far, the step it was
    reached at, and how many evaluations since have not improved on it (early stopping). Saved in
    every checkpoint (progress.json), so that a resumed run keeps choosing and stopping exactly
    as an uninterrupted one."""

    metric: str
    lower: bool
    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record `value` at `step`; True when it is a strict improvement (NaN never is)."""
        better = math.isfinite(value) and (
            self.best_value is None
            or (value < self.best_value if self.lower else value > self.best_value)
        )
        if better:
            self.best_value, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return better

    def state(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_step": self.best_step, "bad": self.bad_evals}

    def restore(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.bad_evals = state["bad"]


@dataclass(kw_only=True)
class Setup(Loaded):
    """Everything the loop needs, built by `prepare`: what `Loaded` holds, with `model` now the
    method's trainable model, plus the method, its optimizer and schedule, and the run's place in
    a distributed world."""

    cfg: TrainConfig
    method: Method
    # what runs forward and backward: the model itself, or its DDP wrapper
    engine: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    dist: DistContext = field(default_factory=DistContext)
    tracker: BestTracker | None = None  # set when eval_every > 0


def apply_method(
    model: nn.Module,
    cfg: TrainConfig,
    total_steps: int,
    shard: Callable[[nn.Module], Any] | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Turn a plain causal LM into the method's trainable model and build its optimizer.

    `shard`, if given, is applied to the trainable model before the optimizer is built (FSDP2
    replaces the parameters by sharded ones, which the optimizer must hold)."""
    method = methods.get(cfg.method)
    model = method.build_model(model, cfg, total_steps)
    if shard is not None:
        shard(model)
    check_model(model)
    return model, method.build_optimizer(model, cfg)


def make_schedule(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_ratio` of the steps, then cosine, linear or constant
    (docs/method.md section 7.7 on the warmup's shape)."""
    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def routed_optimizer(opt: torch.optim.Optimizer) -> molf.MoLFAdamW | None:
    return opt if isinstance(opt, molf.MoLFAdamW) else None


def keeps_best(cfg: TrainConfig) -> bool:
    """Whether final/ is exported from the best evaluated checkpoint: `keep_best`, or early
    stopping (which stops after the best and would otherwise export a worse model)."""
    return bool(cfg.eval_every and (cfg.keep_best or cfg.early_stopping_patience))


def check_disk_space(cfg: TrainConfig, n_params: int, path: Path) -> None:
    """Refuse before any compute when the disk cannot hold a checkpoint and the final model."""
    bytes_per = 2 if cfg.dtype == "bfloat16" else 4
    # model + optimizer moments (2x float32) in a checkpoint, plus the final model
    needed = n_params * (bytes_per * 2 + 8)
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise MolfError(
            f"not enough disk space at {probe}: {free / 2**30:.2f} GiB free, about "
            f"{needed / 2**30:.2f} GiB needed for a checkpoint and the final model"
        )


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_of(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32


def prepare(
    cfg: TrainConfig,
    resume: str = "none",
    overwrite: bool = False,
    ctx: DistContext | None = None,
) -> Setup:
    """Validate everything that can be validated, then build model, data and optimizer.

    In a distributed run every rank builds the same model and data (the same seed gives every
    rank the same adapter initialisation); the output directory is checked by rank 0 only, and
    all ranks agree that every rank got through before the first collective (sharding).
    """
    ctx = ctx or DistContext()
    failure: Exception | None = None
    try:
        loaded = _prepare_local(cfg, resume, overwrite, ctx)
    except Exception as e:
        if not ctx.enabled:
            raise
        failure = e
    if ctx.enabled:
        error = None
        if isinstance(failure, MolfError):
            error = str(failure)
        elif failure is not None:
            error = f"rank {ctx.rank} failed while preparing: {type(failure).__name__}: {failure}"
        try:
            distributed.agree(error, ctx)
        except MolfError:
            if failure is not None and not isinstance(failure, MolfError):
                raise failure from None
            raise
    torch.manual_seed(cfg.seed)  # LoRA init and dropout draw from here
    shard = (lambda m: distributed.shard_fsdp2(m, ctx)) if ctx.mode == "fsdp2" else None
    model, opt = apply_method(loaded.model, cfg, loaded.total_steps, shard=shard)
    if ctx.mode != "fsdp2":  # fully_shard has put the shards on the device already
        model.to(loaded.device)
    engine = distributed.wrap_ddp(model, ctx) if ctx.mode == "ddp" else model
    if ctx.enabled:
        attach_score_reducer(opt)
        if ctx.rank > 0:  # dropout masks: another stream per rank (rank 0 keeps the 1-GPU one)
            torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)
    loaded_fields = {f.name: getattr(loaded, f.name) for f in fields(loaded)}
    tracker = None
    if cfg.eval_every:
        metric = cfg.best_metric or loaded.task.headline
        tracker = BestTracker(metric, lower_is_better(metric))
    return Setup(
        tracker=tracker,
        **(loaded_fields | {"model": model}),
        cfg=cfg,
        method=methods.get(cfg.method),
        engine=engine,
        optimizer=opt,
        scheduler=make_schedule(opt, cfg, loaded.total_steps),
        dist=ctx,
    )


def check_base_model(base: str | None, model: str) -> None:
    """Refuse to train on a task made from another model (a planted folder holds the token ids
    and behaviour of the model it was made from; `base` is that model, None for other tasks)."""
    if base is None:
        return

    def key(name: str) -> str:
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else name.strip().lower()

    if key(base) != key(model):
        raise MolfError(
            f"--model {model}: this planted folder was made from {base}; the student must start "
            f"from the same model (--model {base})"
        )


def task_and_splits(cfg: TrainConfig) -> tuple[Task, TaskSplits]:
    """The run's task and its splits (drawn with `split_seed`), as its config asks."""
    return build_task(
        cfg.task,
        cfg.data,
        cfg.split_seed,
        cfg.n_train,
        cfg.n_val,
        cfg.n_test,
        TaskOptions.from_config(cfg),
    )


def _prepare_local(cfg: TrainConfig, resume: str, overwrite: bool, ctx: DistContext) -> Loaded:
    """Everything of `prepare` that needs no other rank: checks, task, model, tokens."""
    from molf.train.models import load_model

    if ctx.enabled:
        distributed.check_setup(cfg.method, ctx.mode, cfg.batch_size, ctx.world_size)
    if ctx.is_main:
        check_output_dir(cfg.run_dir, resume, overwrite)
    task, splits = task_and_splits(cfg)
    check_base_model(splits.info.get("base_model"), cfg.model)
    if cfg.eval_every and not splits.validation:
        raise MolfError(
            f"eval_every={cfg.eval_every}: task '{cfg.task}' has no validation records "
            "(set n_val > 0 or give --val-data)"
        )
    model, tokenizer = load_model(
        cfg.model, dtype=dtype_of(cfg), trust_remote_code=cfg.trust_remote_code
    )
    data = tokenize_examples(splits.train, tokenizer, cfg.max_length, cfg.too_long)
    if not len(data):
        raise MolfError(f"task '{cfg.task}': no training examples left after tokenization")
    if cfg.packing:
        check_packable(model.config, cfg.max_length)
        data = pack(data, cfg.max_length)
    if ctx.is_main:
        # where the rows went, for a task that sizes its splits from the data (sft); printed
        # after everything that can refuse the run, so that a refusal stays one line
        if splits.info.get("note"):
            print(f"data: {splits.info['note']}", file=sys.stderr)
        _print_data_notes(data, len(splits.train), cfg.max_length)
    adapted = fit_steps_to_data(cfg, len(data))
    order = StepOrder(len(data), cfg.batch_size, cfg.grad_accum, cfg.seed)
    total = cfg.max_steps or order.steps_for(cfg.epochs)
    if ctx.is_main:
        if adapted:
            print(f"data: {adapted}", file=sys.stderr)
        few = few_steps_note(cfg, len(data), total)
        if few:
            print(f"molf: {few}", file=sys.stderr)
    if ctx.is_main:
        check_disk_space(cfg, sum(p.numel() for p in model.parameters()), cfg.run_dir)
    device = ctx.device if ctx.enabled else pick_device()
    model.to(device)
    before: dict[str, float] = {}
    if cfg.eval_before:
        # every rank evaluates (the same numbers): rank 0 alone would keep the others waiting
        bar = "eval before" if cfg.progress and ctx.is_main else None
        before = evaluate(task, model, tokenizer, splits.test, cfg.eval_batch_size, progress=bar)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return Loaded(
        model=model,
        tokenizer=tokenizer,
        task=task,
        splits=splits,
        data=data,
        order=order,
        total_steps=total,
        device=device,
        before=before,
    )


@torch.no_grad()
def evaluate(
    task: Task,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    batch_size: int,
    items: dict[str, float] | None = None,
    progress: str | None = None,
) -> dict[str, float]:
    """The task's metrics on `records`, in eval mode (restores the previous mode); `items`, when
    given, gets each record's headline score (the task's `evaluate` says how); `progress`, when
    given, labels a progress bar over the batches scored."""
    from molf.tasks.common import eval_progress

    was_training = model.training
    model.eval()
    with eval_progress(progress is not None, progress or ""):
        return _evaluate(task, model, tokenizer, records, batch_size, items, was_training)


def _evaluate(
    task: Task,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    batch_size: int,
    items: dict[str, float] | None,
    was_training: bool,
) -> dict[str, float]:
    try:
        # a task written before per-item scores existed takes no `items`: it gives none
        if items is None or "items" not in inspect.signature(task.evaluate).parameters:
            return task.evaluate(model, tokenizer, records, batch_size=batch_size)
        return task.evaluate(model, tokenizer, records, batch_size=batch_size, items=items)
    finally:
        model.train(was_training)


# Fewer optimizer steps than this barely train: said before training, and the defaults on a
# user's own file are adapted to reach it.
MIN_USEFUL_STEPS = 20
_STEP_KEYS = ("batch_size", "grad_accum", "epochs", "max_steps")


def _steps(n_rows: int, batch_size: int, grad_accum: int, epochs: float) -> int:
    return StepOrder(n_rows, batch_size, grad_accum, 0).steps_for(epochs)


def fit_steps_to_data(cfg: TrainConfig, n_rows: int) -> str | None:
    """On the user's own file (task `sft`) with none of batch_size, grad_accum, epochs and
    max_steps set by the user: lower grad_accum (4, 2, 1), then raise epochs (up to 8), until the
    run has MIN_USEFUL_STEPS optimizer steps. Changes `cfg` in place; returns what it did, or
    None when the defaults already give enough steps or the user chose."""
    if cfg.task != "sft" or cfg.user_keys is None or set(_STEP_KEYS) & cfg.user_keys:
        return None
    before = (cfg.grad_accum, cfg.epochs)
    for accum in sorted({cfg.grad_accum, 2, 1}, reverse=True):
        if accum > cfg.grad_accum:
            continue
        cfg.grad_accum = accum
        if _steps(n_rows, cfg.batch_size, accum, cfg.epochs) >= MIN_USEFUL_STEPS:
            break
    per_epoch = _steps(n_rows, cfg.batch_size, cfg.grad_accum, 1)
    if per_epoch * cfg.epochs < MIN_USEFUL_STEPS:
        cfg.epochs = float(max(cfg.epochs, min(8, math.ceil(MIN_USEFUL_STEPS / per_epoch))))
    if (cfg.grad_accum, cfg.epochs) == before:
        return None
    steps = _steps(n_rows, cfg.batch_size, cfg.grad_accum, cfg.epochs)
    return (
        f"{n_rows} training rows: grad_accum {cfg.grad_accum} (default {before[0]}) and epochs "
        f"{cfg.epochs:g} (default {before[1]:g}) give {steps} optimizer steps of "
        f"{cfg.batch_size * cfg.grad_accum} rows; set grad_accum, epochs or max_steps to choose"
    )


def few_steps_note(cfg: TrainConfig, n_rows: int, total: int) -> str | None:
    """What to say before training when the run takes fewer than MIN_USEFUL_STEPS optimizer
    steps and the user did not ask for that number (max_steps)."""
    if cfg.max_steps or total >= MIN_USEFUL_STEPS:
        return None
    rows = cfg.batch_size * cfg.grad_accum
    return (
        f"this run takes only {total} optimizer steps ({n_rows} training rows, "
        f"batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} = {rows} rows a step, "
        f"epochs {cfg.epochs:g}): too few to learn much. Lower grad_accum or batch_size, raise "
        "epochs, add rows, or set max_steps"
    )


def _print_data_notes(data: Tokenized, n_examples: int, max_length: int) -> None:
    """Say on the console what the summary records: truncation and packing."""
    if data.n_truncated:
        print(
            f"{data.n_truncated} of {n_examples} training examples exceed max_length={max_length}"
            " and were truncated (too_long=refuse stops instead)",
            file=sys.stderr,
        )
    if data.position_ids is not None:
        print(
            f"packed {n_examples} training examples into {len(data)} rows of up to "
            f"{max_length} tokens",
            file=sys.stderr,
        )
