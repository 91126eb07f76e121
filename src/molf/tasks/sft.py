"""Supervised fine-tuning on your own data (`sft`).

Data: `data` (`--data`) and optionally `val_data` name a JSONL, JSON, CSV or Parquet file, a
directory written by `datasets.save_to_disk`, or a hub id, all read by `molf.tasks.rows`. The
format is recognised from the columns:

  - `messages`: a list of `{role, content}`, rendered with the tokenizer's chat template; the loss
    is on the assistant turns only (`molf.tasks.chat`). In CSV the cell holds the list as JSON.
  - `prompt` + `completion`: the texts concatenated, the loss on the completion (and an EOS) only.
  - `text`: plain language modelling, the loss on every token.

Columns with other names are mapped with `messages_field=`, `prompt_field=` + `completion_field=`
or `text_field=`; naming any of them also fixes the format. Other columns are ignored, except
`split`. Bad input fails before any compute with one line naming the file, the row and the
problem: no usable columns (the columns found are listed), an empty file, rows of different
formats, a conversation without an assistant turn, a role order the chat template rejects.

Splits. Rows go to the split their table split or `split` column names (`train`; `validation`,
`val`, `valid`, `dev`, `eval`; `test`); `val_data` rows are validation rows. Without validation
rows, `n_val` rows are cut from the training rows (seeded); without test rows, the test split is
the validation rows when those came from the user, and otherwise `n_test` rows cut from the
training rows (seeded, before validation, as in the other tasks). `n_val` and `n_test` also cap
user-given splits (a seeded sample), and `n_train` the training rows (`null`: all).

Evaluation (`evaluate`, usable mid-training): `loss`, the mean cross-entropy over the tokens the
loss trains on, tokenized and truncated at `max_length` exactly as in training, and `perplexity`
= exp(loss), always. `generation_metric=exact_match` or `contains` adds a greedy generation for
each record's prompt (for a conversation: everything before its last assistant turn) until the
end-of-sequence token or `max_new_tokens` (default: the longest reference in tokens plus 16),
compared with the completion (the last assistant turn) after collapsing whitespace: `exact_match`
wants the whole text equal, `contains` the reference anywhere in the output, ignoring case. The
headline metric is `loss` (lower is better), or the generation metric when one is requested.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from molf.errors import MolfError
from molf.tasks.base import TaskOptions, TaskRequest, item_id, register_task
from molf.tasks.chat import chat_prompt, check_messages
from molf.tasks.common import (
    IGNORE,
    Example,
    TaskSplits,
    encode_example,
    ensure_pad_token,
    fit_length,
    generate_from_ids,
    padded_batch,
    shuffled,
)
from molf.tasks.rows import Table, load_table

__all__ = ["TASK", "SftTask", "Layout", "detect_layout", "read_records"]

# format -> its fields, each with the option that renames it and its default column
FORMATS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "chat": (("messages", "messages_field", "messages"),),
    "completion": (
        ("prompt", "prompt_field", "prompt"),
        ("completion", "completion_field", "completion"),
    ),
    "text": (("text", "text_field", "text"),),
}
# the field whose value decides a row's format (a prompt may be empty; a completion may not)
_KEY_FIELD = {"chat": "messages", "completion": "completion", "text": "text"}
_LABEL = {"chat": "chat", "completion": "prompt/completion", "text": "text"}
SPLIT_COLUMN = "split"
SPLIT_NAMES = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "dev": "validation",
    "eval": "validation",
    "test": "test",
}
_MAPPING_HINT = "messages_field=, prompt_field= and completion_field=, or text_field="


@dataclass(frozen=True)
class Layout:
    """A data set's format and the column that holds each of its fields."""

    format: str
    columns: dict[str, str]  # field ('messages', 'prompt', 'completion', 'text') -> column

    def describe(self) -> str:
        cols = ", ".join(f"'{c}'" for c in self.columns.values())
        return f"{_LABEL[self.format]} ({cols})"


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every key of any row, in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _filled(value: Any) -> bool:
    return value is not None and value != "" and value != []


def _layout_of(fmt: str, options: TaskOptions) -> Layout:
    return Layout(fmt, {field: getattr(options, opt) or col for field, opt, col in FORMATS[fmt]})


def detect_layout(rows: Sequence[dict[str, Any]], name: str, options: TaskOptions) -> Layout:
    """The format of `rows`: fixed by the options that rename columns, else recognised from the
    columns, row by row where several formats' columns are present."""
    found = _columns(rows)
    listed = ", ".join(found) or "none"
    chosen = [fmt for fmt, fields in FORMATS.items() if any(getattr(options, f[1]) for f in fields)]
    if len(chosen) > 1:
        raise MolfError(f"{name}: column options name two formats ({', '.join(chosen)}); give one")
    if chosen:
        layout = _layout_of(chosen[0], options)
        for field, column in layout.columns.items():
            if column not in found:
                raise MolfError(
                    f"{name}: no column '{column}' for the {field} (columns found: {listed})"
                )
        return layout
    candidates = [fmt for fmt, fields in FORMATS.items() if all(f[2] in found for f in fields)]
    if not candidates:
        half = [c for c in ("prompt", "completion") if c in found]
        if half:
            other = "completion" if half[0] == "prompt" else "prompt"
            raise MolfError(
                f"{name}: a '{half[0]}' column but no '{other}' column (columns found: {listed}); "
                f"name yours with {other}_field="
            )
        raise MolfError(
            f"{name}: no known columns (found: {listed}); expected 'messages', 'prompt' + "
            f"'completion' or 'text', or name yours with {_MAPPING_HINT}"
        )
    if len(candidates) == 1:
        return _layout_of(candidates[0], options)
    # several formats' columns: each row's filled key field decides its format
    kinds = [tuple(f for f in candidates if _filled(row.get(_KEY_FIELD[f]))) for row in rows]
    for i, kind in enumerate(kinds):
        if not kind:
            keys = ", ".join(f"'{_KEY_FIELD[f]}'" for f in candidates)
            raise MolfError(f"{name} row {i}: no value in any of {keys}")
        if kind != kinds[0]:
            first = " + ".join(_LABEL[f] for f in kinds[0])
            this = " + ".join(_LABEL[f] for f in kind)
            raise MolfError(
                f"{name}: rows of mixed formats (row 0 is {first}, row {i} is {this}); "
                f"use one format per file, or pick one with {_MAPPING_HINT}"
            )
    if len(kinds[0]) > 1:
        both = " and ".join(f"'{_KEY_FIELD[f]}'" for f in kinds[0])
        raise MolfError(
            f"{name}: every row fills both {both}; pick the format with {_MAPPING_HINT}"
        )
    return _layout_of(kinds[0][0], options)


def _text(row: dict[str, Any], column: str, where: str, nonempty: bool) -> str:
    value = row.get(column)
    if value is None:
        raise MolfError(f"{where}: no '{column}' value")
    if not isinstance(value, str):
        raise MolfError(f"{where}: '{column}' must be text, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise MolfError(f"{where}: '{column}' is empty")
    return value


def _record(row: dict[str, Any], layout: Layout, where: str) -> dict[str, Any]:
    """One row as a record: its id, and prompt + completion or messages."""
    cols = layout.columns
    record: dict[str, Any] = {"id": where, "prompt": "", "completion": "", "messages": None}
    if layout.format == "chat":
        record["messages"] = check_messages(row.get(cols["messages"]), where)
    elif layout.format == "completion":
        record["prompt"] = _text(row, cols["prompt"], where, nonempty=False)
        record["completion"] = _text(row, cols["completion"], where, nonempty=True)
    else:
        record["completion"] = _text(row, cols["text"], where, nonempty=True)
    return record


def _split_of(row: dict[str, Any], default: str, where: str) -> str:
    value = row.get(SPLIT_COLUMN)
    if value is None or value == "":
        return default
    split = SPLIT_NAMES.get(str(value).strip().lower())
    if split is None:
        raise MolfError(
            f"{where}: split '{value}' is not train, validation (val, valid, dev, eval) or test"
        )
    return split


def read_records(
    table: Table, options: TaskOptions, layout: Layout | None = None
) -> tuple[dict[str, list[dict[str, Any]]], Layout]:
    """A table's records by split ('train', 'validation', 'test'), and its layout."""
    rows_by_split: dict[str, list[Any]] = {}
    for split_name, rows in table.splits.items():
        target = SPLIT_NAMES.get(split_name.lower())
        if target is None:
            names = ", ".join(sorted(table.splits))
            raise MolfError(
                f"{table.name}: split '{split_name}' is not train, validation or test "
                f"(splits: {names})"
            )
        rows_by_split[split_name] = rows
    all_rows = [row for rows in rows_by_split.values() for row in rows]
    if not all_rows:
        raise MolfError(f"{table.name}: no rows (empty file)")
    for i, row in enumerate(all_rows):
        if not isinstance(row, dict):
            raise MolfError(f"{table.name} row {i}: expected an object, got {type(row).__name__}")
    found = detect_layout(all_rows, table.name, options)
    if layout is not None and found.format != layout.format:
        raise MolfError(
            f"{table.name}: is {found.describe()} but the training data is {layout.describe()}"
        )
    out: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    multi = len(rows_by_split) > 1
    for split_name, rows in rows_by_split.items():
        for i, row in enumerate(rows):
            where = f"{table.name}{f'[{split_name}]' if multi else ''} row {i}"
            split = _split_of(row, SPLIT_NAMES[split_name.lower()], where)
            out[split].append(_record(row, found, where))
    return out, found


def _example(record: dict[str, Any]) -> Example:
    return Example(record["prompt"], record["completion"], record["messages"], record["id"])


class SftTask:
    """Supervised fine-tuning on a user's data set (see the module docstring)."""

    name = "sft"
    sources = ("sft",)

    def __init__(self, options: TaskOptions | None = None) -> None:
        self.options = options or TaskOptions()
        metric = self.options.generation_metric
        self.headline = "loss" if metric == "none" else metric

    def build(self, request: TaskRequest) -> TaskSplits:
        """Training examples and validation/test records (see the module docstring)."""
        if not request.data:
            raise MolfError("sft needs data: --data PATH (JSONL, JSON, CSV, Parquet) or a hub id")
        opts, seed = self.options, request.seed
        table = load_table(request.data, "sft")
        records, layout = read_records(table, opts)
        if opts.generation_metric != "none" and layout.format == "text":
            raise MolfError(
                f"generation_metric={opts.generation_metric} needs a reference answer: "
                f"{table.name} has text rows (use prompt/completion or messages)"
            )
        val_from = "split" if records["validation"] else None
        if opts.val_data:
            extra, _ = read_records(load_table(opts.val_data, "val_data"), opts, layout)
            records["validation"] += [r for split in extra.values() for r in split]
            val_from = "val_data"
        pool = shuffled(records["train"], seed)
        test_from = "split" if records["test"] else None
        test = shuffled(records["test"], seed)[: request.n_test]
        if not test and val_from is None:
            test, pool = pool[: request.n_test], pool[request.n_test :]
            test_from = "seeded"
        if val_from is None:
            validation, pool = pool[: request.n_val], pool[request.n_val :]
        else:
            validation = shuffled(records["validation"], seed)[: request.n_val]
        if not test:  # the user's validation rows are the only held-out data
            test = shuffled(records["validation"], seed)[: request.n_test]
            test_from = "validation"
        train = pool if request.n_train is None else pool[: request.n_train]
        info = {
            "source": "sft",
            "data": table.name,
            "format": layout.format,
            "columns": layout.columns,
            "train_rows": len(records["train"]),
            "validation_from": val_from or "seeded",
            "test_from": test_from,
        }
        return TaskSplits(
            train=[_example(r) for r in train], validation=validation, test=test, info=info
        )

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        records: list[dict[str, Any]],
        batch_size: int = 16,
        items: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """Loss and perplexity on `records`, and the generation metric when one was requested.
        The model's train/eval mode is restored afterwards."""
        if not records:
            raise MolfError("sft: no records to evaluate")
        ensure_pad_token(tokenizer)
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            loss = self._loss(model, tokenizer, records, batch_size)
            metrics = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}
            metric = self.options.generation_metric
            if metric != "none":
                metrics[metric] = self._generation(
                    model, tokenizer, records, batch_size, metric, items
                )
        finally:
            model.train(was_training)
        return metrics

    @torch.no_grad()
    def _loss(self, model: Any, tokenizer: Any, records: list[dict[str, Any]], bs: int) -> float:
        """Mean token cross-entropy over the trained tokens of all records (not a mean of
        per-batch means, so the batch size does not change it)."""
        device = next(model.parameters()).device
        encoded = [
            fit_length(encode_example(_example(r), tokenizer), self.options.max_length)
            for r in records
        ]
        total, count = 0.0, 0
        for i in range(0, len(encoded), bs):
            part = encoded[i : i + bs]
            batch = padded_batch(
                [e.input_ids for e in part], [e.labels for e in part], tokenizer.pad_token_id
            )
            n = int((batch["labels"][:, 1:] != IGNORE).sum())  # tokens after the causal shift
            if n == 0:
                continue
            out = model(**{k: v.to(device) for k, v in batch.items()})
            total += float(out.loss) * n
            count += n
        if count == 0:
            raise MolfError(
                f"sft: none of the {len(records)} records has a trained token within "
                f"max_length={self.options.max_length} (raise max_length)"
            )
        return total / count

    def _generation(
        self,
        model: Any,
        tokenizer: Any,
        records: list[dict[str, Any]],
        bs: int,
        metric: str,
        items: dict[str, float] | None = None,
    ) -> float:
        prompts, references = [], []
        for r in records:
            if r["messages"] is not None:
                ids, reference = chat_prompt(tokenizer, r["messages"], r["id"])
            else:
                ids = list(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
                reference = r["completion"]
            prompts.append(ids[-self.options.max_length :])
            references.append(reference)
        max_new = self.options.max_new_tokens or 16 + max(
            len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references
        )
        outputs = generate_from_ids(
            model, tokenizer, prompts, max_new, bs, eos_token_id=_stop_ids(model, tokenizer)
        )
        hits = [_matches(out, ref, metric) for out, ref in zip(outputs, references)]
        if items is not None:  # the headline when a generation metric is asked for
            items.update({item_id(i): float(h) for i, h in enumerate(hits)})
        return sum(hits) / len(hits)


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a generation: the model's own (a chat model may list an end-of-turn
    token there) and the tokenizer's EOS, which training appends to completions."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def _matches(output: str, reference: str, metric: str) -> bool:
    out, ref = " ".join(output.split()), " ".join(reference.split())
    if metric == "exact_match":
        return out == ref
    return ref.casefold() in out.casefold()


_OPTIONS = (
    "val_data",
    "prompt_field",
    "completion_field",
    "messages_field",
    "text_field",
    "generation_metric",
    "max_new_tokens",
)
TASK = register_task(SftTask(), with_data="sft", options=_OPTIONS, configure=SftTask)
