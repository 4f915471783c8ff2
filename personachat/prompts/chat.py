"""Chat messages as plain data, and the plain-text fallback for tokenizers without a template.

Rendering goes through ``personachat.prompts.render`` (the tokenizer's chat template). A
tokenizer without one gets this plain-text fallback, documented here and in the README::

    System: {system prompt}

    User: {message}

    Assistant: {reply}

Turns are separated by a blank line; with ``add_generation_prompt`` the text ends in
``"Assistant:"``, and generation continues after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, Any]

FALLBACK_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def message_text(message: Message) -> str:
    """The text of a message whose content is a string or a list of content parts (Gradio 6)."""
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    parts = []
    for part in content or []:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text":
            parts.append(str(part.get("text", "")))
    return "".join(parts)


def plain_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Messages with string content and only the keys chat templates use."""
    return [{"role": str(m["role"]), "content": message_text(m)} for m in messages]


def fallback_chat(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    turns = [
        f"{FALLBACK_ROLES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages
    ]
    if add_generation_prompt:
        turns.append("Assistant:")
    return "\n\n".join(turns)


def persona_messages(system_prompt: str | None, question: str) -> list[Message]:
    """A one-question conversation under a persona's system prompt (none for the default)."""
    messages: list[Message] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": question})
    return messages
