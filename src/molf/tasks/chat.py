"""Conversations: checking them, and turning them into token ids whose labels keep only the
assistant turns.

A conversation is rendered with the tokenizer's own chat template (the one the model was tuned
with), so training sees exactly what generation will. Which tokens belong to an assistant turn is
found by rendering prefixes: the conversation up to turn i with the generation prompt ends where
the assistant's reply starts, and the conversation through turn i ends where it stops (its
end-of-turn token included, so the model learns to stop). Both must be token prefixes of the
whole rendering; a template that rewrites earlier turns depending on later ones fails that check
with a MolfError instead of training on the wrong tokens. This works for any template, where
`return_assistant_tokens_mask` needs one with `{% generation %}` markers (SmolLM2's has none).
"""

from __future__ import annotations

import json
from typing import Any

from molf.errors import MolfError, one_line
from molf.tasks.encoding import IGNORE, Encoded

__all__ = ["check_messages", "chat_tokens", "chat_prompt"]


def check_messages(value: Any, where: str) -> list[dict[str, str]]:
    """A conversation as a list of `{role, content}` strings, or a MolfError naming the problem.

    A string is parsed as JSON first (a CSV cell holds the list as text). The conversation needs
    an assistant turn to learn from, and something before its first one to condition on."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise MolfError(f"{where}: messages are text but not a JSON list") from None
    if not isinstance(value, list) or not value:
        raise MolfError(f"{where}: messages must be a non-empty list of {{role, content}}")
    out = []
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            raise MolfError(f"{where}: message {k} is a {type(message).__name__}, not an object")
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            found = ", ".join(sorted(message)) or "none"
            raise MolfError(
                f"{where}: message {k} has no '{missing[0]}' (keys found: {found}); "
                "expected role and content"
            )
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            raise MolfError(f"{where}: message {k}: role and content must be strings")
        out.append({"role": role, "content": content})
    roles = [m["role"] for m in out]
    if "assistant" not in roles:
        raise MolfError(
            f"{where}: the conversation has no assistant turn (roles: {', '.join(roles)})"
        )
    if roles[0] == "assistant":
        raise MolfError(
            f"{where}: the conversation starts with an assistant turn; "
            "put a system or user message before it"
        )
    return out


def _render(
    tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, where: str
) -> list[int]:
    """The token ids of `messages` rendered with the chat template."""
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja's TemplateError from raise_exception(...), or a ValueError
        raise MolfError(
            f"{where}: the chat template rejects this conversation ({one_line(e)})"
        ) from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_template(tokenizer: Any, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise MolfError(
            f"{where}: the tokenizer has no chat template; conversations need one "
            "(or give prompt/completion rows)"
        )


def chat_tokens(tokenizer: Any, messages: list[dict[str, str]], where: str) -> Encoded:
    """Token ids of a conversation in the tokenizer's chat template; labels IGNORE outside the
    assistant turns."""
    _check_template(tokenizer, where)
    ids = _render(tokenizer, messages, False, where)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where)
        through = _render(tokenizer, messages[: i + 1], False, where)
        start, end = len(before), len(through)
        if ids[:start] != before or ids[:end] != through or end <= start:
            raise MolfError(
                f"{where}: the chat template does not render turn {i} as a prefix of the "
                "whole conversation, so its assistant tokens cannot be located"
            )
        labels[start:end] = ids[start:end]
    return Encoded(ids, labels, None)


def chat_prompt(
    tokenizer: Any, messages: list[dict[str, str]], where: str
) -> tuple[list[int], str]:
    """What generation is scored on: the ids of the conversation before its last assistant turn
    (with the template's generation prompt), and that turn's content as the reference."""
    _check_template(tokenizer, where)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return _render(tokenizer, messages[:last], True, where), messages[last]["content"]
