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
`val`, `valid`, `dev`, `eval`; `test`); `val_data` rows are validation rows. A data set whose
splits have other names (a hub id's `train_sft`, say) names its splits with `train_split=`,
`val_split=` and `test_split=`; splits that neither these nor the usual names select are then
left out (and said so). Without validation rows, `n_val` rows are cut from the training rows
(seeded); without test rows, the test split is the validation rows when those came from the
user, and otherwise `n_test` rows cut from the training rows (seeded, before validation, as in
the other tasks). `n_val` and `n_test` also cap user-given splits (a seeded sample), and
`n_train` the training rows (`null`: all).

Unset (null) `n_val` and `n_test` scale with the data: of n training rows, test and validation
each take n // 10 rows, at least 1 and at most 64 (test) and 32 (validation), as long as one row
is left to train on; unset, they cap user-given splits at 64 and 32. Set sizes are taken as
given, and sizes that leave nothing to train on are an error naming the numbers and the keys.
The split is described in `TaskSplits.info["note"]`, which `molf train` prints. With
`evaluation_only` (`molf eval`) and no size given, every row is a test record (only the
`test` rows, if the data names some).

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
from molf.tasks.base import TaskBase, TaskOptions, TaskRequest, item_id, register_task
from molf.tasks.chat import chat_prompt, check_messages
from molf.tasks.common import (
    IGNORE,
    Example,
    TaskSplits,
    batch_starts,
    encode_example,
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
# Unset n_val / n_test: a tenth of the rows each, within these bounds (they also cap the
# validation and test rows a file's splits give).
HELD_OUT_CAP = {"validation": 32, "test": 64}
_SPLIT_OPTIONS = {"train": "train_split", "validation": "val_split", "test": "test_split"}


def held_out_size(n_rows: int, role: str, available: int) -> int:
    """How many of `n_rows` rows an unset `n_val` (role 'validation') or `n_test` ('test')
    holds out: n_rows // 10, at least 1 and at most HELD_OUT_CAP[role], and at most
    `available` - 1, so that a row is left to train on."""
    return max(0, min(HELD_OUT_CAP[role], max(1, n_rows // 10), available - 1))


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


def detect_layout(
    rows: Sequence[dict[str, Any]],
    name: str,
    options: TaskOptions,
    places: Sequence[str] | None = None,
) -> Layout:
    """The format of `rows`: fixed by the options that rename columns, else recognised from the
    columns, row by row where several formats' columns are present. `places` says where each row
    is in messages ('line 4'; default 'row i', 1-based)."""
    places = places if places is not None else [f"row {i + 1}" for i in range(len(rows))]
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
            raise MolfError(f"{name} {places[i]}: no value in any of {keys}")
        if kind != kinds[0]:
            first = " + ".join(_LABEL[f] for f in kinds[0])
            this = " + ".join(_LABEL[f] for f in kind)
            raise MolfError(
                f"{name}: rows of mixed formats ({places[0]} is {first}, {places[i]} is {this}); "
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


def _split_roles(table: Table, options: TaskOptions | None) -> dict[str, str]:
    """{table split: 'train' | 'validation' | 'test'} for the splits the data set uses: those
    `train_split=` / `val_split=` / `test_split=` name, and those with a usual name (`train`,
    `validation`, `dev`, ...) for a role no option names. An unusual name is an error unless an
    option is set (its split is then left out); `options` None maps by the usual names only."""
    names = ", ".join(sorted(table.splits))
    chosen: dict[str, str] = {}
    for role, option in _SPLIT_OPTIONS.items():
        split = getattr(options, option) if options is not None else None
        if split is None:
            continue
        if split not in table.splits:
            raise MolfError(f"{table.name}: no split '{split}' for {option}= (splits: {names})")
        if split in chosen:
            raise MolfError(
                f"{table.name}: split '{split}' is named for both {_SPLIT_OPTIONS[chosen[split]]}= "
                f"and {option}="
            )
        chosen[split] = role
    roles = {}
    for split in table.splits:
        usual = SPLIT_NAMES.get(split.lower())
        if split in chosen:
            roles[split] = chosen[split]
        elif usual is not None and usual not in chosen.values():
            roles[split] = usual
        elif not chosen:
            raise MolfError(
                f"{table.name}: split '{split}' is not train, validation or test (splits: "
                f"{names}); choose them with train_split=, val_split= and test_split="
            )
    return roles


def read_records(
    table: Table,
    options: TaskOptions,
    layout: Layout | None = None,
    *,
    choose_splits: bool = True,
) -> tuple[dict[str, list[dict[str, Any]]], Layout]:
    """A table's records by split ('train', 'validation', 'test'), and its layout.

    `choose_splits`: apply the `train_split=` / `val_split=` / `test_split=` options (not to a
    `val_data` table, all of whose rows are validation rows)."""
    roles = _split_roles(table, options if choose_splits else None)
    multi = len(table.splits) > 1
    located = []  # (row, its split's role, its name in messages: 'd.jsonl line 4', 'x[test] row 2')
    for split_name, role in roles.items():
        prefix = f"{table.name}[{split_name}]" if multi else table.name
        for i, row in enumerate(table.splits[split_name]):
            located.append((row, role, f"{prefix} {table.place(split_name, i)}"))
    if not located:
        raise MolfError(f"{table.name}: no rows (empty file)")
    for row, _, where in located:
        if not isinstance(row, dict):
            raise MolfError(f"{where}: expected an object, got {type(row).__name__}")
    rows = [row for row, _, _ in located]
    places = [where.removeprefix(table.name).lstrip() for _, _, where in located]
    found = detect_layout(rows, table.name, options, places)
    if layout is not None and found.format != layout.format:
        raise MolfError(
            f"{table.name}: is {found.describe()} but the training data is {layout.describe()}"
        )
    out: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    for row, role, where in located:
        out[_split_of(row, role, where)].append(_record(row, found, where))
    return out, found


def _example(record: dict[str, Any]) -> Example:
    return Example(record["prompt"], record["completion"], record["messages"], record["id"])


class SftTask(TaskBase):
    """Supervised fine-tuning on a user's data set (see the module docstring)."""

    name = "sft"
    sources = ("sft",)

    def __init__(self, options: TaskOptions | None = None) -> None:
        self.options = options or TaskOptions()
        metric = self.options.generation_metric
        self.headline = "loss" if metric == "none" else metric
        # what `evaluate` reports, for checking `best_metric` before any model loads
        self.metrics = ("loss", "perplexity") + (() if metric == "none" else (metric,))

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
            extra, _ = read_records(
                load_table(opts.val_data, "val_data"), opts, layout, choose_splits=False
            )
            records["validation"] += [r for split in extra.values() for r in split]
            val_from = "val_data"
        info: dict[str, Any] = {
            "source": "sft",
            "data": table.name,
            "format": layout.format,
            "columns": layout.columns,
            "train_rows": len(records["train"]),
        }
        if request.evaluation_only and request.n_val is None and request.n_test is None:
            # nothing to train: every row is scored, or the rows the data calls test rows
            test = records["test"] or records["train"] + records["validation"]
            rows = "test rows" if records["test"] else "rows"
            info |= {"validation_from": None, "test_from": "all"}
            info["note"] = f"{table.name}: all {len(test)} {rows} are test records"
            return TaskSplits(train=[], validation=[], test=test, info=info)
        pool = shuffled(records["train"], seed)
        n_rows = len(pool)
        n_test = request.n_test
        if n_test is None:  # unset: a tenth of the rows, or the user's test rows up to the cap
            from_user = bool(records["test"]) or val_from is not None
            n_test = HELD_OUT_CAP["test"] if from_user else held_out_size(n_rows, "test", n_rows)
        test_from = "split" if records["test"] else None
        test = shuffled(records["test"], seed)[:n_test]
        if not test and val_from is None:
            test, pool = pool[:n_test], pool[n_test:]
            test_from = "seeded"
        n_val = request.n_val
        if n_val is None:
            n_val = HELD_OUT_CAP["validation"]
            if val_from is None:
                n_val = held_out_size(n_rows, "validation", len(pool))
        if val_from is None:
            validation, pool = pool[:n_val], pool[n_val:]
        else:
            validation = shuffled(records["validation"], seed)[:n_val]
        if not test:  # the user's validation rows are the only held-out data
            test = shuffled(records["validation"], seed)[:n_test]
            test_from = "validation"
        train = pool if request.n_train is None else pool[: request.n_train]
        if not test or (not train and not request.evaluation_only):
            raise MolfError(_too_few(table.name, n_rows, request, len(test), len(validation)))
        left_out = sorted(set(table.splits) - set(_split_roles(table, opts)))
        info |= {"validation_from": val_from or "seeded", "test_from": test_from}
        info |= {"left_out_splits": left_out}
        sizes = {"train": len(train), "validation": len(validation), "test": len(test)}
        info["note"] = _describe(table.name, request, n_rows, len(pool), sizes, info)
        return TaskSplits(
            train=[_example(r) for r in train], validation=validation, test=test, info=info
        )

    def score(
        self,
        model: Any,
        tokenizer: Any,
        records: list[dict[str, Any]],
        batch_size: int,
        items: dict[str, float] | None,
    ) -> dict[str, float]:
        """Loss and perplexity on `records`, and the generation metric when one was requested."""
        loss = self._loss(model, tokenizer, records, batch_size)
        metrics = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}
        metric = self.options.generation_metric
        if metric != "none":
            metrics[metric] = self._generation(model, tokenizer, records, batch_size, metric, items)
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
        for i in batch_starts(len(encoded), bs):
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


def _too_few(name: str, n_rows: int, request: TaskRequest, n_test: int, n_val: int) -> str:
    """The error for splits that leave no test record or no training row, with the numbers and
    the config keys that change them."""
    rows = f"{n_rows} training row{'s' if n_rows != 1 else ''}"
    if request.n_val is None and request.n_test is None:
        return (
            f"{name}: {rows}: too few to hold out a test record and keep one to train on; give "
            "at least 2 rows, or test rows of their own (a 'split' column, test_split=, "
            "--val-data)"
        )
    sizes = ", ".join(
        f"{key}={getattr(request, key)}" for key in ("n_test", "n_val") if getattr(request, key)
    )
    auto_test = held_out_size(n_rows, "test", n_rows)
    auto_val = held_out_size(n_rows, "validation", n_rows - auto_test)
    return (
        f"{name}: {rows}, {n_test} held out for test and {n_val} for validation ({sizes}): "
        f"none is left to train on; lower the config keys n_test and n_val, or leave them unset "
        f"to hold out about 10% each ({auto_test} and {auto_val} here)"
    )


def _describe(
    name: str,
    request: TaskRequest,
    n_rows: int,
    n_pool: int,
    sizes: dict[str, int],
    info: dict[str, Any],
) -> str:
    """One line saying how many rows went where and why: what `molf train` prints."""
    given = {"split": "the data's {role} rows", "val_data": "--val-data"}
    given["validation"] = "the validation rows"

    def how(role: str, key: str, source: str) -> str:
        size = getattr(request, key)
        if source != "seeded":
            return given[source].format(role=role)
        if size is not None:
            return f"{key}={size}, seeded"
        return f"{key} unset: a tenth of {n_rows} rows, at most {HELD_OUT_CAP[role]}, seeded"

    capped = request.n_train is not None and n_pool > request.n_train
    parts = [
        f"{sizes['train']} train" + (f" (n_train={request.n_train})" if capped else ""),
        f"{sizes['validation']} validation ({how('validation', 'n_val', info['validation_from'])})",
        f"{sizes['test']} test ({how('test', 'n_test', info['test_from'])})",
    ]
    line = f"{name}: {', '.join(parts)}"
    if info["left_out_splits"]:
        line += f"; splits left out: {', '.join(info['left_out_splits'])}"
    return line


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
    "train_split",
    "val_split",
    "test_split",
)
TASK = register_task(
    SftTask(), with_data="sft", options=_OPTIONS, configure=SftTask, sizes_splits=True
)
