"""Shared pieces of the task builders and evaluators.

A task turns a data source into training examples and held-out evaluation records (task-specific
dicts that the task's evaluator scores). An example is prompt + completion text, with the loss on
the completion tokens only, or a conversation (`messages`) rendered with the tokenizer's chat
template, with the loss on the assistant turns only. `encode_example` is the one place that
decides which tokens an example trains on; training (`molf.train.data`) and evaluation both use it.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from molf.errors import MolfError
from molf.tasks.chat import chat_tokens
from molf.tasks.encoding import IGNORE, Encoded, Example


def encode_example(example: Example, tokenizer: Any) -> Encoded:
    """Token ids and labels of an example: prompt tokens IGNORE, completion tokens and an EOS
    trained; a conversation through `molf.tasks.chat.chat_tokens`."""
    if example.messages is not None:
        return chat_tokens(tokenizer, example.messages, example.origin or "conversation")
    p = list(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
    c = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        c.append(tokenizer.eos_token_id)  # the model learns to stop after the completion
    return Encoded(p + c, [IGNORE] * len(p) + c, len(p))


def fit_length(encoded: Encoded, max_length: int) -> Encoded:
    """An encoded example cut to `max_length` tokens.

    Text keeps the end of the prompt, next to the completion, and at least half the length for
    it; the completion gives up its tail. A conversation keeps its beginning."""
    ids, labels = encoded.input_ids, encoded.labels
    if len(ids) <= max_length:
        return encoded
    if encoded.n_prompt is None:
        return Encoded(ids[:max_length], labels[:max_length], None)
    n_p = encoded.n_prompt
    n_c = len(ids) - n_p
    keep_p = min(n_p, max(max_length - n_c, max_length // 2))
    start = n_p - keep_p
    end = n_p + min(n_c, max_length - keep_p)
    return Encoded(ids[start:end], labels[start:end], keep_p)


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


def padded_batch(
    ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded tensors of a batch: pad ids, IGNORE labels and a 0 attention mask past each
    row's end, so real tokens keep the positions they have alone."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    lab = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, (x, y) in enumerate(zip(ids, labels)):
        input_ids[r, : len(x)] = torch.tensor(list(x))
        lab[r, : len(y)] = torch.tensor(list(y))
        mask[r, : len(x)] = 1
    return {"input_ids": input_ids, "labels": lab, "attention_mask": mask}


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token rows padded on the left: the last column holds every row's last token."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            input_ids[i, width - len(r) :] = torch.tensor(list(r))
            mask[i, width - len(r) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def _prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer(p)["input_ids"]) for p in prompts]


# The progress bar of the evaluation under way (None: quiet, the default for library calls).
_EVAL_BAR: contextvars.ContextVar[Any] = contextvars.ContextVar("molf_eval_bar", default=None)


@contextlib.contextmanager
def eval_progress(enabled: bool, desc: str = "eval") -> Iterator[None]:
    """Show a progress bar (batches scored) for the evaluations inside this block. A task's
    phases (prompts, paraphrases, generations) each add their batches to its total as they
    start, so the total grows while the bar runs."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=0, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True, leave=False)
    token = _EVAL_BAR.set(bar)
    try:
        yield
    finally:
        _EVAL_BAR.reset(token)
        bar.close()


def batch_starts(n: int, batch_size: int) -> Iterator[int]:
    """range(0, n, batch_size), advancing the evaluation's progress bar (if any) per batch."""
    bar = _EVAL_BAR.get()
    if bar is not None:
        bar.total += math.ceil(n / batch_size)
        bar.refresh()
    for i in range(0, n, batch_size):
        yield i
        if bar is not None:
            bar.update(1)


@torch.no_grad()
def next_token_logprobs(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int = 16
) -> torch.Tensor:
    """Log-probabilities of the token that follows each prompt: a [len(prompts), vocab] tensor."""
    device = _model_device(model)
    rows = _prompt_ids(tokenizer, prompts)
    out = []
    for i in batch_starts(len(rows), batch_size):
        batch = left_padded(rows[i : i + batch_size], tokenizer.pad_token_id)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, -1, :].float()
        out.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def generate_from_ids(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    stop: Sequence[str] = (),
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy continuations of token rows, decoded without special tokens and cut at the first
    stop string. `generate_kwargs` go to `model.generate` (e.g. `eos_token_id`)."""
    device = _model_device(model)
    outs: list[str] = []
    for i in batch_starts(len(rows), batch_size):
        batch = {
            k: v.to(device)
            for k, v in left_padded(rows[i : i + batch_size], tokenizer.pad_token_id).items()
        }
        gen = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **generate_kwargs,
        )
        new = gen[:, batch["input_ids"].shape[1] :]
        for text in tokenizer.batch_decode(new, skip_special_tokens=True):
            for s in stop:
                if s in text:
                    text = text[: text.index(s)]
            outs.append(text.strip())
    return outs


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop: Sequence[str] = ("\n",),
) -> list[str]:
    """Greedy continuations of `prompts`, cut at the first stop string."""
    rows = _prompt_ids(tokenizer, prompts)
    return generate_from_ids(model, tokenizer, rows, max_new_tokens, batch_size, stop)


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


def _without_eos(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) exactly as training encodes them, without the trailing EOS."""
    enc = encode_example(Example(prompt, completion), tokenizer)
    n = enc.n_prompt or 0
    cont = enc.input_ids[n:]
    if tokenizer.eos_token_id is not None and cont and cont[-1] == tokenizer.eos_token_id:
        cont = cont[:-1]
    return enc.input_ids[:n], cont


def _cache_argument(model: Any) -> str:
    # transformers 5 renamed `past_key_values` to `cache` (the old name still works, with a warning)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def option_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    options: Sequence[Sequence[str]],
    batch_size: int = 16,
) -> list[list[tuple[float, int]]]:
    """For each prompt, (summed log-probability, token count) of each of its options as the
    completion, teacher forced and tokenized as training tokenizes a prompt + completion example.

    Each prompt runs once; its key/value cache is copied to its options, which then run in one
    right-padded batch. That costs about a third of scoring every prompt + option sequence on
    its own (the prompt is most of the tokens) and gives the same numbers."""
    if len(prompts) != len(options):
        raise ValueError(f"{len(options)} option lists for {len(prompts)} prompts")
    device = _model_device(model)
    ensure_pad_token(tokenizer)
    pad = tokenizer.pad_token_id
    out: list[list[tuple[float, int]]] = []
    for i in batch_starts(len(prompts), batch_size):
        heads, conts, owner = [], [], []
        for k, (prompt, opts) in enumerate(
            zip(prompts[i : i + batch_size], options[i : i + batch_size])
        ):
            encoded = [_without_eos(tokenizer, prompt, o) for o in opts]
            if not encoded or not encoded[0][0]:
                raise MolfError("option scoring needs a non-empty prompt and at least one option")
            if any(not c for _, c in encoded):
                raise MolfError(f"an option tokenizes to nothing after prompt {prompt[:60]!r}")
            heads.append(encoded[0][0])
            conts += [c for _, c in encoded]
            owner += [k] * len(encoded)
        # the prompts, left padded so that each one's last token is in the last column
        batch = left_padded(heads, pad)
        mask = batch["attention_mask"].to(device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        first = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
        )
        index = torch.tensor(owner, device=device)
        first_logp = torch.log_softmax(first.logits[:, -1, :].float(), dim=-1)[index]
        cache = first["cache"] if "cache" in first else first["past_key_values"]
        cache.reorder_cache(index)  # one copy of its prompt's cache per option
        # the options' tokens but their last, right padded, after their prompt's positions
        width = max(len(c) for c in conts) - 1
        scores = [float(first_logp[r, c[0]]) for r, c in enumerate(conts)]
        if width > 0:
            ids = torch.full((len(conts), width), pad, dtype=torch.long)
            tail = torch.zeros((len(conts), width), dtype=torch.long)
            for r, c in enumerate(conts):
                ids[r, : len(c) - 1] = torch.tensor(c[:-1])
                tail[r, : len(c) - 1] = 1
            tail = tail.to(device)
            start = positions[index, -1:] + 1
            logits = model(
                input_ids=ids.to(device),
                attention_mask=torch.cat([mask[index], tail], dim=1),
                position_ids=start + torch.arange(width, device=device),
                use_cache=True,
                **{_cache_argument(model): cache},
            ).logits
            for r, c in enumerate(conts):
                if len(c) > 1:
                    logp = torch.log_softmax(logits[r, : len(c) - 1].float(), dim=-1)
                    target = torch.tensor(c[1:], device=device)
                    scores[r] += float(logp.gather(1, target[:, None]).sum())
        grouped: list[list[tuple[float, int]]] = [[] for _ in heads]
        for r, (k, c) in enumerate(zip(owner, conts)):
            grouped[k].append((scores[r], len(c)))
        out += grouped
    return out
