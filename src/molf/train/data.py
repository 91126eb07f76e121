"""Supervised examples -> token tensors, and the deterministic order in which a run sees them.

Which tokens an example trains on is the task's business (`molf.tasks.common.encode_example`:
completion tokens, or a conversation's assistant turns; the rest get label -100). The order of
examples is a pure function of (seed, epoch), so a resumed run sees exactly the batches the
uninterrupted run would have seen.

Packing (`pack`) concatenates examples into rows of up to `max_length` tokens. Each example keeps
its own positions (position ids restart at 0) and attends only within itself: `collate` gives the
model a 4D additive attention mask, block-diagonal and causal, which transformers applies as given
with the eager and SDPA attention implementations (SDPA is what molf loads models with), so a
packed row computes exactly what its examples compute one by one. `check_packable` refuses the
two cases where that would not hold: flash-attention implementations (they ignore such a mask)
and sliding-window layers narrower than `max_length` (Gemma 3: the mask would replace the window).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from molf.errors import MolfError
from molf.tasks.common import IGNORE, Example, encode_example, fit_length, padded_batch


@dataclass
class Tokenized:
    """The training examples as token ids, and labels that mask the prompt (-100)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    n_truncated: int  # examples cut to max_length
    # packed rows: every token's position within its own example (None: one example per row)
    position_ids: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def loss_tokens(self, indices: Sequence[int]) -> int:
        """How many tokens the loss of these examples is taken on (labels after the causal
        shift, which drops each example's first position)."""
        return sum(1 for i in indices for y in self.labels[i][1:] if y != -100)


def tokenize_examples(
    examples: Sequence[Example], tokenizer, max_length: int, too_long: str = "truncate"
) -> Tokenized:
    """Tokenize each example the task's way; truncate over-long ones (counted) or refuse them."""
    ids_out, labels_out, n_trunc = [], [], 0
    for i, ex in enumerate(examples):
        enc = encode_example(ex, tokenizer)
        if len(enc.input_ids) > max_length:
            if too_long == "refuse":
                raise MolfError(
                    f"{ex.origin or f'training example {i}'}: {len(enc.input_ids)} tokens > "
                    f"max_length {max_length} (raise max_length or set too_long=truncate)"
                )
            n_trunc += 1
            enc = fit_length(enc, max_length)
        ids_out.append(enc.input_ids)
        labels_out.append(enc.labels)
    return Tokenized(ids_out, labels_out, n_trunc)


def pack(tok: Tokenized, max_length: int) -> Tokenized:
    """Concatenate examples, in order, into rows of at most `max_length` tokens.

    An example never spans two rows. Its first label is ignored: in a packed row that position
    would be predicted from the previous example's last token, while unpacked it is never
    predicted, so the loss over a packed row equals the sum of its examples' own losses."""
    rows: list[list[int]] = []
    labels: list[list[int]] = []
    positions: list[list[int]] = []
    for ids, lab in zip(tok.input_ids, tok.labels):
        if not rows or len(rows[-1]) + len(ids) > max_length:
            rows.append([])
            labels.append([])
            positions.append([])
        rows[-1] += ids
        labels[-1] += [IGNORE] + lab[1:]
        positions[-1] += range(len(ids))
    return Tokenized(rows, labels, tok.n_truncated, positions)


def _packed_mask(position_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The [batch, 1, length, length] additive mask of packed rows: 0 where a token may attend
    (itself or an earlier token of its own example), float32's minimum elsewhere (it stays
    finite in bfloat16 too). Padding attends to itself only, so that no softmax row is empty."""
    # an example starts wherever the position restarts; each pad token is a segment of its own
    segment = torch.cumsum((position_ids == 0).long(), dim=1)
    segment = torch.where(real.bool(), segment, -1 - torch.arange(position_ids.shape[1]))
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    return mask.masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def collate(
    ids: Sequence[list[int]],
    labels: Sequence[list[int]],
    pad_id: int,
    position_ids: Sequence[list[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; packed rows (`position_ids` given) also get their positions and
    the block-diagonal attention mask."""
    batch = padded_batch(ids, labels, pad_id)
    if position_ids is None:
        return batch
    pos = torch.zeros_like(batch["input_ids"])
    for r, p in enumerate(position_ids):
        pos[r, : len(p)] = torch.tensor(p)
    batch["attention_mask"] = _packed_mask(pos, batch["attention_mask"])
    batch["position_ids"] = pos
    return batch


def check_packable(config, max_length: int) -> None:
    """Refuse packing for a model whose attention would not keep packed examples apart exactly
    (see the module docstring); a MolfError naming the reason."""
    impl = str(getattr(config, "_attn_implementation", None) or "sdpa")
    if impl not in ("sdpa", "eager"):
        raise MolfError(
            f"packing=true needs the sdpa or eager attention implementation, not {impl} "
            "(it would ignore the mask that keeps packed examples apart)"
        )
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    if sliding and window is not None and window < max_length:
        raise MolfError(
            f"packing=true: the model's sliding-window layers look back {window} tokens, fewer "
            f"than max_length={max_length}; packed rows would widen that window "
            f"(set max_length <= {window} or packing=false)"
        )


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
