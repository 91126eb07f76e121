"""Four-way medical multiple choice (`med`), scored by the log-likelihood of each option.

The question is asked cloze style, without the options in the prompt; the completion is the
text of the gold option (the loss is on the completion only)::

    Question: <question>
    Answer:                      -> " <gold option text>"

`accuracy` (the headline) is the fraction of records whose gold option has the highest mean
log-probability per token as the completion of the prompt; `accuracy_sum` ranks by the summed
log-probability instead (it favours short options). Scoring by likelihood instead of by the
letter a model writes after a lettered list (as this task did before issue #20) lets a 135M
model show what it knows: by letter, SmolLM2-135M stays at chance (25%) before and after a
small fine-tune, because it cannot yet bind letters to options; by likelihood, the untrained
model is above chance and training moves it further (docs/compare.md).

Records hold `question`, `options` (four strings), `answer` (gold index 0-3) and a few
descriptive fields (`id`, `subject`).

Sources:
  - `medmcqa`: MedMCQA rows with `question`, `opa`, `opb`, `opc`, `opd`, `cop` and optionally
    `id` and `subject_name`, from a local `.json` (a list, or JSON lines as in the upstream
    download), `.jsonl`, `.csv` or `.parquet` file or a `save_to_disk` directory, or else a
    Hugging Face hub id (default `openlifescienceai/medmcqa`), all read by `molf.tasks.rows`. `cop` may be 0-3 (the hub
    dataset) or 1-4 (the upstream JSON files), or a letter a-d. The numbering is decided per file:
    a file with any 4 is 1-based, otherwise 0-based (a tiny 1-based file whose answers are all 1-3
    would be misread; `info["cop_base"]` reports the choice). Rows with `cop` of -1 or null
    (MedMCQA's unlabelled test split) are skipped. Repeated questions (same question and option
    set) are kept once, so no held-out question also appears in training. For a hub dataset (or a
    saved `DatasetDict`) with `train` and `validation` splits, test and validation records come from `validation` and
    training examples from `train`, as in the paper; a local file is split with the seed.
  - `med-icd10` (embedded): questions built at run time from the ICD-10-CM classification shipped
    with the installed `simple_icd_10_cm` package: which chapter, block or category a diagnosis
    belongs to, with three seeded distractors from the same level (the same chapter or block
    where possible, so they are plausible). Each diagnosis (a category or first-level subcategory
    with a unique description) yields one question, and diagnoses are split before questions are
    made, so no test question shares its diagnosis with a training question. The pool is
    balanced over chapters, and the gold letter is balanced over A-D within each split.
"""

from __future__ import annotations

import functools
import math
import random
import re
from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.tasks.base import TaskBase, TaskRequest, item_id, refuse_data, register_task
from molf.tasks.common import Example, TaskSplits, option_logprobs, shuffled, split_three
from molf.tasks.rows import load_table, objects, read_rows

__all__ = ["TASK", "MedTask", "format_prompt", "icd10_records", "load_medmcqa"]

DEFAULT_HUB_ID = "openlifescienceai/medmcqa"
ICD10_POOL_SIZE = 6000
MAX_DESCRIPTION_CHARS = 90


def format_prompt(question: str) -> str:
    """The cloze prompt for a question: the options are not shown, they are scored."""
    return f"Question: {' '.join(str(question).split())}\nAnswer:"


def to_example(record: dict[str, Any]) -> Example:
    """The supervised example for a record: its prompt and the gold option's text."""
    return Example(format_prompt(record["question"]), " " + _option(record, record["answer"]))


def _option(record: dict[str, Any], index: int) -> str:
    return " ".join(str(record["options"][index]).split())


def _key(question: str, options: list[str]) -> tuple[str, tuple[str, ...]]:
    """Identity of a question for de-duplication, blind to option order and spacing."""

    def norm(text: str) -> str:
        return " ".join(str(text).split()).lower()

    return norm(question), tuple(sorted(norm(o) for o in options))


# --------------------------------------------------------------------------- med-icd10


def _strip_range(description: str) -> str:
    """'Neoplasms (C00-D49)' -> 'Neoplasms': the range would give the answer away by code."""
    return re.sub(r"\s*\([A-Z0-9.]+-[A-Z0-9.]+\)\s*$", "", description).strip()


def _pick_distractors(
    rng: random.Random, gold: str, preferred: list[str], fallback: list[str], exclude: set[str]
) -> list[str] | None:
    """Three option texts unlike `gold` and each other: from `preferred` first, then `fallback`."""
    chosen: list[str] = []
    seen = {gold.lower()} | {e.lower() for e in exclude}
    for pool in (preferred, fallback):
        items = list(pool)
        rng.shuffle(items)
        for text in items:
            if len(chosen) == 3:
                return chosen
            if text.lower() not in seen:
                seen.add(text.lower())
                chosen.append(text)
    return chosen if len(chosen) == 3 else None


class _Icd10:
    """The ICD-10-CM hierarchy pieces the question builder needs, read once from the package."""

    def __init__(self) -> None:
        import simple_icd_10_cm as cm

        self.cm = cm
        codes = sorted(set(cm.get_all_codes(True)))
        self.chapters = {c: _strip_range(cm.get_description(c)) for c in codes if cm.is_chapter(c)}
        # single-category "blocks" (e.g. B10) duplicate their category; only ranged blocks count
        self.blocks = {
            c: _strip_range(cm.get_description(c)) for c in codes if cm.is_block(c) and "-" in c
        }
        self.categories = {c: cm.get_description(c) for c in codes if cm.is_category(c)}
        self.chapter_of: dict[str, str] = {}
        self.block_of: dict[str, str] = {}
        for code in list(self.blocks) + list(self.categories):
            ancestors = cm.get_ancestors(code)
            self.chapter_of[code] = ancestors[-1] if ancestors else code
            self.block_of[code] = next((a for a in ancestors if a in self.blocks), "")
        self.blocks_by_chapter: dict[str, list[str]] = {}
        for b in self.blocks:
            self.blocks_by_chapter.setdefault(self.chapter_of[b], []).append(b)
        self.categories_by_block: dict[str, list[str]] = {}
        self.categories_by_chapter: dict[str, list[str]] = {}
        for c in self.categories:
            self.categories_by_block.setdefault(self.block_of[c], []).append(c)
            self.categories_by_chapter.setdefault(self.chapter_of[c], []).append(c)

        eligible = [c for c in codes if cm.is_category(c) or (cm.is_subcategory(c) and len(c) <= 5)]
        counts: dict[str, int] = {}
        for c in eligible:
            d = cm.get_description(c).lower()
            counts[d] = counts.get(d, 0) + 1
        # a description shared by two codes would make the gold answer ambiguous
        self.diagnoses = [
            c
            for c in eligible
            if counts[cm.get_description(c).lower()] == 1
            and len(cm.get_description(c)) <= MAX_DESCRIPTION_CHARS
        ]

    def category(self, code: str) -> str:
        return code.split(".")[0]

    def chapter(self, code: str) -> str:
        return self.chapter_of[self.category(code)]

    def block(self, code: str) -> str:
        return self.block_of[self.category(code)]

    def question(self, code: str, rng: random.Random, gold_pos: int) -> dict[str, Any]:
        """One question about diagnosis `code` with the gold option at `gold_pos`.

        The kind (chapter, block or category) is drawn with `rng`; a kind without three usable
        distractors falls back to the chapter question, which always has them.
        """
        kinds = ["chapter"] + (["block"] if self.block(code) else [])
        kinds += ["category"] if "." in code else []
        kind = rng.choice(kinds)
        made = self._options(code, kind, rng)
        if made is None:
            kind = "chapter"
            made = self._options(code, kind, rng)
        if made is None:  # 22 chapters leave 21 distractor candidates
            raise MolfError(f"med-icd10: cannot build a question for {code}")
        question, gold, distractors = made
        options = list(distractors)
        options.insert(gold_pos, gold)
        return {
            "id": f"icd10:{code}:{kind}",
            "question": question,
            "options": options,
            "answer": gold_pos,
            "subject": self.chapters[self.chapter(code)],
            "code": code,
            "kind": kind,
        }

    def _options(
        self, code: str, kind: str, rng: random.Random
    ) -> tuple[str, str, list[str]] | None:
        """(question, gold option, three distractors) of one kind, or None without distractors."""
        desc = self.cm.get_description(code)
        chapter, block, category = self.chapter(code), self.block(code), self.category(code)
        if kind == "chapter":
            gold = self.chapters[chapter]
            others = [t for c, t in sorted(self.chapters.items()) if c != chapter]
            distractors = _pick_distractors(rng, gold, others, [], set())
            question = f'Which ICD-10-CM chapter does the diagnosis "{desc}" belong to?'
        elif kind == "block":
            gold = self.blocks[block]
            # enclosing blocks are also correct, so they may not be distractors
            ancestors = {self.blocks[a] for a in self.cm.get_ancestors(code) if a in self.blocks}
            same = [self.blocks[b] for b in self.blocks_by_chapter[chapter] if b != block]
            rest = [t for b, t in sorted(self.blocks.items()) if b != block]
            distractors = _pick_distractors(rng, gold, same, rest, ancestors)
            question = (
                f'Which ICD-10-CM block (range of categories) contains the diagnosis "{desc}"?'
            )
        else:
            gold = self.categories[category]
            same = [
                self.categories[c] for c in self.categories_by_block.get(block, []) if c != category
            ]
            near = [
                self.categories[c] for c in self.categories_by_chapter[chapter] if c != category
            ]
            distractors = _pick_distractors(rng, gold, same, near, set())
            question = f'Which ICD-10-CM category does the diagnosis "{desc}" fall under?'
        return None if distractors is None else (question, gold, distractors)


def _balanced_positions(n: int, rng: random.Random) -> list[int]:
    """Gold positions with each letter used floor(n/4) or ceil(n/4) times, in seeded order."""
    positions = [i % 4 for i in range(n)]
    rng.shuffle(positions)
    return positions


@functools.lru_cache(maxsize=1)
def _icd10() -> _Icd10:
    """The parsed hierarchy, shared by builds (it is only read)."""
    return _Icd10()


def icd10_records(
    seed: int, n_train: int | None, n_val: int, n_test: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], int]:
    """(train, validation, test) ICD-10-CM records and the pool size; diagnoses split first."""
    icd = _icd10()
    rng = random.Random(f"med-icd10:{seed}")
    by_chapter: dict[str, list[str]] = {}
    for code in icd.diagnoses:
        by_chapter.setdefault(icd.chapter(code), []).append(code)
    queues = [by_chapter[ch] for ch in sorted(by_chapter, key=int)]
    for queue in queues:
        rng.shuffle(queue)
    pool: list[str] = []
    # round robin over chapters: injuries (chapter 19) alone would otherwise be a sixth of it
    while len(pool) < ICD10_POOL_SIZE and any(queues):
        for queue in queues:
            if queue and len(pool) < ICD10_POOL_SIZE:
                pool.append(queue.pop())
    train_codes, val_codes, test_codes = split_three(pool, seed, n_train, n_val, n_test)
    splits = []
    # per-split and per-diagnosis generators: the test questions must not depend on n_train/n_val
    for name, codes in (("train", train_codes), ("val", val_codes), ("test", test_codes)):
        positions = _balanced_positions(len(codes), random.Random(f"med-icd10:{seed}:{name}"))
        splits.append(
            [
                icd.question(code, random.Random(f"med-icd10:{seed}:{code}"), pos)
                for code, pos in zip(codes, positions)
            ]
        )
    return splits[0], splits[1], splits[2], len(pool)


# --------------------------------------------------------------------------- medmcqa


def _raw_answer(value: Any, where: str) -> int | str | None:
    """A `cop` value as an int, a letter 'a'-'d', or None for an unlabelled row."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise MolfError(f"{where}: field 'cop' must be 0-3, 1-4 or a-d, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("a", "b", "c", "d"):
            return text
        if re.fullmatch(r"-?\d+", text):
            value = int(text)
        elif text == "":
            return None
    if isinstance(value, int):
        if value == -1:
            return None
        if 0 <= value <= 4:
            return value
    raise MolfError(f"{where}: field 'cop' must be 0-3, 1-4 or a-d, got {value!r}")


def _medmcqa_records(rows: list[Any], label: str) -> tuple[list[dict[str, Any]], int]:
    """Validated, labelled, de-duplicated MedMCQA records and the `cop` numbering base used."""
    parsed = []
    ints: set[int] = set()
    for i, where, row in objects(rows, label):
        for name in ("question", "opa", "opb", "opc", "opd", "cop"):
            if name not in row:
                raise MolfError(f"{where}: missing field '{name}'")
        for name in ("question", "opa", "opb", "opc", "opd"):
            if row[name] is None:
                raise MolfError(f"{where}: missing field '{name}'")
        cop = _raw_answer(row["cop"], where)
        if cop is None or not str(row["question"]).strip():
            continue
        if isinstance(cop, int):
            ints.add(cop)
        parsed.append((i, row, cop))
    if 0 in ints and 4 in ints:
        raise MolfError(f"{label}: field 'cop' mixes 0-based (0) and 1-based (4) answers")
    base = 1 if 4 in ints else 0
    records = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for i, row, cop in parsed:
        answer = "abcd".index(cop) if isinstance(cop, str) else cop - base
        if not 0 <= answer <= 3:
            raise MolfError(f"{label} record {i}: field 'cop' is {row['cop']!r}, outside 1-4")
        options = [str(row[k]) for k in ("opa", "opb", "opc", "opd")]
        key = _key(str(row["question"]), options)
        if key in seen:
            continue
        seen.add(key)
        records.append(
            {
                "id": str(row.get("id") or f"{label}:{i}"),
                "question": str(row["question"]).strip(),
                "options": options,
                "answer": answer,
                "subject": str(row.get("subject_name") or ""),
            }
        )
    return records, base


def load_medmcqa(path: str) -> tuple[list[dict[str, Any]], int]:
    """Records of a local MedMCQA file and the `cop` base detected (0 or 1)."""
    return _medmcqa_records(read_rows(path), Path(path).name)


class MedTask(TaskBase):
    """Four-way medical multiple choice (see the module docstring)."""

    name = "med"
    headline = "accuracy"
    sources = ("med-icd10", "medmcqa")
    chance_level = 0.25  # four options: what guessing scores

    def build(self, request: TaskRequest) -> TaskSplits:
        """Training examples and held-out MCQ records; no held-out question appears in train."""
        source, seed = request.source, request.seed
        sizes = (request.n_train, request.n_val, request.n_test)
        if source == "med-icd10":
            refuse_data(request, "medmcqa")
            train, val, test, pool = icd10_records(seed, *sizes)
            info: dict[str, Any] = {"source": source, "diagnoses": pool}
        elif source == "medmcqa":
            train, val, test, info = self._medmcqa(request.data or DEFAULT_HUB_ID, seed, *sizes)
        else:
            raise MolfError(f"med: unknown source '{source}' (known: {', '.join(self.sources)})")
        return TaskSplits(
            train=[to_example(r) for r in train], validation=val, test=test, info=info
        )

    def _medmcqa(
        self, spec: str, seed: int, n_train: int | None, n_val: int, n_test: int
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        table = load_table(spec, "medmcqa")
        if table.local and len(table.splits) == 1:
            records, base = _medmcqa_records(table.only(), table.name)
            if not records:
                raise MolfError(f"{table.name}: no labelled MedMCQA rows")
            train, val, test = split_three(records, seed, n_train, n_val, n_test)
            return train, val, test, {"source": "medmcqa", "file": spec, "cop_base": base}

        parsed = {
            name: _medmcqa_records(rows, f"{table.name}[{name}]")
            for name, rows in table.splits.items()
        }
        labelled = {name: recs for name, (recs, _) in parsed.items() if recs}
        if not labelled:
            raise MolfError(f"{spec}: no labelled MedMCQA rows")
        info = {"source": "medmcqa", "file" if table.local else "hub_id": spec}
        if "train" in labelled and "validation" in labelled:
            _, val, test = split_three(labelled["validation"], seed, 0, n_val, n_test)
            held = {_key(r["question"], r["options"]) for r in val + test}
            pool = [r for r in labelled["train"] if _key(r["question"], r["options"]) not in held]
            pool = shuffled(pool, seed)
            train = pool if n_train is None else pool[:n_train]
            return train, val, test, info
        merged: list[dict[str, Any]] = []
        seen: set[tuple[str, tuple[str, ...]]] = set()
        for name in sorted(labelled):
            for r in labelled[name]:
                if _key(r["question"], r["options"]) not in seen:
                    seen.add(_key(r["question"], r["options"]))
                    merged.append(r)
        train, val, test = split_three(merged, seed, n_train, n_val, n_test)
        return train, val, test, info

    def score(
        self,
        model: Any,
        tokenizer: Any,
        records: list[dict[str, Any]],
        batch_size: int,
        items: dict[str, float] | None,
    ) -> dict[str, float]:
        """Accuracy of the option with the highest mean log-probability per token, and of the
        highest summed log-probability (`accuracy_sum`)."""
        scored = option_logprobs(
            model,
            tokenizer,
            [format_prompt(r["question"]) for r in records],
            [[" " + _option(r, k) for k in range(len(r["options"]))] for r in records],
            batch_size,
        )
        gold = [int(r["answer"]) for r in records]
        by_mean = [_argmax([lp / n for lp, n in options]) for options in scored]
        by_sum = [_argmax([lp for lp, _ in options]) for options in scored]
        correct = [float(p == g) for p, g in zip(by_mean, gold)]
        if items is not None:
            items.update({item_id(i): c for i, c in enumerate(correct)})
        return {
            "accuracy": sum(correct) / len(records),
            "accuracy_sum": sum(p == g for p, g in zip(by_sum, gold)) / len(records),
        }


def _argmax(values: list[float]) -> int:
    """Index of the largest value; ties to the lower index (NaN never wins)."""
    best = 0
    for k, v in enumerate(values):
        if v > values[best] or (math.isnan(values[best]) and not math.isnan(v)):
            best = k
    return best


TASK = register_task(MedTask(), embedded="med-icd10", with_data="medmcqa")
