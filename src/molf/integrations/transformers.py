"""MoLF inside transformers' `Trainer` and the trainers built on it (TRL's `SFTTrainer`, ...).

    model = molf.wrap(model, molf.MoLFConfig(lora_ranks=(128,)))
    trainer = Trainer(model=model, args=args, train_dataset=train)   # or trl.SFTTrainer(...)
    use_molf(trainer)                                                 # MoLFAdamW + routing logs
    trainer.train()

`use_molf` gives the trainer

* `MoLFAdamW` through transformers' optimizer-factory hook (`optimizer_cls_and_kwargs`): the
  Trainer builds it on the model it trains, when it builds its optimizer, and builds the LR
  scheduler from `args` as for any optimizer (`lr_scheduler_type`, `warmup_steps`, ...). The
  scheduler scales every parameter group, so the FFT/LoRA learning-rate ratio stays as chosen;
* a `MoLFCallback`, first among the trainer's callbacks so that the reporting ones (TensorBoard,
  W&B, ...) see what it adds to each log: the share of module updates each expert won over the
  steps the log's loss covers (`molf/share_fft`, `molf/share_lora_r128`, ...). It writes the
  routing log into every checkpoint and restores it on `resume_from_checkpoint`, so a resumed
  run's routing log is an uninterrupted run's. (The win counts and moments are in the optimizer
  state, which the Trainer saves and restores itself.)
* resuming from its checkpoints: a wrapped model saves in molf's format (see molf.saving), which
  the Trainer's own loader does not read; `use_molf` wraps the trainer's two model-loading
  methods (resume, `load_best_model_at_end`) so that they do, strictly.

`molf_optimizer(args)` and `MoLFCallback()` are the two halves, for `Trainer(...,
optimizer_cls_and_kwargs=molf_optimizer(args), callbacks=[MoLFCallback()])`; a callback passed that
way runs after the reporting callbacks, so only the logs in `trainer.state.log_history` and the
progress output carry the shares.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from molf import saving
from molf.errors import MolfError
from molf.layer import molf_modules
from molf.optim.adamw import MoLFAdamW
from molf.routing import RoutingLog

ROUTING_FILE = "molf_routing.jsonl"
_MOLF_KWARGS = set(inspect.signature(MoLFAdamW.__init__).parameters) - {"self", "model"}


class MoLFAdamWFactory:
    """transformers' optimizer-factory protocol: `Trainer.create_optimizer` instantiates this
    class, then calls the instance with the model it trains and the kwargs of `molf_optimizer`."""

    def __call__(self, model: Any, **kwargs: Any) -> MoLFAdamW:
        return MoLFAdamW(model, **kwargs)


def molf_optimizer(
    args: TrainingArguments | None = None, **molf_kwargs: Any
) -> tuple[type, dict[str, Any]]:
    """The value for `Trainer(optimizer_cls_and_kwargs=...)` that makes the Trainer use MoLFAdamW.

    `molf_kwargs` are MoLFAdamW's (`lr_fft`, `lr_lora`, `top_k`, `score`, ...). From `args`, unless
    given: both learning rates from `args.learning_rate`, `betas` from `args.adam_beta1/2`, `eps`
    from `args.adam_epsilon`. Weight decay stays MoLF's per expert (`weight_decay_fft`,
    `weight_decay_lora`; 0.1 and 0.01 by default): `args.weight_decay` is not used.
    """
    unknown = sorted(set(molf_kwargs) - _MOLF_KWARGS)
    if unknown:
        raise MolfError(
            f"molf_optimizer: MoLFAdamW has no argument {', '.join(unknown)} "
            f"(it takes {', '.join(sorted(_MOLF_KWARGS))})"
        )
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:
        is_optimizer_factory = None
    if is_optimizer_factory is None or not is_optimizer_factory(MoLFAdamWFactory):
        raise MolfError(
            "molf_optimizer: this transformers version has no optimizer factories; pass "
            "optimizers=(molf.MoLFAdamW(model, ...), None) to the Trainer instead"
        )
    kwargs = dict(molf_kwargs)
    if args is not None:
        kwargs.setdefault("lr_fft", args.learning_rate)
        kwargs.setdefault("lr_lora", args.learning_rate)
        kwargs.setdefault("betas", (args.adam_beta1, args.adam_beta2))
        kwargs.setdefault("eps", args.adam_epsilon)
        if args.weight_decay and not any(k.startswith("weight_decay") for k in molf_kwargs):
            warnings.warn(
                f"molf_optimizer: args.weight_decay={args.weight_decay} is not used; MoLFAdamW "
                "decays each expert with its own weight_decay_fft / weight_decay_lora",
                stacklevel=2,
            )
    return MoLFAdamWFactory, kwargs


def _molf_optimizer(optimizer: Any) -> MoLFAdamW | None:
    """The MoLFAdamW inside the Trainer's optimizer (accelerate wraps it), or None."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, MoLFAdamW) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, MoLFAdamW) else None


def _mismatch(log: RoutingLog, optimizer: MoLFAdamW) -> str | None:
    """Why `log` is not the routing log of `optimizer`'s state, or None when it is."""
    if log.module_names != optimizer.module_names or log.expert_names != list(
        optimizer.expert_names
    ):
        return "it names other modules or experts than the optimizer"
    if not log.records:
        return "it is empty" if optimizer.win_counts().any() else None
    wins = sum(r["winners"].to(dtype=optimizer.win_counts().dtype) for r in log.records)
    if not (wins == optimizer.win_counts()).all():
        return "its win counts differ from those in the optimizer state (another run's log?)"
    return None


class MoLFCallback(TrainerCallback):
    """Routing shares in the Trainer's logs; the routing log in every checkpoint, and back on resume.

    Needs the Trainer's optimizer to be a MoLFAdamW with `log_routing=True` (the default). Add it
    with `use_molf(trainer)`, which places it before the reporting callbacks.
    """

    def __init__(self, prefix: str = "molf/") -> None:
        self.prefix = prefix
        self._logged = 0  # routing records already summarised into a log

    def _optimizer(self, optimizer: Any) -> MoLFAdamW:
        found = _molf_optimizer(optimizer)
        if found is None:
            raise MolfError(
                f"MoLFCallback: the Trainer's optimizer is {type(optimizer).__name__}, not "
                "MoLFAdamW; build the Trainer's optimizer with molf.integrations.transformers."
                "use_molf(trainer)"
            )
        return found

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        opt = self._optimizer(optimizer)
        log = opt.routing_log
        if log is None:
            warnings.warn(
                "MoLFCallback: MoLFAdamW(log_routing=False) keeps no routing log: no routing "
                "shares are logged or checkpointed",
                stacklevel=2,
            )
            return
        if state.global_step > 0 and not log.records:
            self._restore(args, state, opt, log)
        self._logged = len(log.records)

    def _restore(
        self, args: TrainingArguments, state: TrainerState, opt: MoLFAdamW, log: RoutingLog
    ) -> None:
        """A resumed run: the optimizer state is the checkpoint's, its routing log is empty.
        The Trainer does not tell callbacks which checkpoint it resumed from: try
        `args.resume_from_checkpoint`, then `<output_dir>/checkpoint-<step>`, and take a log only
        if its win counts are the optimizer state's."""
        candidates = [
            Path(args.output_dir) / f"checkpoint-{state.global_step}",
        ]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.insert(0, Path(args.resume_from_checkpoint))
        problems = []
        for directory in candidates:
            path = directory / ROUTING_FILE
            if not path.is_file():
                continue
            saved = RoutingLog.read_jsonl(path)
            problem = _mismatch(saved, opt)
            if problem is None:
                log.records = saved.records
                return
            problems.append(f"{path}: {problem}")
        where = "; ".join(problems) or f"no {ROUTING_FILE} in {', '.join(map(str, candidates))}"
        warnings.warn(
            f"MoLFCallback: resumed at step {state.global_step} without the routing log of the "
            f"steps before ({where}); the routing log starts at this step",
            stacklevel=2,
        )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        opt = _molf_optimizer(optimizer)
        if logs is None or opt is None or opt.routing_log is None:
            return
        if any(k.startswith("eval_") for k in logs):  # shares go with the training logs
            return
        log = opt.routing_log
        if len(log.records) <= self._logged:
            return
        shares = {
            f"{self.prefix}share_{name}": value
            for name, value in log.overall_shares(self._logged).items()
        }
        self._logged = len(log.records)
        logs.update(shares)
        # Trainer.log put a copy of `logs` in the history before the callbacks ran.
        if state.log_history:
            state.log_history[-1].update(shares)

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        opt = _molf_optimizer(optimizer)
        if opt is None or opt.routing_log is None or not args.should_save:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():  # e.g. a hyper-parameter search's per-trial directory
            warnings.warn(
                f"MoLFCallback: no checkpoint directory {checkpoint}; routing log not saved",
                stacklevel=2,
            )
            return
        tmp = checkpoint / f".tmp-{ROUTING_FILE}"
        opt.routing_log.write_jsonl(tmp)
        os.replace(tmp, checkpoint / ROUTING_FILE)


def _is_molf_save(directory: str | os.PathLike[str] | None) -> bool:
    return directory is not None and (Path(directory) / saving.CONFIG_NAME).is_file()


def _resume_from_molf_checkpoints(trainer: Trainer) -> None:
    """Let `trainer` load the model from checkpoints in molf's format (written by the wrapped
    model's save_pretrained): the Trainer itself only looks for transformers' weight files. Its
    two loading methods are wrapped on this instance; other checkpoints load as before."""
    for hook in ("_load_from_checkpoint", "_load_best_model"):
        if not callable(getattr(type(trainer), hook, None)):
            raise MolfError(
                f"use_molf: {type(trainer).__name__} has no {hook}; this transformers version "
                "is not supported for resuming from molf checkpoints"
            )
    load_from_checkpoint = trainer._load_from_checkpoint
    load_best_model = trainer._load_best_model

    def _load_from_checkpoint(resume_from_checkpoint: str, model: Any = None) -> None:
        if not _is_molf_save(resume_from_checkpoint):
            load_from_checkpoint(resume_from_checkpoint, model)
            return
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            raise MolfError(
                f"{resume_from_checkpoint}: resuming a molf checkpoint under FSDP or DeepSpeed "
                "through the Trainer is not supported"
            )
        saving.restore_wrapped(trainer.model, resume_from_checkpoint)

    def _load_best_model() -> None:
        best = trainer.state.best_model_checkpoint
        if not _is_molf_save(best):
            load_best_model()
            return
        saving.restore_wrapped(trainer.model, best)

    trainer._load_from_checkpoint = _load_from_checkpoint
    trainer._load_best_model = _load_best_model


def use_molf(trainer: Trainer, **molf_kwargs: Any) -> MoLFCallback:
    """Make `trainer` (a transformers `Trainer` or a subclass such as TRL's `SFTTrainer`) train
    its `molf.wrap`ped model with MoLFAdamW, log and checkpoint the routing, and resume from its
    checkpoints (which the wrapped model writes in molf's format, see molf.saving); returns the
    callback. Call it after building the trainer, before `train()`.

    `molf_kwargs` go to MoLFAdamW (see `molf_optimizer` for what comes from `trainer.args`).
    """
    if not molf_modules(trainer.model):
        raise MolfError(
            "use_molf: the trainer's model has no MoLF modules; molf.wrap(model, config) it first"
        )
    if trainer.optimizer is not None:
        raise MolfError(
            f"use_molf: the trainer already has an optimizer ({type(trainer.optimizer).__name__}); "
            "build it without optimizers=, use_molf makes MoLFAdamW"
        )
    current = trainer.optimizer_cls_and_kwargs
    if current is not None and current[0] is not MoLFAdamWFactory:
        raise MolfError(
            "use_molf: the trainer already has optimizer_cls_and_kwargs; build it without them"
        )
    trainer.optimizer_cls_and_kwargs = molf_optimizer(trainer.args, **molf_kwargs)
    _resume_from_molf_checkpoints(trainer)
    callbacks = trainer.callback_handler.callbacks
    for cb in [cb for cb in callbacks if isinstance(cb, MoLFCallback)]:
        callbacks.remove(cb)
    callback = MoLFCallback()
    callbacks.insert(0, callback)  # before the reporting callbacks: they send what on_log adds
    return callback
