"""MoLF inside transformers' Trainer and TRL's SFTTrainer (molf.integrations.transformers)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from transformers import (
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_cosine_schedule_with_warmup,
)

import molf
from molf.integrations.transformers import (
    ROUTING_FILE,
    MoLFCallback,
    molf_optimizer,
    use_molf,
)
from molf.routing import RoutingLog
from molf.saving import CONFIG_NAME
from tests.conftest import VOCAB, tiny_causal_lm

SHARES = ("molf/share_fft", "molf/share_lora_r8")


def wrapped(config: molf.MoLFConfig | None = None) -> torch.nn.Module:
    torch.manual_seed(0)  # the LoRA A init draws from the global generator
    return molf.wrap(tiny_causal_lm("llama"), config or molf.MoLFConfig(lora_ranks=(8,)))


def dataset(n: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (n, 12), generator=g)
    ]


def arguments(out, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        max_steps=6,
        per_device_train_batch_size=4,
        logging_steps=2,
        save_steps=3,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def inner(trainer: Trainer) -> molf.MoLFAdamW:
    opt = trainer.optimizer.optimizer  # accelerate's wrapper around it
    assert isinstance(opt, molf.MoLFAdamW)
    return opt


class Recorder(TrainerCallback):
    """Stands for a reporting callback (TensorBoard, W&B): keeps what each on_log hands it, and
    every parameter group's learning rate after each step."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []
        self.lrs: list[list[float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])


def same_records(a: RoutingLog, b: RoutingLog) -> bool:
    return len(a) == len(b) and all(
        x["step"] == y["step"]
        and torch.equal(x["winners"], y["winners"])
        and torch.equal(x["scores"], y["scores"])
        and torch.equal(x["active"], y["active"])
        for x, y in zip(a.records, b.records)
    )


def test_trainer_logs_routing_shares_where_reporters_see_them(tmp_path):
    recorder = Recorder()
    trainer = Trainer(
        model=wrapped(), args=arguments(tmp_path), train_dataset=dataset(), callbacks=[recorder]
    )
    callback = use_molf(trainer, lr_lora=1e-3)
    assert trainer.callback_handler.callbacks[0] is callback  # before every reporter
    trainer.train()
    opt = inner(trainer)
    log = opt.routing_log
    n_modules = len(opt.module_names)
    assert len(log) == 6 and int(opt.win_counts().sum()) == 6 * n_modules

    training_logs = [entry for entry in recorder.logs if "loss" in entry]
    assert len(training_logs) == 3
    for i, entry in enumerate(training_logs):  # logged every 2 steps: records 2i and 2i + 1
        window = log.records[2 * i : 2 * i + 2]
        fft_wins = sum(int(r["winners"][:, 0].sum()) for r in window)
        assert entry["molf/share_fft"] == fft_wins / (2 * n_modules)
        assert entry["molf/share_fft"] + entry["molf/share_lora_r8"] == pytest.approx(1.0)
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert [{k: h[k] for k in SHARES} for h in history] == [
        {k: e[k] for k in SHARES} for e in training_logs
    ]

    # The Trainer's scheduler, from args, scales every group: the FFT/LoRA ratio stays 2.
    schedule = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=1.0), 2, 6)
    factors = [schedule.lr_lambdas[0](step) for step in range(1, 7)]
    fft, lora = (opt.expert_names.index(e) for e in ("fft", "lora_r8"))
    for lrs, factor in zip(recorder.lrs, factors):
        assert lrs[fft] == pytest.approx(2e-3 * factor) and lrs[lora] == pytest.approx(
            1e-3 * factor
        )

    for step in (3, 6):  # every checkpoint has the routing log up to its step, and molf's format
        checkpoint = tmp_path / f"checkpoint-{step}"
        saved = RoutingLog.read_jsonl(checkpoint / ROUTING_FILE)
        assert [r["step"] for r in saved.records] == list(range(1, step + 1))
        head = RoutingLog(log.module_names, log.expert_names)
        head.records = log.records[:step]
        assert same_records(saved, head)
        assert (checkpoint / CONFIG_NAME).is_file() and not (
            checkpoint / "model.safetensors"
        ).exists()


def test_resume_equals_an_uninterrupted_run(tmp_path):
    full = Trainer(model=wrapped(), args=arguments(tmp_path / "full"), train_dataset=dataset())
    use_molf(full)
    full.train()

    # A second run that stopped after its checkpoint at step 3, resumed by a fresh Trainer.
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    model = wrapped()
    resumed = Trainer(model=model, args=arguments(tmp_path / "resumed"), train_dataset=dataset())
    use_molf(resumed)
    resumed.train(resume_from_checkpoint=True)

    for (name, p), (_, q) in zip(full.model.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), name
    assert same_records(inner(full).routing_log, inner(resumed).routing_log)
    assert torch.equal(inner(full).win_counts(), inner(resumed).win_counts())
    assert resumed.state.log_history[-2]["molf/share_fft"] >= 0.0

    # The final model saved by the Trainer reloads as the same wrapped model.
    resumed.save_model(str(tmp_path / "final"))
    reloaded = molf.from_pretrained(tmp_path / "final")
    ids = dataset(2)[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)

    # A routing log that does not belong to the optimizer state is not taken.
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", broken / "checkpoint-3")
    lines = (broken / "checkpoint-3" / ROUTING_FILE).read_text().splitlines()
    (broken / "checkpoint-3" / ROUTING_FILE).write_text("\n".join(lines[:-1]) + "\n")
    again = Trainer(model=wrapped(), args=arguments(broken, max_steps=4), train_dataset=dataset())
    use_molf(again)
    with pytest.warns(UserWarning, match="win counts differ"):
        again.train(resume_from_checkpoint=True)
    assert [r["step"] for r in inner(again).routing_log.records] == [4]


def test_the_two_halves_without_use_molf(tmp_path):
    args = arguments(tmp_path, max_steps=2, save_strategy="no")
    trainer = Trainer(
        model=wrapped(),
        args=args,
        train_dataset=dataset(),
        optimizer_cls_and_kwargs=molf_optimizer(args, top_k=2),
        callbacks=[MoLFCallback()],
    )
    trainer.train()
    assert inner(trainer).top_k == 2
    entry = trainer.state.log_history[0]
    assert entry["molf/share_fft"] == entry["molf/share_lora_r8"] == 1.0  # top-2 of 2: both win

    plain = Trainer(model=wrapped(), args=args, train_dataset=dataset(), callbacks=[MoLFCallback()])
    with pytest.raises(molf.MolfError, match="not MoLFAdamW"):
        plain.train()


def test_use_molf_refuses_what_it_cannot_do(tmp_path):
    args = arguments(tmp_path, weight_decay=0.1)
    with pytest.raises(molf.MolfError, match="no MoLF modules"):
        use_molf(Trainer(model=tiny_causal_lm("llama"), args=args, train_dataset=dataset()))
    model = wrapped()
    opt = molf.MoLFAdamW(model)
    with pytest.raises(molf.MolfError, match="already has an optimizer"):
        use_molf(Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, None)))
    with pytest.raises(molf.MolfError, match="no argument lr"):
        molf_optimizer(args, lr=1e-4)
    with pytest.warns(UserWarning, match="args.weight_decay=0.1 is not used"):
        _, kwargs = molf_optimizer(args)
    assert kwargs["lr_fft"] == kwargs["lr_lora"] == 2e-3
    assert kwargs["betas"] == (args.adam_beta1, args.adam_beta2)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (no files, no hub) over the tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<pad>", "</s>", "what", "is", "plus", "?"] + [str(i) for i in range(40)]
    assert len(words) <= VOCAB
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )


def test_trl_sft_trainer_trains_molf_e(tmp_path):
    import trl
    from datasets import Dataset

    model = wrapped(molf.MoLFConfig(lora_ranks=(4, 8), train_base=False))
    base = {n: m.weight.detach().clone() for n, m in molf.molf_modules(model).items()}
    rows = [{"prompt": f"what is {i} plus {i} ?", "completion": f" {2 * i}"} for i in range(16)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=2,
        save_strategy="no",
        learning_rate=1e-2,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer(),
    )
    use_molf(trainer)
    trainer.train()

    opt = inner(trainer)
    assert opt.expert_names == ("lora_r4", "lora_r8")
    assert int(opt.win_counts().sum()) == 4 * len(opt.module_names)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("mean_token_accuracy" in h for h in logs)  # TRL's own metrics
    for h in logs:
        assert math.isclose(h["molf/share_lora_r4"] + h["molf/share_lora_r8"], 1.0)
    for name, m in molf.molf_modules(model).items():
        assert torch.equal(m.weight, base[name])  # MoLF-E: the base stays frozen
    assert any(b.abs().sum() > 0 for m in molf.molf_modules(model).values() for b in m.lora_B)


def test_load_best_model_at_end_reads_molf_checkpoints(tmp_path):
    args = arguments(
        tmp_path,
        max_steps=4,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the worse checkpoint, so that "best" is not the last one
    )
    model = wrapped()
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), eval_dataset=dataset(8))
    use_molf(trainer)
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = molf.from_pretrained(tmp_path / "checkpoint-2")
    last = molf.from_pretrained(tmp_path / "checkpoint-4")
    for (name, p), (_, q) in zip(model.named_parameters(), best.named_parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(model.parameters(), last.parameters()))
