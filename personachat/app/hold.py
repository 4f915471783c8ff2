"""A test aid: hold one reply after its first tokens until Stop arrives.

A browser test of Stop must click while a reply is being written; a fast model can finish any
reply before the click lands. With ``PERSONACHAT_HOLD_MESSAGE`` set, a reply to exactly that
message waits inside the model's forward pass, after ``after`` tokens, until the session's stop
event is set (or ``timeout`` seconds pass), so the click always finds it generating. Unset, the
app never builds a ``Hold``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

HOLD_ENV = "PERSONACHAT_HOLD_MESSAGE"
HOLD_TIMEOUT_S = 120.0


class Hold:
    """A hook handler at layer 0's residual stream that blocks its ``after + 1``-th forward (the
    prefill is the first) until ``stop`` is set; it changes no number."""

    def __init__(self, stop: threading.Event, after: int = 3, timeout: float = HOLD_TIMEOUT_S):
        self.stop, self.after, self.timeout = stop, after, timeout
        self.calls = 0

    def wants(self) -> Iterable[tuple[Any, int]]:
        return [("residual", 0)]

    def __call__(self, site: Any, layer: int, x: Any) -> None:
        self.calls += 1
        if self.calls == self.after + 1:
            self.stop.wait(self.timeout)
        return None
