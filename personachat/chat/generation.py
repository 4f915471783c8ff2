"""How to decode: the settings of one generation, and the pieces ``generate`` is given.

``GenerationSettings`` is the typed request (``temperature`` 0 is greedy). ``SeededSampler``
samples with temperature and top-p from one private generator per row seeded with
``settings.seed``, so replies are reproducible and independent of other threads; ``EventStop``
ends the generation once an event is set; ``QueueStreamer`` hands each step's tokens to a queue.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from personachat.interventions import InterventionError


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: ``temperature`` 0 means greedy; ``seed`` makes sampling reproducible."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0  # suppress end-of-sequence before this many tokens

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise InterventionError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InterventionError(
                f"min_new_tokens must be in 0..max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens}"
            )
        if not 0.0 <= self.temperature < float("inf"):
            raise InterventionError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InterventionError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.repetition_penalty < float("inf"):
            raise InterventionError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}"
            )


class EventStop(StoppingCriteria):
    """Stop every row once any of ``events`` is set."""

    def __init__(self, events: Sequence[threading.Event]) -> None:
        self.events = list(events)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        flag = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), flag, dtype=torch.bool, device=input_ids.device)


class SeededSampler(LogitsProcessor):
    """Temperature and top-p sampling with one private generator per row; greedy then picks it."""

    def __init__(self, settings: GenerationSettings, rows: int, device: torch.device) -> None:
        self.temperature = settings.temperature
        self.top_p = settings.top_p
        self.generators = [
            torch.Generator(device=device).manual_seed(settings.seed) for _ in range(rows)
        ]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative - ordered.softmax(dim=-1) > self.top_p  # keep the first token
            logits = logits.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
        probs = logits.softmax(dim=-1)
        picks = torch.stack(
            [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)]
        )
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(1, picks, 0.0)


class QueueStreamer(BaseStreamer):
    """Pushes each step's token ids (all rows) to a queue; the first put (the prompt) is skipped."""

    def __init__(self, sink: queue.Queue[Any]) -> None:
        self.sink = sink
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.sink.put(value.reshape(-1).tolist())

    def end(self) -> None:
        return None
