"""Persona prompts: chat rendering, persona datasets and the demo model's corpus."""

from __future__ import annotations

from personachat.prompts.builtins import builtin_names, load_builtin, load_dataset
from personachat.prompts.chat import (
    Message,
    fallback_chat,
    message_text,
    persona_messages,
    plain_messages,
)
from personachat.prompts.datasets import (
    ContrastPair,
    DatasetError,
    PersonaDataset,
    from_json,
    load_dataset_file,
)
from personachat.prompts.render import (
    PromptSpans,
    RenderConditions,
    SystemMode,
    chat_spans,
    conditions,
    encode_text,
    format_chat,
    prompt_spans,
)

__all__ = [
    "ContrastPair",
    "DatasetError",
    "Message",
    "PersonaDataset",
    "PromptSpans",
    "RenderConditions",
    "SystemMode",
    "builtin_names",
    "chat_spans",
    "conditions",
    "encode_text",
    "fallback_chat",
    "format_chat",
    "from_json",
    "load_builtin",
    "load_dataset",
    "load_dataset_file",
    "message_text",
    "persona_messages",
    "plain_messages",
    "prompt_spans",
]
