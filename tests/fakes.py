"""Fakes for evaluator tests: a word-level tokenizer and an 'LM' whose next-token logits are
looked up from the exact prefix, so every expected metric is known in advance."""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch

VOCAB = 128


class FakeTokenizer:
    """Splits text into words with `pattern` and grows its vocabulary as it meets them."""

    def __init__(self, pattern: str = r"\S+") -> None:
        self.pattern = re.compile(pattern)
        self.vocab = {"<pad>": 0, "</s>": 1}
        self.words = ["<pad>", "</s>"]
        self.padding_side = "right"
        self.pad_token: str | None = "<pad>"
        self.eos_token = "</s>"

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.vocab[self.pad_token]

    def id(self, word: str) -> int:
        if word not in self.vocab:
            self.vocab[word] = len(self.words)
            self.words.append(word)
        assert len(self.words) < VOCAB
        return self.vocab[word]

    def encode(self, text: str) -> list[int]:
        return [self.id(w) for w in self.pattern.findall(text)]

    def __call__(self, text, return_tensors=None, padding=False, add_special_tokens=True):
        if isinstance(text, str):
            ids = self.encode(text)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        rows = [self.encode(t) for t in text]
        width = max(len(r) for r in rows)
        ids, mask = [], []
        for r in rows:
            pad = [self.pad_token_id] * (width - len(r))
            ids.append(pad + r if self.padding_side == "left" else r + pad)
            ones, zeros = [1] * len(r), [0] * (width - len(r))
            mask.append(zeros + ones if self.padding_side == "left" else ones + zeros)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(self.words[i] for i in row.tolist() if i > 1) for row in ids]


class OracleLM(torch.nn.Module):
    """A causal 'LM' whose next-token logits are looked up from the exact (unpadded) prefix seen
    so far. Prefixes without an entry give all-zero logits (a uniform distribution, so ties)."""

    def __init__(self, tokenizer: FakeTokenizer) -> None:
        super().__init__()
        self.tok = tokenizer
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.table: dict[tuple[int, ...], dict[int, float]] = {}

    def prefer(self, prefix: str, logits: dict[str, float]) -> None:
        self.table[tuple(self.tok.encode(prefix))] = {self.tok.id(w): v for w, v in logits.items()}

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = torch.zeros(*input_ids.shape, VOCAB)
        for b in range(input_ids.shape[0]):
            seen: list[int] = []
            for t in range(input_ids.shape[1]):
                if attention_mask[b, t]:
                    seen.append(int(input_ids[b, t]))
                    for k, v in self.table.get(tuple(seen), {}).items():
                        out[b, t, k] = v
        return SimpleNamespace(logits=out)

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        for _ in range(max_new_tokens):
            nxt = self.forward(input_ids, attention_mask).logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, nxt], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)
        return input_ids
