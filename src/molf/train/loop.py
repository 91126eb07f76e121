"""The training loop behind `molf train`: one readable recipe for every method.

setup (model, data, optimizer, schedule) -> resume -> loop (accumulate, clip, skip non-finite,
step, log, checkpoint) -> final artefacts (merged model and/or PEFT adapter, routing log,
summary). Checkpoints are atomic; SIGINT/SIGTERM write one and exit 130/143. What differs from
one method to another (model, optimizer, exports, extra state) is its `molf.train.methods` entry.

With `distributed: ddp | fsdp2` (under torchrun, see molf.train.distributed) the same recipe runs on
every rank: each micro-batch of `batch_size` examples is split across the ranks, the loss is
normalised by the micro-batch's global token count so that the averaged gradient is the
one-process gradient, gradients are synchronised on the last micro-batch of a step only, every
rank routes identically, and rank 0 alone logs, writes files and evaluates. Checkpoints are
sharded (DCP); the final model is gathered and written by rank 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import molf
from molf._files import write_json_atomic
from molf.errors import MolfError
from molf.optim.sharded import attach_score_reducer, check_model
from molf.tasks import Task, TaskOptions, TaskSplits, build_task, lower_is_better
from molf.train import checkpoint as ckpt
from molf.train import distributed, methods
from molf.train.config import TrainConfig, dump_config
from molf.train.data import StepOrder, Tokenized, check_packable, collate, pack, tokenize_examples
from molf.train.distributed import DistContext
from molf.train.methods import Method
from molf.train.run_dir import SUMMARY, check_output_dir, clear_run_dir, mark_run_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEST_ITEMS = "test_items.json"  # per-item headline scores of the final test evaluation


class Interrupted(Exception):
    """Raised after a signal-triggered checkpoint; `code` is the exit status (130 or 143)."""

    def __init__(self, code: int, checkpoint: Path | None) -> None:
        super().__init__(
            f"interrupted (exit {code}); checkpoint at {checkpoint}; run the same command with "
            "--resume auto to continue from it"
        )
        self.code = code
        self.checkpoint = checkpoint


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


# -- model + optimizer per method --------------------------------------------------------------
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


# -- preparation -------------------------------------------------------------------------------
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


def _dtype(cfg: TrainConfig) -> torch.dtype:
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


def _prepare_local(cfg: TrainConfig, resume: str, overwrite: bool, ctx: DistContext) -> Loaded:
    """Everything of `prepare` that needs no other rank: checks, task, model, tokens."""
    from molf.train.models import load_model

    if ctx.enabled:
        distributed.check_setup(cfg.method, ctx.mode, cfg.batch_size, ctx.world_size)
    if ctx.is_main:
        check_output_dir(cfg.run_dir, resume, overwrite)
    task, splits = build_task(
        cfg.task,
        cfg.data,
        cfg.split_seed,
        cfg.n_train,
        cfg.n_val,
        cfg.n_test,
        TaskOptions.from_config(cfg),
    )
    if cfg.eval_every and not splits.validation:
        raise MolfError(
            f"eval_every={cfg.eval_every}: task '{cfg.task}' has no validation records "
            "(set n_val > 0 or give --val-data)"
        )
    model, tokenizer = load_model(
        cfg.model, dtype=_dtype(cfg), trust_remote_code=cfg.trust_remote_code
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
    order = StepOrder(len(data), cfg.batch_size, cfg.grad_accum, cfg.seed)
    total = cfg.max_steps or order.steps_for(cfg.epochs)
    if ctx.is_main:
        check_disk_space(cfg, sum(p.numel() for p in model.parameters()), cfg.run_dir)
    device = ctx.device if ctx.enabled else pick_device()
    model.to(device)
    before: dict[str, float] = {}
    if cfg.eval_before:
        # every rank evaluates (the same numbers): rank 0 alone would keep the others waiting
        before = evaluate(task, model, tokenizer, splits.test, cfg.eval_batch_size)
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
) -> dict[str, float]:
    """The task's metrics on `records`, in eval mode (restores the previous mode); `items`, when
    given, gets each record's headline score (the task's `evaluate` says how)."""
    was_training = model.training
    model.eval()
    try:
        # a task written before per-item scores existed takes no `items`: it gives none
        if items is None or "items" not in inspect.signature(task.evaluate).parameters:
            return task.evaluate(model, tokenizer, records, batch_size=batch_size)
        return task.evaluate(model, tokenizer, records, batch_size=batch_size, items=items)
    finally:
        model.train(was_training)


# -- checkpoints -------------------------------------------------------------------------------
def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _method_state(s: Setup) -> dict[str, Any] | None:
    return s.method.save_state(s.model) if s.method.save_state is not None else None


def save_checkpoint(s: Setup, step: int, log_lines: int) -> Path:
    """Write an atomic checkpoint of everything needed to continue bitwise from `step`.

    One process: safetensors weights plus torch-saved optimizer and trainer state. Distributed:
    every rank writes its DCP shards and RNG state, rank 0 the rest (molf.train.distributed)."""
    opt = s.optimizer
    routed = routed_optimizer(opt)

    def fill_common(tmp: Path) -> None:
        progress: dict[str, Any] = {"step": step, "metrics_lines": log_lines}
        if s.tracker is not None:
            progress["best"] = s.tracker.state()
        (tmp / "progress.json").write_text(json.dumps(progress))
        log = None if routed is None else routed.routing_log
        if log is not None and log.streaming:  # appended to the run's log as it goes: how far
            (tmp / "routing_state.json").write_text(json.dumps(log.state_dict()))
        elif log is not None:
            log.write_jsonl(tmp / "routing.jsonl")

    def fill(tmp: Path) -> None:
        save_file(_trainable_state(s.model), str(tmp / "trainable.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save(
            {
                "scheduler": s.scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "method_state": _method_state(s),
            },
            tmp / "trainer_state.pt",
        )
        fill_common(tmp)

    def fill_main(tmp: Path) -> None:  # distributed: rank 0's files beside the shards
        state = {"scheduler": s.scheduler.state_dict(), "method_state": _method_state(s)}
        torch.save(state, tmp / "trainer_state.pt")
        fill_common(tmp)

    final = ckpt.checkpoint_dir(s.cfg.run_dir, step)
    try:
        if s.dist.enabled:
            path = distributed.save_checkpoint(
                s.dist, final, s.model, opt, fill_main, {"step": step}
            )
        else:
            path = ckpt.atomic_directory(final, fill, {"step": step})
    except OSError as e:
        raise MolfError(
            f"could not write checkpoint at step {step} in {s.cfg.run_dir}: {e.strerror or e}"
        ) from None
    if s.dist.is_main:
        ckpt.prune_checkpoints(s.cfg.run_dir, s.cfg.keep_checkpoints, _best_checkpoint(s))
    return path


def _best_checkpoint(s: Setup) -> Path | None:
    """The checkpoint `keep_best` exports at the end (None: the model being trained is it)."""
    t = s.tracker
    if not keeps_best(s.cfg) or t is None or t.best_step is None:
        return None
    return ckpt.checkpoint_dir(s.cfg.run_dir, t.best_step)


def load_checkpoint(s: Setup, path: Path) -> tuple[int, int]:
    """Restore a checkpoint into `s`; returns (step, metrics lines to keep).

    A sharded (distributed) checkpoint can be resumed with any world size, one process
    included; a one-process checkpoint by one process or DDP (which holds whole tensors)."""
    if distributed.is_sharded_checkpoint(path):
        distributed.load_checkpoint(s.dist, path, s.model, s.optimizer)
    elif s.dist.mode == "fsdp2":
        raise MolfError(
            f"checkpoint {path} was written by a one-process run; resume it with "
            "distributed=none or ddp"
        )
    else:
        _load_whole_checkpoint(s, path)
    trainer = torch.load(path / "trainer_state.pt", weights_only=True)
    s.scheduler.load_state_dict(trainer["scheduler"])
    if "rng_cpu" in trainer:
        torch.set_rng_state(trainer["rng_cpu"])
        if trainer["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer["rng_cuda"])
    # older checkpoints keep AdaLoRA's allocator state under the key "adalora"
    method_state = trainer.get("method_state", trainer.get("adalora"))
    if s.method.load_state is not None and method_state:
        s.method.load_state(s.model, method_state)
    routed = routed_optimizer(s.optimizer)
    if routed is not None and routed.routing_log is not None:
        log, stream = routed.routing_log, s.cfg.run_dir / "routing.jsonl"
        if (path / "routing_state.json").exists():  # cut the log back to this checkpoint
            state = json.loads((path / "routing_state.json").read_text())
            log.stream_to(stream if s.dist.is_main else None, state)
        elif (path / "routing.jsonl").exists():  # a checkpoint that holds the whole log
            log.records = molf.RoutingLog.read_jsonl(path / "routing.jsonl").records
            log.stream_to(stream if s.dist.is_main else None)
    progress = json.loads((path / "progress.json").read_text())
    if s.tracker is not None and "best" in progress:
        s.tracker.restore(progress["best"])
    return progress["step"], progress["metrics_lines"]


def _load_whole_checkpoint(s: Setup, path: Path) -> None:
    state = load_file(str(path / "trainable.safetensors"), device=str(s.device))
    missing = s.model.load_state_dict(state, strict=False)
    wanted = {n for n, p in s.model.named_parameters() if p.requires_grad}
    lost = wanted - set(state)
    if lost or missing.unexpected_keys:
        raise MolfError(
            f"checkpoint {path} does not match this run's model/method ({sorted(lost)[:1] or missing.unexpected_keys[:1]})"
        )
    s.optimizer.load_state_dict(
        torch.load(path / "optimizer.pt", weights_only=True, map_location=s.device)
    )


# -- loop ----------------------------------------------------------------------------------------
class _SignalFlag:
    """Turns SIGINT/SIGTERM into a flag checked between optimizer steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricLogger:
    """metrics.jsonl in the run directory, plus TensorBoard or W&B when asked for."""

    def __init__(self, cfg: TrainConfig, keep_lines: int | None) -> None:
        self.path = cfg.run_dir / "metrics.jsonl"
        if keep_lines is not None and self.path.exists():
            lines = self.path.read_text().splitlines()[:keep_lines]
            self.path.write_text("".join(line + "\n" for line in lines))
        elif keep_lines is None and self.path.exists():
            self.path.unlink()
        self.lines = keep_lines or 0
        self.backend: Any = None
        if cfg.logger == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MolfError(
                    "logger 'tensorboard' needs the tensorboard package (pip install 'molf[tensorboard]')"
                ) from None
            self.backend = SummaryWriter(str(cfg.run_dir / "tensorboard"))
        elif cfg.logger == "wandb":
            try:
                import wandb
            except ImportError:
                raise MolfError(
                    "logger 'wandb' needs the wandb package (pip install 'molf[wandb]')"
                ) from None
            self.backend = wandb.init(project="molf", dir=str(cfg.run_dir), config=cfg.to_dict())

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1
        if self.backend is not None:
            flat = dict(record)
            for k, v in (flat.pop("eval", None) or {}).items():
                flat[f"eval/{k}"] = v
            scalars = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and k != "step"}
            if hasattr(self.backend, "add_scalar"):
                for k, v in scalars.items():
                    self.backend.add_scalar(k, v, record["step"])
            else:
                self.backend.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.backend is not None:
            (self.backend.close if hasattr(self.backend, "close") else self.backend.finish)()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc="train",
        dynamic_ncols=True,
        file=sys.stderr,
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


def _micro_batch(s: Setup, idx: list[int], pad: int) -> dict[str, torch.Tensor]:
    """The tensors of training rows `idx` (packed rows keep each example's positions)."""
    pos = None if s.data.position_ids is None else [s.data.position_ids[i] for i in idx]
    batch = collate([s.data.input_ids[i] for i in idx], [s.data.labels[i] for i in idx], pad, pos)
    return {k: v.to(s.device) for k, v in batch.items()}


def step_loss_tokens(s: Setup, micro: list[list[int]]) -> int:
    """The loss tokens of one whole optimizer step (all its micro-batches, all ranks)."""
    return sum(s.data.loss_tokens(idx) for idx in micro)


def _micro_step(s: Setup, idx: list[int], pad: int, step_tokens: int) -> tuple[float, int]:
    """Forward and backward of one micro-batch, its token-loss sum divided by the whole step's
    token count (`num_items_in_batch`, as HF Trainer does): the accumulated gradient is then the
    gradient of the step's token mean, however unevenly the tokens fall into micro-batches
    (docs/method.md section 7.5). Returns (its share of the step's loss, its tokens)."""
    batch = _micro_batch(s, idx, pad)
    out = s.model(**batch, num_items_in_batch=step_tokens)
    out.loss.backward()
    return float(out.loss.detach()), sum(len(s.data.input_ids[i]) for i in idx)


def _distributed_micro_step(
    s: Setup, idx: list[int], pad: int, sync: bool, step_tokens: int
) -> tuple[float, int]:
    """Forward and backward of this rank's share of one global micro-batch.

    The token-loss sum of this rank's examples is divided by the whole step's global token
    count over the world size (`num_items_in_batch`), so that the engines' average of the
    ranks' gradients, accumulated over the micro-batches, is the gradient of the one-process
    step's token mean, as `_micro_step` gives. Returns (this rank's share of the one-process
    step loss, its tokens): summed over ranks and micro-batches, that loss."""
    ctx = s.dist
    mine = distributed.local_part(idx, ctx)
    batch = _micro_batch(s, mine, pad)
    with distributed.gradient_sync(s.engine, ctx, sync):
        out = s.engine(**batch, num_items_in_batch=step_tokens / ctx.world_size)
        out.loss.backward()
    return float(out.loss.detach()) / ctx.world_size, sum(len(s.data.input_ids[i]) for i in mine)


def train_loop(s: Setup, start_step: int, logger: MetricLogger) -> dict[str, Any]:
    """Run optimizer steps start_step..total_steps-1; returns loop statistics."""
    cfg, model, opt, ctx = s.cfg, s.model, s.optimizer, s.dist
    params = [p for p in model.parameters() if p.requires_grad]
    pad = s.tokenizer.pad_token_id if s.tokenizer.pad_token_id is not None else 0
    routed = routed_optimizer(opt)
    stats: dict[str, Any] = {
        "skipped_steps": 0,
        "tokens": 0,
        "train_seconds": 0.0,
        "last_loss": float("nan"),
    }
    eval_postfix: dict[str, str] = {}
    bad_in_a_row = 0
    model.train()
    bar = _progress(s.total_steps, start_step, cfg.progress and ctx.is_main)
    with _SignalFlag() as flag:
        for step in range(start_step, s.total_steps):
            t0 = time.perf_counter()
            loss_sum, n_tokens = 0.0, 0
            micro = s.order.micro_batches(step)
            # no loss tokens in the whole step gives NaN and a skipped step
            step_tokens = step_loss_tokens(s, micro)
            for m, idx in enumerate(micro):
                if ctx.enabled:
                    last = m == len(micro) - 1
                    part, toks = _distributed_micro_step(s, idx, pad, last, step_tokens)
                else:
                    part, toks = _micro_step(s, idx, pad, step_tokens)
                loss_sum += part
                n_tokens += toks
            agreed = None
            if ctx.enabled:
                # One small all-reduce per step: the loss, the tokens, and whether any rank got
                # a signal, so that all ranks checkpoint and stop at the same step.
                got = (flag.signum == signal.SIGINT, flag.signum == signal.SIGTERM)
                loss_sum, tokens, sigint, sigterm = distributed.all_reduce_floats(
                    [loss_sum, n_tokens, *got], ctx
                )
                n_tokens = int(tokens)
                agreed = signal.SIGTERM if sigterm else signal.SIGINT if sigint else None
            if cfg.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            grad_norm = distributed.scalar(norm) if ctx.enabled else float(norm)
            loss = loss_sum  # the step's token-mean loss: each part is already a share
            if not math.isfinite(grad_norm) or not math.isfinite(loss):
                # Skip: weights, moments, step counters and the schedule stay as they were.
                opt.zero_grad(set_to_none=True)
                stats["skipped_steps"] += 1
                bad_in_a_row += 1
                logger.log(
                    {
                        "step": step + 1,
                        "skipped": True,
                        "loss": loss if math.isfinite(loss) else None,
                    }
                )
                if bad_in_a_row >= max(1, cfg.max_bad_steps):
                    path = save_checkpoint(s, step, logger.lines)
                    raise MolfError(
                        f"{bad_in_a_row} consecutive steps with non-finite gradients at step {step + 1}; "
                        f"stopped. Last good state saved in {path}"
                    )
                continue
            bad_in_a_row = 0
            lrs = [g["lr"] for g in opt.param_groups]
            opt.step()
            if s.method.after_step is not None:
                s.method.after_step(model, step)
            s.scheduler.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            stats["tokens"] += n_tokens
            stats["train_seconds"] += dt
            stats["last_loss"] = loss
            record: dict[str, Any] = {
                "step": step + 1,
                "loss": loss,
                "lr": lrs[0],
                "grad_norm": grad_norm,
                "tokens_per_s": n_tokens / dt,
                "peak_memory_mb": _peak_memory_mb(s.device),
            }
            postfix = {"loss": f"{loss:.3f}", "lr": f"{lrs[0]:.1e}"}
            rec = (
                None if routed is None or routed.routing_log is None else routed.routing_log.last()
            )
            if rec is not None:
                act = rec["active"]
                shares = rec["winners"][act].float().mean(dim=0).tolist() if act.any() else []
                for name, share in zip(routed.expert_names, shares):
                    record[f"route_{name}"] = share
                postfix[f"{routed.expert_names[0]}"] = f"{shares[0]:.0%}" if shares else "-"
            if (step + 1) % cfg.log_every == 0 or step + 1 == s.total_steps:
                logger.log(record)
            done = step + 1
            saved = None  # the step a checkpoint was just written at
            stop = False
            tracker = s.tracker
            if tracker is not None and (done % cfg.eval_every == 0 or done == s.total_steps):
                improved = _evaluate_during_training(s, done, logger, eval_postfix)
                if improved and keeps_best(cfg) and done < s.total_steps:
                    save_checkpoint(s, done, logger.lines)  # the candidate final/ is exported from
                    saved = done
                patience = cfg.early_stopping_patience
                if patience and tracker.bad_evals >= patience and done < s.total_steps:
                    stats["stopped_early_at"] = done
                    stop = True
            bar.set_postfix(postfix | eval_postfix, refresh=False)
            bar.update(1)
            if stop:
                break
            signum = agreed if ctx.enabled else flag.signum
            if signum is not None:
                path = save_checkpoint(s, done, logger.lines) if saved is None else _last(s)
                bar.close()
                raise Interrupted(130 if signum == signal.SIGINT else 143, path)
            if cfg.save_every and done % cfg.save_every == 0 and done < s.total_steps:
                if saved is None:
                    save_checkpoint(s, done, logger.lines)
    bar.close()
    return stats


def _last(s: Setup) -> Path:
    return ckpt.list_checkpoints(s.cfg.run_dir)[-1]


def keeps_best(cfg: TrainConfig) -> bool:
    """Whether final/ is exported from the best evaluated checkpoint: `keep_best`, or early
    stopping (which stops after the best and would otherwise export a worse model)."""
    return bool(cfg.eval_every and (cfg.keep_best or cfg.early_stopping_patience))


def _evaluate_during_training(
    s: Setup, step: int, logger: MetricLogger | _NoLogger, postfix: dict[str, str]
) -> bool:
    """Score the model being trained on the validation split; log it to metrics.jsonl as
    `{"step", "eval": {...}}`, show it in the progress bar; True when it is the best so far."""
    tracker = s.tracker
    assert tracker is not None
    metrics = evaluate(s.task, s.model, s.tokenizer, s.splits.validation, s.cfg.eval_batch_size)
    if tracker.metric not in metrics:
        raise MolfError(
            f"config key 'best_metric': task '{s.cfg.task}' reports no '{tracker.metric}' "
            f"(it reports {', '.join(metrics)})"
        )
    improved = tracker.update(float(metrics[tracker.metric]), step)
    logger.log(
        {
            "step": step,
            "eval": metrics,
            "best_step": tracker.best_step,
            "best": tracker.best_value,
        }
    )
    for name, value in metrics.items():
        postfix[f"val_{name}"] = f"{value:.3g}"
    return improved


def _restore_best(s: Setup, path: Path) -> None:
    """Load the trainable weights (and method state) of checkpoint `path` into the model, so that
    the export below writes that checkpoint's model."""
    state = load_file(str(path / "trainable.safetensors"), device=str(s.device))
    s.model.load_state_dict(state, strict=False)
    trainer = torch.load(path / "trainer_state.pt", weights_only=True)
    if s.method.load_state is not None and trainer.get("method_state"):
        s.method.load_state(s.model, trainer["method_state"])


# -- final artefacts -------------------------------------------------------------------------------
def _save_run_info(directory: Path, cfg: TrainConfig) -> None:
    info = {
        "molf_version": molf.__version__,
        "task": cfg.task,
        "data": cfg.data,
        "seed": cfg.split_seed,  # what `molf eval` rebuilds the splits with
        "training_seed": cfg.seed,
        "n_train": cfg.n_train,
        "n_val": cfg.n_val,
        "n_test": cfg.n_test,
        "method": cfg.method,
        "base_model": cfg.model,
        # the task's own settings (sft: fields, val_data, generation metric), so that `molf eval`
        # scores the saved model on the same records the same way
        "task_options": dataclasses.asdict(TaskOptions.from_config(cfg)),
    }
    (directory / "molf_run.json").write_text(json.dumps(info, indent=1))


def finalize(s: Setup, model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Path]]:
    """Write the method's artefacts atomically; returns the plain model for evaluation and paths.

    `model`: the trained model to export, if not `s.model` (the unsharded copy of an FSDP2 run).
    """
    cfg = s.cfg
    model = s.model if model is None else model
    final = cfg.run_dir / "final"
    paths: dict[str, Path] = {}
    save_adapter = s.method.save_adapter
    if save_adapter is not None:

        def fill_adapter(tmp: Path) -> None:
            save_adapter(model, cfg, tmp)
            _save_run_info(tmp, cfg)

        # before merging: merging folds the adapter into the base weights
        paths["adapter"] = ckpt.atomic_directory(final / "adapter", fill_adapter)
    plain = s.method.merge(model)

    def fill_model(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        s.tokenizer.save_pretrained(tmp)
        _save_run_info(tmp, cfg)

    paths["model"] = ckpt.atomic_directory(final / "model", fill_model)
    return plain, paths


class _NoLogger:
    """What ranks other than 0 log to: nothing (rank 0 keeps metrics.jsonl)."""

    def __init__(self, keep_lines: int | None) -> None:
        self.lines = keep_lines or 0

    def log(self, record: dict[str, Any]) -> None:
        self.lines += 1

    def close(self) -> None:
        pass


def _resume_path(run_dir: Path, resume: str, ctx: DistContext) -> Path | None:
    """The checkpoint to resume from (None: start afresh); rank 0 picks it for everyone."""

    def pick() -> Path | None:
        path = Path(resume) if resume != "auto" else ckpt.latest_good_checkpoint(run_dir)
        if resume != "auto" and (path is None or ckpt.verify(path) is not None):
            raise MolfError(f"--resume {resume}: not a complete checkpoint ({ckpt.verify(path)})")
        return path

    if not ctx.enabled:
        return pick()
    found, error = None, None
    if ctx.is_main:
        try:
            picked = pick()
            found = None if picked is None else str(picked)
        except MolfError as e:
            error = str(e)
    found, error = distributed.broadcast_object((found, error), ctx)
    if error is not None:
        raise MolfError(error)
    return None if found is None else Path(found)


def _gather_final_model(s: Setup) -> nn.Module | None:
    """The trained model as one ordinary module on rank 0 (None on the other ranks).

    DDP: rank 0's replica. FSDP2: the full weights are gathered to rank 0's CPU shard by shard,
    the optimizer state is dropped, and a fresh copy of the method's model is loaded with them."""
    ctx = s.dist
    if ctx.mode != "fsdp2":
        return s.model if ctx.is_main else None
    full = distributed.full_state_dict(s.model, ctx)
    s.optimizer.state.clear()
    if not ctx.is_main:
        return None
    from molf.train.models import load_model

    cfg = s.cfg
    with torch.random.fork_rng(devices=[]):  # the adapter init below is overwritten anyway
        base, _ = load_model(cfg.model, dtype=_dtype(cfg), trust_remote_code=cfg.trust_remote_code)
        model = s.method.build_model(base, cfg, s.total_steps)
    model.load_state_dict(full)
    return model.to(s.device)


def run(cfg: TrainConfig, resume: str = "none", overwrite: bool = False) -> dict[str, Any]:
    """`molf train`: prepare, resume, loop, finalize, evaluate; returns the run summary.

    With `distributed: ddp | fsdp2` every rank calls this; rank 0 returns the summary, the
    others return {} as soon as the final model is gathered."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    ctx = distributed.init(cfg.distributed)
    try:
        return _run(cfg, resume, overwrite, ctx)
    finally:
        distributed.shutdown(ctx)


def _run(cfg: TrainConfig, resume: str, overwrite: bool, ctx: DistContext) -> dict[str, Any]:
    t_start = time.perf_counter()
    s = prepare(cfg, resume, overwrite, ctx)
    run_dir = cfg.run_dir
    if ctx.is_main:
        # only now, with config, data and model loaded: a run that cannot start loses nothing
        if overwrite:
            kept = clear_run_dir(run_dir)
            if kept:
                print(
                    f"--overwrite kept files molf did not write: {', '.join(kept)}", file=sys.stderr
                )
        mark_run_dir(run_dir)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    start, keep_lines = 0, None
    if resume != "none":
        path = _resume_path(run_dir, resume, ctx)
        if path is not None:
            start, keep_lines = load_checkpoint(s, path)
            if ctx.is_main:
                print(f"resumed from {path} at step {start}", file=sys.stderr)
    routed = routed_optimizer(s.optimizer)
    if routed is not None and routed.routing_log is not None and not routed.routing_log.streaming:
        # rank 0 appends each step's record to the run's log; memory keeps running totals only
        routed.routing_log.stream_to(run_dir / "routing.jsonl" if ctx.is_main else None)
    logger = MetricLogger(cfg, keep_lines) if ctx.is_main else _NoLogger(keep_lines)
    try:
        stats = train_loop(s, start, logger)
    finally:
        logger.close()
    routing_summary = None
    if routed is not None and routed.routing_log is not None:
        routing_summary = routed.routing_log.summary()
        routed.routing_log.close()
        if ctx.is_main:
            write_json_atomic(run_dir / "routing_summary.json", routing_summary)
    last_step = stats.get("stopped_early_at", s.total_steps)
    best = _best_checkpoint(s)
    best_info = None
    if s.tracker is not None:
        t = s.tracker
        best_info = {"metric": t.metric, "value": t.best_value, "step": t.best_step}
        best_info["exported"] = keeps_best(cfg)
        if best is not None and t.best_step != last_step:
            _restore_best(s, best)
        if ctx.is_main:
            if "stopped_early_at" in stats:
                print(
                    f"early stopping at step {last_step}: {t.metric} on the validation split has "
                    f"not improved for {cfg.early_stopping_patience} evaluations",
                    file=sys.stderr,
                )
            if keeps_best(cfg) and t.best_step is not None:
                print(
                    f"exporting the best checkpoint: step {t.best_step}, validation "
                    f"{t.metric} {t.best_value:.4g}",
                    file=sys.stderr,
                )
    trained = s.model
    if ctx.enabled:
        trained = _gather_final_model(s)
        # From here on rank 0 works alone (export, evaluation): the others are done.
        distributed.shutdown(ctx)
        if trained is None:
            return {}
    plain, paths = finalize(s, trained)
    test_items: dict[str, float] = {}
    after = evaluate(s.task, plain, s.tokenizer, s.splits.test, cfg.eval_batch_size, test_items)
    if test_items:
        # per-item headline scores, for paired comparisons of methods on the same test items
        write_json_atomic(
            run_dir / TEST_ITEMS,
            {"metric": s.task.headline, "items": dict(sorted(test_items.items()))},
        )
    # validation metrics are what a learning-rate search may look at; test metrics never are
    validation = (
        evaluate(s.task, plain, s.tokenizer, s.splits.validation, cfg.eval_batch_size)
        if s.splits.validation
        else {}
    )
    summary = {
        "method": cfg.method,
        "task": cfg.task,
        "model": cfg.model,
        "headline_metric": s.task.headline,
        "before": s.before,
        "after": after,
        "validation": validation,
        "steps": s.total_steps,
        "steps_done": last_step,
        "stopped_early": "stopped_early_at" in stats,
        "best_checkpoint": best_info,
        "resumed_from_step": start,
        "skipped_steps": stats["skipped_steps"],
        "final_loss": stats["last_loss"],
        "truncated_examples": s.data.n_truncated,
        "n_train_examples": len(s.splits.train),
        "n_test_records": len(s.splits.test),
        "tokens_per_s": stats["tokens"] / stats["train_seconds"]
        if stats["train_seconds"]
        else None,
        "peak_memory_mb": _peak_memory_mb(s.device),
        "wall_seconds": time.perf_counter() - t_start,
        "routing": routing_summary,
        "artefacts": {k: str(v) for k, v in paths.items()},
        "run_dir": str(run_dir),
        "config": cfg.to_dict(),
    }
    if ctx.enabled:
        summary["world_size"] = ctx.world_size
    write_json_atomic(run_dir / SUMMARY, summary)  # written last: its presence marks a finished run
    with contextlib.suppress(OSError):
        shutil.rmtree(run_dir / "checkpoints")
    return summary
