"""The training loop behind `molf train`: one readable recipe for every method.

setup (model, data, optimizer, schedule) -> resume -> loop (accumulate, clip, skip non-finite,
step, log, checkpoint) -> final artefacts (merged model and/or PEFT adapter, routing log,
summary). Checkpoints are atomic; SIGINT/SIGTERM write one and exit 130/143.

With `distributed: ddp | fsdp2` (under torchrun, see molf.train.distributed) the same recipe runs on
every rank: each micro-batch of `batch_size` examples is split across the ranks, the loss is
normalised by the micro-batch's global token count so that the averaged gradient is the
one-process gradient, gradients are synchronised on the last micro-batch of a step only, every
rank routes identically, and rank 0 alone logs, writes files and evaluates. Checkpoints are
sharded (DCP); the final model is gathered and written by rank 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import molf
from molf._files import write_json_atomic
from molf.errors import MolfError
from molf.optim.sharded import attach_score_reducer, check_model
from molf.tasks import build_task
from molf.train import checkpoint as ckpt
from molf.train import distributed
from molf.train.config import TrainConfig, dump_config
from molf.train.data import StepOrder, collate, tokenize_examples
from molf.train.distributed import DistContext

SUMMARY = "summary.json"


class Interrupted(Exception):
    """Raised after a signal-triggered checkpoint; `code` is the exit status (130 or 143)."""

    def __init__(self, code: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted (exit {code}); checkpoint at {checkpoint}")
        self.code = code
        self.checkpoint = checkpoint


@dataclass
class Setup:
    """Everything the loop needs, built by `prepare`."""

    cfg: TrainConfig
    model: nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    task: Any
    splits: Any
    train_ids: list[list[int]]
    train_labels: list[list[int]]
    order: StepOrder
    total_steps: int
    device: torch.device
    n_truncated: int = 0
    before: dict[str, float] = field(default_factory=dict)
    dist: DistContext = field(default_factory=DistContext)
    # what runs forward/backward: the model itself, or its DDP wrapper
    engine: nn.Module | None = None
    # per example: the tokens its loss is taken on (labels after the causal shift)
    label_counts: list[int] = field(default_factory=list)


# -- model + optimizer per method --------------------------------------------------------------
def _adamw_groups(model: nn.Module, lr: float, wd: float) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": wd},
        {"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0},
    ]


def _plain_adamw(model: nn.Module, cfg: TrainConfig, lr: float, wd: float) -> torch.optim.AdamW:
    groups = [g for g in _adamw_groups(model, lr, wd) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


def apply_method(
    model: nn.Module,
    cfg: TrainConfig,
    total_steps: int,
    shard: Callable[[nn.Module], Any] | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Turn a plain causal LM into the method's trainable model and build its optimizer.

    `shard`, if given, is applied to the trainable model before the optimizer is built (FSDP2
    replaces the parameters by sharded ones, which the optimizer must hold)."""
    model = method_model(model, cfg, total_steps)
    if shard is not None:
        shard(model)
    check_model(model)
    return model, method_optimizer(model, cfg)


def method_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The method's optimizer over a model made by `method_model`."""
    if cfg.method == "fft":
        return _plain_adamw(model, cfg, cfg.lr_fft, cfg.weight_decay_fft)
    if cfg.method in ("lora", "adalora"):
        return _plain_adamw(model, cfg, cfg.lr_lora, cfg.weight_decay_lora)
    return molf.MoLFAdamW(
        model,
        lr_fft=cfg.lr_fft,
        lr_lora=cfg.lr_lora,
        weight_decay_fft=cfg.weight_decay_fft,
        weight_decay_lora=cfg.weight_decay_lora,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        score=cfg.score,
        top_k=cfg.top_k,
    )


def method_model(model: nn.Module, cfg: TrainConfig, total_steps: int) -> nn.Module:
    """The method's trainable model: all weights (fft), a peft model (lora, adalora) or MoLF
    layers (molf, molf-e). New adapter weights draw from the global RNG."""
    targets = cfg.target_modules
    if cfg.method == "fft":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.method in ("lora", "adalora"):
        from peft import AdaLoraConfig, LoraConfig, get_peft_model

        common = dict(
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        if cfg.method == "lora":
            pcfg = LoraConfig(r=cfg.lora_rank, **common)
        else:
            # AdaLoRA starts at 1.5x the target rank and prunes to it between tinit and T - tfinal.
            pcfg = AdaLoraConfig(
                init_r=max(cfg.lora_rank * 3 // 2, cfg.lora_rank),
                target_r=cfg.lora_rank,
                total_step=total_steps,
                tinit=int(0.1 * total_steps),
                tfinal=int(0.2 * total_steps),
                deltaT=max(1, total_steps // 20),
                **common,
            )
        try:
            return get_peft_model(model, pcfg)
        except ValueError as e:
            raise MolfError(f"config key 'target_modules': {e}") from None
    if cfg.method == "molf":
        mcfg = molf.MoLFConfig(
            lora_ranks=(cfg.lora_rank,),
            lora_alphas=(cfg.lora_alpha,),
            lora_dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            target_modules=targets,
        )
    else:
        mcfg = molf.MoLFConfig(
            lora_ranks=tuple(cfg.molf_e_ranks),
            lora_alphas=tuple(cfg.lora_alpha for _ in cfg.molf_e_ranks),
            lora_dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            target_modules=targets,
            train_base=False,
        )
    return molf.wrap(model, mcfg)


def make_schedule(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_ratio` of the steps, then cosine, linear or constant."""
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
def check_output_dir(cfg: TrainConfig, resume: str, overwrite: bool) -> None:
    """Refuse to clobber a finished run; refuse to silently restart an unfinished one."""
    run_dir = cfg.run_dir
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if overwrite:
        shutil.rmtree(run_dir)
        return
    if (run_dir / SUMMARY).exists():
        raise MolfError(
            f"output directory {run_dir} already holds a finished run (use --overwrite to replace it)"
        )
    if resume == "none":
        raise MolfError(
            f"output directory {run_dir} holds an unfinished run (use --resume auto to continue it, "
            "or --overwrite to start again)"
        )


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
        local = _prepare_local(cfg, resume, overwrite, ctx)
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
    model, tokenizer, task, splits, tok, order, total, device, before = local
    torch.manual_seed(cfg.seed)  # LoRA init and dropout draw from here
    shard = (lambda m: distributed.shard_fsdp2(m, ctx)) if ctx.mode == "fsdp2" else None
    model, opt = apply_method(model, cfg, total, shard=shard)
    if ctx.mode != "fsdp2":  # fully_shard has put the shards on the device already
        model.to(device)
    engine = distributed.wrap_ddp(model, ctx) if ctx.mode == "ddp" else model
    label_counts: list[int] = []
    if ctx.enabled:
        attach_score_reducer(opt)
        # the loss of a micro-batch is normalised by its tokens on all ranks together
        label_counts = [sum(1 for y in lab[1:] if y != -100) for lab in tok.labels]
        if ctx.rank > 0:  # dropout masks: another stream per rank (rank 0 keeps the 1-GPU one)
            torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)
    sched = make_schedule(opt, cfg, total)
    return Setup(
        cfg,
        model,
        tokenizer,
        opt,
        sched,
        task,
        splits,
        tok.input_ids,
        tok.labels,
        order,
        total,
        device,
        tok.n_truncated,
        before,
        ctx,
        engine,
        label_counts,
    )


def _prepare_local(cfg: TrainConfig, resume: str, overwrite: bool, ctx: DistContext) -> tuple:
    """Everything of `prepare` that needs no other rank: checks, task, model, tokens."""
    from molf.train.models import load_model

    if ctx.enabled:
        distributed.check_setup(cfg.method, ctx.mode, cfg.batch_size, ctx.world_size)
    if ctx.is_main:
        check_output_dir(cfg, resume, overwrite)
    task, splits = build_task(cfg.task, cfg.data, cfg.seed, cfg.n_train, cfg.n_val, cfg.n_test)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model, tokenizer = load_model(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    tok = tokenize_examples(splits.train, tokenizer, cfg.max_length, cfg.too_long)
    if not tok.input_ids:
        raise MolfError(f"task '{cfg.task}': no training examples left after tokenization")
    order = StepOrder(len(tok.input_ids), cfg.batch_size, cfg.grad_accum, cfg.seed)
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
    return model, tokenizer, task, splits, tok, order, total, device, before


@torch.no_grad()
def evaluate(
    task: Any, model: nn.Module, tokenizer: Any, records: list[dict], batch_size: int
) -> dict[str, float]:
    """The task's metrics on `records`, in eval mode (restores the previous mode)."""
    was_training = model.training
    model.eval()
    try:
        return task.evaluate(model, tokenizer, records, batch_size=batch_size)
    finally:
        model.train(was_training)


# -- checkpoints -------------------------------------------------------------------------------
def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _adalora_state(model: nn.Module) -> dict[str, Any] | None:
    alloc = getattr(getattr(model, "base_model", None), "rankallocator", None)
    if alloc is None:
        return None
    return {k: dict(getattr(alloc, k)) for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")}


def save_checkpoint(s: Setup, step: int, log_lines: int) -> Path:
    """Write an atomic checkpoint of everything needed to continue bitwise from `step`.

    One process: safetensors weights plus torch-saved optimizer and trainer state. Distributed:
    every rank writes its DCP shards and RNG state, rank 0 the rest (molf.train.distributed)."""
    opt = s.optimizer
    routed = routed_optimizer(opt)

    def fill_common(tmp: Path) -> None:
        (tmp / "progress.json").write_text(json.dumps({"step": step, "metrics_lines": log_lines}))
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
                "adalora": _adalora_state(s.model),
            },
            tmp / "trainer_state.pt",
        )
        fill_common(tmp)

    def fill_main(tmp: Path) -> None:  # distributed: rank 0's files beside the shards
        state = {"scheduler": s.scheduler.state_dict(), "adalora": _adalora_state(s.model)}
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
        ckpt.prune_checkpoints(s.cfg.run_dir, s.cfg.keep_checkpoints)
    return path


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
    alloc = getattr(getattr(s.model, "base_model", None), "rankallocator", None)
    if alloc is not None and trainer.get("adalora"):
        for k, v in trainer["adalora"].items():
            setattr(alloc, k, dict(v))
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
            scalars = {
                k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"
            }
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


def _distributed_micro_step(s: Setup, idx: list[int], pad: int, sync: bool) -> tuple[float, int]:
    """Forward and backward of this rank's share of one global micro-batch.

    The token-loss sum of this rank's examples is divided by the micro-batch's global token
    count over the world size (`num_items_in_batch`), so that the engines' average of the
    ranks' gradients is the gradient of the one-process micro-batch mean; a term a model adds
    to its loss (AdaLoRA's regulariser) then also counts once. Returns (this rank's share of
    the one-process micro-batch loss, its tokens): summed over ranks, that loss."""
    ctx, cfg = s.dist, s.cfg
    # no loss tokens at all gives NaN and a skipped step, as with one process
    count = sum(s.label_counts[i] for i in idx)
    mine = distributed.local_part(idx, ctx)
    batch = collate([s.train_ids[i] for i in mine], [s.train_labels[i] for i in mine], pad)
    batch = {k: v.to(s.device) for k, v in batch.items()}
    with distributed.gradient_sync(s.engine, ctx, sync):
        out = s.engine(**batch, num_items_in_batch=count / ctx.world_size)
        (out.loss / cfg.grad_accum).backward()
    return float(out.loss.detach()) / ctx.world_size, int(batch["attention_mask"].sum())


def train_loop(s: Setup, start_step: int, logger: MetricLogger) -> dict[str, Any]:
    """Run optimizer steps start_step..total_steps-1; returns loop statistics."""
    cfg, model, opt, ctx = s.cfg, s.model, s.optimizer, s.dist
    params = [p for p in model.parameters() if p.requires_grad]
    pad = s.tokenizer.pad_token_id if s.tokenizer.pad_token_id is not None else 0
    routed = routed_optimizer(opt)
    stats = {"skipped_steps": 0, "tokens": 0, "train_seconds": 0.0, "last_loss": float("nan")}
    bad_in_a_row = 0
    model.train()
    bar = _progress(s.total_steps, start_step, cfg.progress and ctx.is_main)
    with _SignalFlag() as flag:
        for step in range(start_step, s.total_steps):
            t0 = time.perf_counter()
            loss_sum, n_tokens = 0.0, 0
            micro = s.order.micro_batches(step)
            for m, idx in enumerate(micro):
                if ctx.enabled:
                    part, toks = _distributed_micro_step(s, idx, pad, m == len(micro) - 1)
                    loss_sum += part
                    n_tokens += toks
                    continue
                batch = collate(
                    [s.train_ids[i] for i in idx], [s.train_labels[i] for i in idx], pad
                )
                batch = {k: v.to(s.device) for k, v in batch.items()}
                out = model(**batch)
                (out.loss / cfg.grad_accum).backward()
                loss_sum += float(out.loss.detach())
                n_tokens += int(batch["attention_mask"].sum())
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
            loss = loss_sum / cfg.grad_accum
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
            if cfg.method == "adalora":
                model.base_model.update_and_allocate(step)
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
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            done = step + 1
            signum = agreed if ctx.enabled else flag.signum
            if signum is not None:
                path = save_checkpoint(s, done, logger.lines)
                bar.close()
                raise Interrupted(130 if signum == signal.SIGINT else 143, path)
            if cfg.save_every and done % cfg.save_every == 0 and done < s.total_steps:
                save_checkpoint(s, done, logger.lines)
    bar.close()
    return stats


# -- final artefacts -------------------------------------------------------------------------------
def _save_run_info(directory: Path, cfg: TrainConfig) -> None:
    info = {
        "molf_version": molf.__version__,
        "task": cfg.task,
        "data": cfg.data,
        "seed": cfg.seed,
        "n_train": cfg.n_train,
        "n_val": cfg.n_val,
        "n_test": cfg.n_test,
        "method": cfg.method,
        "base_model": cfg.model,
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
    if cfg.method in ("lora", "adalora"):

        def fill_adapter(tmp: Path) -> None:
            model.peft_config["default"].base_model_name_or_path = cfg.model
            # save_embedding_layers=False: embeddings are not trained, and "auto" looks up the hub
            model.save_pretrained(tmp, save_embedding_layers=False)
            _save_run_info(tmp, cfg)

        paths["adapter"] = ckpt.atomic_directory(final / "adapter", fill_adapter)
        plain = model.merge_and_unload()
    elif cfg.method == "molf-e":

        def fill_molf_e(tmp: Path) -> None:
            molf.export_peft_lora(model, tmp / "a", base_model_name_or_path=cfg.model)
            for f in (tmp / "a").iterdir():
                f.rename(tmp / f.name)
            (tmp / "a").rmdir()
            _save_run_info(tmp, cfg)

        paths["adapter"] = ckpt.atomic_directory(final / "adapter", fill_molf_e)
        plain = molf.merge_and_unload(model)
    elif cfg.method == "molf":
        plain = molf.merge_and_unload(model)
    else:
        plain = model

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

    dtype = torch.bfloat16 if s.cfg.dtype == "bfloat16" else torch.float32
    with torch.random.fork_rng(devices=[]):  # the adapter init below is overwritten anyway
        base, _ = load_model(s.cfg.model, dtype=dtype, trust_remote_code=s.cfg.trust_remote_code)
        model = method_model(base, s.cfg, s.total_steps)
    model.load_state_dict(full)
    return model.to(s.device)


def run(cfg: TrainConfig, resume: str = "none", overwrite: bool = False) -> dict[str, Any]:
    """`molf train`: prepare, resume, loop, finalize, evaluate; returns the run summary.

    With `distributed: ddp | fsdp2` every rank calls this; rank 0 returns the summary, the
    others return {} as soon as the final model is gathered."""
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
        run_dir.mkdir(parents=True, exist_ok=True)
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
    trained = s.model
    if ctx.enabled:
        trained = _gather_final_model(s)
        # From here on rank 0 works alone (export, evaluation): the others are done.
        distributed.shutdown(ctx)
        if trained is None:
            return {}
    plain, paths = finalize(s, trained)
    after = evaluate(s.task, plain, s.tokenizer, s.splits.test, cfg.eval_batch_size)
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
        "resumed_from_step": start,
        "skipped_steps": stats["skipped_steps"],
        "final_loss": stats["last_loss"],
        "truncated_examples": s.n_truncated,
        "n_train_examples": len(s.train_ids),
        "n_test_records": len(s.splits.test),
        "tokens_per_s": stats["tokens"] / stats["train_seconds"]
        if stats["train_seconds"]
        else None,
        "peak_memory_mb": _peak_memory_mb(s.device),
        "wall_seconds": time.perf_counter() - t_start,
        "routing": routing_summary,
        "artefacts": {k: str(v) for k, v in paths.items()},
        "config": cfg.to_dict(),
    }
    if ctx.enabled:
        summary["world_size"] = ctx.world_size
    write_json_atomic(run_dir / SUMMARY, summary)  # written last: its presence marks a finished run
    with contextlib.suppress(OSError):
        shutil.rmtree(run_dir / "checkpoints")
    return summary
