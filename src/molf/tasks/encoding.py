"""What a training example is, and what it becomes once tokenized: the types that the example
builders (`molf.tasks.common`) and the chat encoder (`molf.tasks.chat`) both use."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IGNORE", "Encoded", "Example"]

IGNORE = -100  # the label of a token the loss skips (torch's cross-entropy ignore_index)


@dataclass
class Example:
    """One supervised example.

    Text: the loss is taken on `completion` tokens only (an empty `prompt` makes it plain language
    modelling). Chat (`messages` set, the texts unused): a list of `{role, content}` rendered with
    the tokenizer's chat template, the loss on the assistant turns only. `origin` names the
    example in error messages (e.g. 'chat.jsonl row 17')."""

    prompt: str = ""
    completion: str = ""
    messages: list[dict[str, str]] | None = None
    origin: str = ""


@dataclass
class Encoded:
    """An example's token ids and labels (IGNORE where the loss skips a token).

    `n_prompt` counts the prompt tokens at the front of a text example, which truncation trims
    from the left; chat examples (None) are trimmed from the end."""

    input_ids: list[int]
    labels: list[int]
    n_prompt: int | None = None
