"""Supervised examples -> token tensors, and the deterministic order in which a run sees them.

The loss is taken on completion tokens only (prompt and padding labels are -100). The order of
examples is a pure function of (seed, epoch), so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from molf.errors import MolfError
from molf.tasks.common import Example


class Task(Protocol):
    """What training and evaluation need of a task (`molf.tasks` builds them)."""

    name: str
    headline: str  # the metric a comparison reports

    def evaluate(
        self, model: Any, tokenizer: Any, records: list[dict[str, Any]], batch_size: int = ...
    ) -> dict[str, float]: ...


@dataclass
class Tokenized:
    """The training examples as token ids, and labels that mask the prompt (-100)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    n_truncated: int  # examples cut to max_length

    def __len__(self) -> int:
        return len(self.input_ids)

    def loss_tokens(self, indices: Sequence[int]) -> int:
        """How many tokens the loss of these examples is taken on (labels after the causal
        shift, which drops each example's first position)."""
        return sum(1 for i in indices for y in self.labels[i][1:] if y != -100)


def tokenize_examples(
    examples: Sequence[Example], tokenizer, max_length: int, too_long: str = "truncate"
) -> Tokenized:
    """Tokenize prompt + completion (+ EOS); truncate over-long examples (counted) or refuse them."""
    ids_out, labels_out, n_trunc = [], [], 0
    eos = tokenizer.eos_token_id
    for i, ex in enumerate(examples):
        p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
        if eos is not None:
            c = c + [eos]
        if len(p) + len(c) > max_length:
            if too_long == "refuse":
                raise MolfError(
                    f"training example {i}: {len(p) + len(c)} tokens > max_length {max_length} "
                    "(raise max_length or set too_long=truncate)"
                )
            n_trunc += 1
            keep_p = max(max_length - len(c), max_length // 2)
            p = p[-keep_p:]  # keep the end of the prompt, next to the completion
            c = c[: max_length - len(p)]
        ids_out.append(p + c)
        labels_out.append([-100] * len(p) + c)
    return Tokenized(ids_out, labels_out, n_trunc)


def collate(
    ids: Sequence[list[int]], labels: Sequence[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    lab = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, (x, y) in enumerate(zip(ids, labels)):
        input_ids[r, : len(x)] = torch.tensor(x)
        lab[r, : len(y)] = torch.tensor(y)
        mask[r, : len(x)] = 1
    return {"input_ids": input_ids, "labels": lab, "attention_mask": mask}


class StepOrder:
    """Which example indices form micro-batch `m` of optimizer step `s`, for any step.

    Each epoch is a permutation of all examples drawn from (seed, epoch); the permutations are
    concatenated, cut into micro-batches, and `grad_accum` micro-batches make one step.
    """

    def __init__(self, n_examples: int, batch_size: int, grad_accum: int, seed: int) -> None:
        self.n = n_examples
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        return self._perm(epoch)[offset]

    def micro_batches(self, step: int) -> list[list[int]]:
        per_step = self.batch_size * self.grad_accum
        start = step * per_step
        out = []
        for m in range(self.grad_accum):
            lo = start + m * self.batch_size
            out.append([self._index(q) for q in range(lo, lo + self.batch_size)])
        return out

    def steps_for(self, epochs: float) -> int:
        per_step = self.batch_size * self.grad_accum
        return max(1, round(epochs * self.n / per_step))
