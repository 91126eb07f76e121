"""The planted task: a synthetic teacher-student task with a per-module ground truth.

`molf planted` (`molf.experiments.planted`) makes a teacher from a base model by adding a change
to every targeted linear layer, full-rank in some module types and low-rank in others, and writes
a dataset folder: prompts with the teacher's continuations to train on, held-out prompts with the
teacher's next-token choice at every position of its continuation, and `planted.json` (the base
model, the change per module, the settings). A student that starts from the same base model
learns the teacher's behaviour; the score is **agreement**, the share of the held-out
continuation's positions where the student's most likely next token is the teacher's. The base
model's agreement is the floor.

A rank-r adapter cannot express a full-rank change of a layer, and a low-rank change is exactly
what it expresses, so the task can separate full fine-tuning from LoRA in a chosen direction and
tells which expert each module "should" use (`planted.json`'s `modules`). It is synthetic: it
says what routing does where the answer is known, not how a real task behaves.

    molf planted --model smollm2-135m --change full --output-dir data/planted-full
    molf train fft --task planted --data data/planted-full
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from molf.errors import MolfError
from molf.tasks.base import TaskBase, TaskRequest, item_id, register_task
from molf.tasks.common import TaskSplits, _model_device, batch_starts, padded_batch
from molf.tasks.encoding import IGNORE, Example
from molf.tasks.rows import read_json, read_rows

__all__ = ["MARKER", "PlantedTask", "is_planted_dir", "read_planted"]

MARKER = "planted.json"
_SPLITS = ("train", "validation", "test")


def is_planted_dir(path: str | Path) -> bool:
    """Whether `path` is a folder `molf planted` wrote (it holds planted.json)."""
    return (Path(path).expanduser() / MARKER).is_file()


def read_planted(path: str | Path) -> dict[str, Any]:
    """planted.json of a planted dataset folder: the base model, settings and the change per
    module (`modules`: {module name: "full" | "low" | "none"})."""
    folder = Path(path).expanduser()
    if not is_planted_dir(folder):
        raise MolfError(
            f"planted: {folder} is not a planted dataset folder (no {MARKER}; make one with molf planted)"
        )
    return read_json(folder / MARKER)


def _record(row: dict[str, Any], where: str) -> dict[str, Any]:
    ids, n_prompt, target = row.get("ids"), row.get("n_prompt"), row.get("target")
    if not isinstance(ids, list) or not isinstance(n_prompt, int) or not isinstance(target, list):
        raise MolfError(f"{where}: needs 'ids', 'n_prompt' and 'target'")
    if len(target) != len(ids) - n_prompt or n_prompt < 1 or not target:
        raise MolfError(f"{where}: 'target' must hold one token per continuation position")
    return {"ids": ids, "n_prompt": n_prompt, "target": target}


class PlantedTask(TaskBase):
    """Agreement with a planted teacher (see the module docstring)."""

    name = "planted"
    headline = "agreement"
    sources = ("planted",)

    def build(self, request: TaskRequest) -> TaskSplits:
        """The folder's training examples (first `n_train`) and held-out records (first `n_val`
        / `n_test`): the folder fixes its splits, so the seed only varies the training."""
        if not request.data:
            raise MolfError("planted needs a data path: a folder made by molf planted (--data)")
        folder = Path(request.data).expanduser()
        spec = read_planted(folder)
        rows = {}
        for split in _SPLITS:
            path = folder / f"{split}.jsonl"
            if not path.is_file():
                raise MolfError(
                    f"planted: {path} is missing (make the folder again with molf planted)"
                )
            rows[split] = read_rows(path)
        train = [
            Example(
                prompt=r["prompt"], completion=r["completion"], origin=f"train.jsonl row {i + 1}"
            )
            for i, r in enumerate(rows["train"][: request.n_train])
        ]
        held = {
            s: [_record(r, f"{s}.jsonl row {i + 1}") for i, r in enumerate(rows[s])]
            for s in ("validation", "test")
        }
        val = held["validation"][: request.n_val]
        test = held["test"][: request.n_test]
        info = {"source": "planted", "change": spec.get("change"), "base_model": spec.get("model")}
        return TaskSplits(train=train, validation=val, test=test, info=info)

    @torch.no_grad()
    def score(
        self,
        model: Any,
        tokenizer: Any,
        records: list[dict[str, Any]],
        batch_size: int,
        items: dict[str, float] | None,
    ) -> dict[str, float]:
        """Agreement: per record, the share of continuation positions where the model's most
        likely next token is the teacher's; the headline is its mean over records."""
        device = _model_device(model)
        per_record: list[float] = []
        for start in batch_starts(len(records), batch_size):
            part = records[start : start + batch_size]
            # labels carry the teacher's choice at each position whose next token it predicts
            labels = []
            for r in part:
                row = [IGNORE] * len(r["ids"])
                for k, tok in enumerate(r["target"]):
                    row[r["n_prompt"] - 1 + k] = tok
                labels.append(row)
            batch = padded_batch([r["ids"] for r in part], labels, tokenizer.pad_token_id)
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits
            guess = logits.argmax(dim=-1).cpu()
            want = batch["labels"]
            counted = want != IGNORE
            hits = ((guess == want) & counted).sum(dim=1).double()
            per_record += (hits / counted.sum(dim=1).double()).tolist()
        if items is not None:
            for i, value in enumerate(per_record):
                items[item_id(i)] = value
        return {"agreement": sum(per_record) / len(per_record)}


TASK = register_task(PlantedTask(), with_data="planted")
