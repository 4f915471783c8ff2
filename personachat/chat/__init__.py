"""Chat: streaming generation under live interventions, for one request or a batch.

``generation`` (decoding settings, seeded sampling, streaming) and ``updates`` (what a reply
reports) -> ``job`` (a request checked and built; its run through ``generate``) and ``replies``
(tokens from a queue into updates) -> ``kvcache`` (a batch cache whose rows join and leave) and
``running`` (one request's rows in a shared batch) -> ``scheduler`` (``Scheduler``: the requests
of all sessions as rows of shared batched forwards) -> ``engine`` (``ChatEngine``: one request
per call, any number of sessions, alone or through a scheduler); ``batch`` gives greedy replies
to many conversations at once.
"""

from __future__ import annotations

from personachat.chat.batch import batch_replies
from personachat.chat.engine import ChatEngine
from personachat.chat.generation import GenerationSettings
from personachat.chat.scheduler import Scheduler
from personachat.chat.updates import ChatUpdate, ReplyReadout

__all__ = [
    "ChatEngine",
    "ChatUpdate",
    "GenerationSettings",
    "ReplyReadout",
    "Scheduler",
    "batch_replies",
]
