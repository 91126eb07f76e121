"""The training loop behind `molf train`: one readable recipe for every method.

setup (`molf.train.prepare`: model, data, optimizer, schedule) -> resume
(`molf.train.checkpoint`) -> loop (accumulate, clip, skip non-finite, step, log through
`molf.train.progress`, checkpoint) -> final artefacts (merged model and/or PEFT adapter, routing
log, summary). Checkpoints are atomic; SIGINT/SIGTERM write one and exit 130/143. What differs
from one method to another (model, optimizer, exports, extra state) is its `molf.train.methods`
entry.

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
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import nn

import molf
from molf._files import write_json_atomic
from molf.errors import MolfError
from molf.tasks import TaskOptions
from molf.train import checkpoint as ckpt
from molf.train import distributed
from molf.train.config import TrainConfig, dump_config
from molf.train.data import collate
from molf.train.distributed import DistContext
from molf.train.forecast_check import warn_if_one_sided
from molf.train.prepare import (
    Setup,
    dtype_of,
    evaluate,
    keeps_best,
    prepare,
    routed_optimizer,
)
from molf.train.progress import MetricLogger, NoLogger, peak_memory_mb, progress_bar
from molf.train.run_dir import (
    SUMMARY,
    TEST_ITEMS,
    clear_run_dir,
    mark_run_dir,
    record,
    remove_recorded,
)

if TYPE_CHECKING:
    pass


class Interrupted(Exception):
    """Raised after a signal-triggered checkpoint; `code` is the exit status (130 or 143)."""

    def __init__(self, code: int, checkpoint: Path | None) -> None:
        super().__init__(
            f"interrupted (exit {code}); checkpoint at {checkpoint}; run the same command with "
            "--resume auto to continue from it"
        )
        self.code = code
        self.checkpoint = checkpoint


_SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class _SignalFlag:
    """Turns SIGINT/SIGTERM into a flag checked between optimizer steps, and says so at once.

    A second signal stops at once (KeyboardInterrupt), without a checkpoint of the step under
    way; the message names the checkpoint `--resume auto` would then continue from."""

    def __init__(self, announce: bool = True, run_dir: Path | None = None) -> None:
        self.signum: int | None = None
        self.announce = announce
        self.run_dir = run_dir
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _say(self, text: str) -> None:
        if self.announce:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write("\n" + text + "\n")
                sys.stderr.flush()

    def _handle(self, signum: int, frame: Any) -> None:
        name = _SIGNAL_NAMES.get(signum, f"signal {signum}")
        if self.signum is not None:  # second signal: stop now
            last = ckpt.list_checkpoints(self.run_dir)[-1:] if self.run_dir else []
            since = f"continues from {last[0]}" if last else "starts again from step 0"
            self._say(
                f"molf: second {name}: stopping now, without a checkpoint of this step; "
                f"--resume auto {since}"
            )
            raise KeyboardInterrupt
        self.signum = signum
        self._say(
            f"molf: {name}: stopping after this step; a checkpoint follows "
            f"({name} again stops at once, without it)"
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _pad_id(s: Setup) -> int:
    """The token padding fills micro-batches with (0 for a tokenizer without one)."""
    return s.tokenizer.pad_token_id if s.tokenizer.pad_token_id is not None else 0


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


def _forward_backward(
    s: Setup, step: int, pad: int, flag: _SignalFlag, save_due: bool = False
) -> tuple[float, int, int | None, bool]:
    """Accumulate one optimizer step's gradients; returns (the step's token-mean loss, its target
    tokens, the signal every rank agreed to stop on (None: none or one process), whether a timed
    checkpoint is due after this step (rank 0's clock decides for every rank))."""
    loss_sum, n_tokens = 0.0, 0
    micro = s.order.micro_batches(step)
    # no loss tokens in the whole step gives NaN and a skipped step
    step_tokens = step_loss_tokens(s, micro)
    for m, idx in enumerate(micro):
        if s.dist.enabled:
            last = m == len(micro) - 1
            part, toks = _distributed_micro_step(s, idx, pad, last, step_tokens)
        else:
            part, toks = _micro_step(s, idx, pad, step_tokens)
        loss_sum += part
        n_tokens += toks
    if not s.dist.enabled:
        return loss_sum, n_tokens, None, save_due
    # One small all-reduce per step: the loss, the tokens, whether any rank got a signal and
    # whether rank 0's timer asks for a checkpoint, so that all ranks checkpoint and stop at the
    # same step.
    got = (flag.signum == signal.SIGINT, flag.signum == signal.SIGTERM)
    due = float(save_due and s.dist.is_main)
    loss_sum, tokens, sigint, sigterm, due = distributed.all_reduce_floats(
        [loss_sum, n_tokens, *got, due], s.dist
    )
    agreed = signal.SIGTERM if sigterm else signal.SIGINT if sigint else None
    return loss_sum, int(tokens), agreed, due > 0


def _grad_norm(s: Setup, params: list[nn.Parameter]) -> float:
    """The global gradient norm, clipped to `max_grad_norm` when that is > 0."""
    if s.cfg.max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, s.cfg.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return distributed.scalar(norm) if s.dist.enabled else float(norm)


def _skip(s: Setup, step: int, loss: float, bad_in_a_row: int, logger: MetricLogger) -> None:
    """A step with non-finite gradients or loss: weights, moments, step counters and the
    schedule stay as they were; too many in a row stop the run with a checkpoint."""
    s.optimizer.zero_grad(set_to_none=True)
    logger.log({"step": step + 1, "skipped": True, "loss": loss if math.isfinite(loss) else None})
    if bad_in_a_row >= max(1, s.cfg.max_bad_steps):
        path = ckpt.save_checkpoint(s, step, logger.lines)
        raise MolfError(
            f"{bad_in_a_row} consecutive steps with non-finite gradients at step {step + 1}; "
            f"stopped. Last good state saved in {path}"
        )


def _step_record(
    s: Setup, step: int, loss: float, lr: float, grad_norm: float, n_tokens: int, dt: float
) -> tuple[dict[str, Any], dict[str, str]]:
    """metrics.jsonl's record of a step and the progress bar's postfix, with routing shares."""
    record: dict[str, Any] = {
        "step": step + 1,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": n_tokens / dt,
        "peak_memory_mb": peak_memory_mb(s.device),
    }
    postfix = {"loss": f"{loss:.3f}", "lr": f"{lr:.1e}"}
    routed = routed_optimizer(s.optimizer)
    rec = None if routed is None or routed.routing_log is None else routed.routing_log.last()
    if rec is not None:
        act = rec["active"]
        shares = rec["winners"][act].float().mean(dim=0).tolist() if act.any() else []
        for name, share in zip(routed.expert_names, shares):
            record[f"route_{name}"] = share
        postfix[f"{routed.expert_names[0]}"] = f"{shares[0]:.0%}" if shares else "-"
    return record, postfix


def _evaluate_step(
    s: Setup, done: int, logger: MetricLogger, eval_postfix: dict[str, str], stats: dict[str, Any]
) -> tuple[int | None, bool]:
    """Evaluation during training after step `done`, when due: (the step a checkpoint was just
    written at, or None; whether early stopping ends the run here)."""
    cfg, tracker = s.cfg, s.tracker
    if tracker is None or not (done % cfg.eval_every == 0 or done == s.total_steps):
        return None, False
    saved = None
    improved = _evaluate_during_training(s, done, logger, eval_postfix)
    if improved and keeps_best(cfg) and done < s.total_steps:
        ckpt.save_checkpoint(s, done, logger.lines)  # the candidate final/ is exported from
        saved = done
    patience = cfg.early_stopping_patience
    if patience and tracker.bad_evals >= patience and done < s.total_steps:
        stats["stopped_early_at"] = done
        return saved, True
    return saved, False


def train_loop(s: Setup, start_step: int, logger: MetricLogger) -> dict[str, Any]:
    """Run optimizer steps start_step..total_steps-1; returns loop statistics."""
    cfg, model, opt, ctx = s.cfg, s.model, s.optimizer, s.dist
    params = [p for p in model.parameters() if p.requires_grad]
    pad = _pad_id(s)
    stats: dict[str, Any] = {
        "skipped_steps": 0,
        "tokens": 0,
        "train_seconds": 0.0,
        "last_loss": float("nan"),
    }
    eval_postfix: dict[str, str] = {}
    bad_in_a_row = 0
    model.train()
    bar = progress_bar(s.total_steps, start_step, cfg.progress and ctx.is_main)
    interval = cfg.save_every_minutes * 60.0
    last_save = time.monotonic()
    with _SignalFlag(ctx.is_main, cfg.run_dir) as flag:
        for step in range(start_step, s.total_steps):
            t0 = time.perf_counter()
            timer_due = interval > 0 and time.monotonic() - last_save >= interval
            loss, n_tokens, agreed, timer_due = _forward_backward(s, step, pad, flag, timer_due)
            grad_norm = _grad_norm(s, params)
            if not math.isfinite(grad_norm) or not math.isfinite(loss):
                stats["skipped_steps"] += 1
                bad_in_a_row += 1
                _skip(s, step, loss, bad_in_a_row, logger)
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
            record, postfix = _step_record(s, step, loss, lrs[0], grad_norm, n_tokens, dt)
            if (step + 1) % cfg.log_every == 0 or step + 1 == s.total_steps:
                logger.log(record)
            done = step + 1
            saved, stop = _evaluate_step(s, done, logger, eval_postfix, stats)
            bar.set_postfix(postfix | eval_postfix, refresh=False)
            bar.update(1)
            if stop:
                break
            signum = agreed if ctx.enabled else flag.signum
            if signum is not None:
                path = ckpt.save_checkpoint(s, done, logger.lines) if saved is None else _last(s)
                bar.close()
                raise Interrupted(130 if signum == signal.SIGINT else 143, path)
            step_due = bool(cfg.save_every) and done % cfg.save_every == 0
            if not ctx.enabled:  # one process: its own clock, read after the step
                timer_due = interval > 0 and time.monotonic() - last_save >= interval
            if saved is not None:
                last_save = time.monotonic()
            elif (step_due or timer_due) and done < s.total_steps:
                ckpt.save_checkpoint(s, done, logger.lines)
                last_save = time.monotonic()
    bar.close()
    return stats


def _last(s: Setup) -> Path:
    return ckpt.list_checkpoints(s.cfg.run_dir)[-1]


def _evaluate_during_training(
    s: Setup, step: int, logger: MetricLogger | NoLogger, postfix: dict[str, str]
) -> bool:
    """Score the model being trained on the validation split; log it to metrics.jsonl as
    `{"step", "eval": {...}}`, show it in the progress bar; True when it is the best so far."""
    tracker = s.tracker
    assert tracker is not None
    bar = "eval validation" if s.cfg.progress and s.dist.is_main else None
    metrics = evaluate(
        s.task, s.model, s.tokenizer, s.splits.validation, s.cfg.eval_batch_size, progress=bar
    )
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
        paths["adapter"] = ckpt.signed_directory(final / "adapter", fill_adapter)
        record(cfg.run_dir, paths["adapter"])
    plain = s.method.merge(model)

    def fill_model(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        s.tokenizer.save_pretrained(tmp)
        _save_run_info(tmp, cfg)

    paths["model"] = ckpt.signed_directory(final / "model", fill_model)
    record(cfg.run_dir, paths["model"])
    return plain, paths


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
        base, _ = load_model(
            cfg.model, dtype=dtype_of(cfg), trust_remote_code=cfg.trust_remote_code
        )
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


def _start(s: Setup, resume: str, overwrite: bool) -> tuple[int, int | None]:
    """Claim the run directory (only now, with config, data and model loaded: a run that cannot
    start loses nothing), resume from a checkpoint when asked, stream the routing log; returns
    (the first step to run, the metrics lines to keep)."""
    cfg, ctx, run_dir = s.cfg, s.dist, s.cfg.run_dir
    if ctx.is_main:
        if overwrite:
            kept = clear_run_dir(run_dir)
            if kept:
                print(
                    f"--overwrite kept files molf did not write: {', '.join(kept)}", file=sys.stderr
                )
        mark_run_dir(run_dir)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        record(run_dir, "config.yaml")
    start, keep_lines = 0, None
    if resume != "none":
        path = ckpt.resume_path(run_dir, resume, ctx)
        if path is not None:
            start, keep_lines = ckpt.load_checkpoint(s, path)
            if ctx.is_main:
                print(f"resumed from {path} at step {start}", file=sys.stderr)
    routed = routed_optimizer(s.optimizer)
    if routed is not None and routed.routing_log is not None and not routed.routing_log.streaming:
        # rank 0 appends each step's record to the run's log; memory keeps running totals only
        routed.routing_log.stream_to(run_dir / "routing.jsonl" if ctx.is_main else None)
        if ctx.is_main:
            record(run_dir, "routing.jsonl")
    return start, keep_lines


def _best_so_far(s: Setup, stats: dict[str, Any]) -> dict[str, Any] | None:
    """With evaluation during training: restore the best checkpoint when it is exported (and
    not the last step), say so, and return the summary's record of it."""
    t, cfg, last_step = s.tracker, s.cfg, stats.get("stopped_early_at", s.total_steps)
    if t is None:
        return None
    best = ckpt.best_checkpoint(s)
    info = {"metric": t.metric, "value": t.best_value, "step": t.best_step}
    info["exported"] = keeps_best(cfg)
    if best is not None and t.best_step != last_step:
        _restore_best(s, best)
    if s.dist.is_main:
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
    return info


def _final_evaluation(s: Setup, plain: nn.Module) -> tuple[dict[str, float], dict[str, float]]:
    """The exported model's (test, validation) metrics; the test's per-item headline scores go
    to test_items.json, for paired comparisons of methods on the same test items."""
    cfg = s.cfg
    test_items: dict[str, float] = {}
    bar = cfg.progress and s.dist.is_main
    after = evaluate(
        s.task,
        plain,
        s.tokenizer,
        s.splits.test,
        cfg.eval_batch_size,
        test_items,
        progress="eval test" if bar else None,
    )
    if test_items:
        write_json_atomic(
            cfg.run_dir / TEST_ITEMS,
            {"metric": s.task.headline, "items": dict(sorted(test_items.items()))},
        )
        record(cfg.run_dir, TEST_ITEMS)
    # validation metrics are what a learning-rate search may look at; test metrics never are
    validation = (
        evaluate(
            s.task,
            plain,
            s.tokenizer,
            s.splits.validation,
            cfg.eval_batch_size,
            progress="eval validation" if bar else None,
        )
        if s.splits.validation
        else {}
    )
    return after, validation


def _run(cfg: TrainConfig, resume: str, overwrite: bool, ctx: DistContext) -> dict[str, Any]:
    t_start = time.perf_counter()
    s = prepare(cfg, resume, overwrite, ctx)
    run_dir = cfg.run_dir
    start, keep_lines = _start(s, resume, overwrite)
    if start == 0 and cfg.routing_forecast:
        pad = _pad_id(s)
        warn_if_one_sided(s, (_micro_batch(s, idx, pad) for idx in s.order.micro_batches(0)))
    routed = routed_optimizer(s.optimizer)
    logger = MetricLogger(cfg, keep_lines) if ctx.is_main else NoLogger(keep_lines)
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
            record(run_dir, "routing_summary.json")
    best_info = _best_so_far(s, stats)
    trained = s.model
    if ctx.enabled:
        trained = _gather_final_model(s)
        # From here on rank 0 works alone (export, evaluation): the others are done.
        distributed.shutdown(ctx)
        if trained is None:
            return {}
    plain, paths = finalize(s, trained)
    after, validation = _final_evaluation(s, plain)
    summary = {
        "method": cfg.method,
        "task": cfg.task,
        "model": cfg.model,
        "headline_metric": s.task.headline,
        "before": s.before,
        "after": after,
        "validation": validation,
        "steps": s.total_steps,
        "steps_done": stats.get("stopped_early_at", s.total_steps),
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
        "peak_memory_mb": peak_memory_mb(s.device),
        "wall_seconds": time.perf_counter() - t_start,
        "routing": routing_summary,
        "artefacts": {k: str(v) for k, v in paths.items()},
        "run_dir": str(run_dir),
        "config": cfg.to_dict(),
    }
    if ctx.enabled:
        summary["world_size"] = ctx.world_size
    write_json_atomic(run_dir / SUMMARY, summary)  # written last: its presence marks a finished run
    record(run_dir, SUMMARY)
    with contextlib.suppress(OSError):
        remove_recorded(run_dir, "checkpoints")
    return summary
