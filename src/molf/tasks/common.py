"""Shared pieces of the task builders and evaluators.

A task turns a data source into training examples (prompt + completion text, for supervised
fine-tuning on the completion tokens only) and held-out evaluation records (task-specific dicts
that the task's evaluator scores with the paper's metric).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from molf.errors import MolfError


@dataclass
class Example:
    """One supervised example: the loss is taken on `completion` tokens only."""

    prompt: str
    completion: str


@dataclass
class TaskSplits:
    """What a builder returns: training examples and held-out records for validation and test."""

    train: list[Example]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


def require_fields(record: dict[str, Any], fields: Sequence[str], where: str) -> None:
    """Raise a MolfError naming the first missing field of `record` (`where` names the record)."""
    for name in fields:
        if name not in record or record[name] is None:
            raise MolfError(f"{where}: missing field '{name}'")


def shuffled(items: Sequence[Any], seed: int) -> list[Any]:
    """A deterministic shuffle that does not touch the global RNG."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def split_three(
    items: Sequence[Any], seed: int, n_train: int | None, n_val: int, n_test: int
) -> tuple[list[Any], list[Any], list[Any]]:
    """Shuffle once with `seed`, then cut test, validation and train (in that order) off the front.

    Test and validation sizes are honoured first so that held-out data never shrinks when the
    training set is small; `n_train=None` keeps everything that is left.
    """
    pool = shuffled(items, seed)
    test = pool[:n_test]
    val = pool[n_test : n_test + n_val]
    rest = pool[n_test + n_val :]
    train = rest if n_train is None else rest[:n_train]
    return train, val, test


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def next_token_logprobs(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int = 16
) -> torch.Tensor:
    """Log-probabilities of the token that follows each prompt: a [len(prompts), vocab] tensor.

    Prompts are left-padded so that the last position of every row is the prompt's last token.
    """
    device = _model_device(model)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    rows = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items()}
            logits = model(**enc).logits[:, -1, :].float()
            rows.append(torch.log_softmax(logits, dim=-1).cpu())
    finally:
        tokenizer.padding_side = old_side
    return torch.cat(rows) if rows else torch.empty(0)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop: Sequence[str] = ("\n",),
) -> list[str]:
    """Greedy continuations of `prompts`, cut at the first stop string."""
    device = _model_device(model)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            for text in tokenizer.batch_decode(new, skip_special_tokens=True):
                for s in stop:
                    if s in text:
                        text = text[: text.index(s)]
                outs.append(text.strip())
    finally:
        tokenizer.padding_side = old_side
    return outs


def ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token its EOS token as pad (batched scoring needs one)."""
    if tokenizer.pad_token_id is None:
        if getattr(tokenizer, "eos_token", None) is None:
            raise MolfError("tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token


def continuation_ids(tokenizer: Any, prompt: str, continuation: str) -> list[int]:
    """Token ids that `continuation` adds after `prompt`, as the model would see them.

    Tokenizing prompt + continuation and cutting off the prompt's ids keeps the boundary exactly as
    in training (SentencePiece tokenizers encode a bare " A" differently from "Answer: A"); when the
    prompt's ids are not a prefix, the continuation is tokenized on its own.
    """
    base = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + continuation)["input_ids"]
    if len(full) > len(base) and list(full[: len(base)]) == list(base):
        return list(full[len(base) :])
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
