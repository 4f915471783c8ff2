"""Chat: streaming generation under live interventions, for one request or a batch.

``generation`` (decoding settings, seeded sampling, streaming) and ``updates`` (what a reply
reports) -> ``engine`` (``ChatEngine``: one request at a time per call, any number of sessions);
``batch`` gives greedy replies to many conversations at once.
"""

from __future__ import annotations

from personachat.chat.batch import batch_replies
from personachat.chat.engine import ChatEngine
from personachat.chat.generation import GenerationSettings
from personachat.chat.updates import ChatUpdate, ReplyReadout

__all__ = [
    "ChatEngine",
    "ChatUpdate",
    "GenerationSettings",
    "ReplyReadout",
    "batch_replies",
]
