"""Chat: streaming generation under live interventions, for one request or a batch."""

from __future__ import annotations

from personachat.chat.engine import (
    ChatEngine,
    ChatUpdate,
    GenerationSettings,
    ReplyReadout,
    batch_replies,
)

__all__ = [
    "ChatEngine",
    "ChatUpdate",
    "GenerationSettings",
    "ReplyReadout",
    "batch_replies",
]
