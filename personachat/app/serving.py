"""How the app serves chat replies: which engine each loaded model gets, and how many at once.

``Serving`` builds the chat engine of a model for the ``Catalog``:

- ``engine="hf"`` with the shared batch (the default): every engine over one loaded model shares
  ONE ``personachat.chat.Scheduler``, so all sessions' requests (the page's turns, both rows of
  side by side, the page's prompted column, the OpenAI API's requests) are rows of shared
  batched forwards;
- ``engine="hf"`` one request at a time (``shared_batch=False``, what a ZeroGPU Space gets): each
  request runs its own ``generate`` inside the call that asked for it, so nothing holds the GPU
  between calls (``spaces.GPU`` gives the GPU to one call at a time, in a forked process);
- ``engine="vllm"``: replies come from interp-engine's vLLM backend
  (``personachat.chat.interp``), with ``num_gpus`` for tensor parallelism.

``Gate`` bounds how many chat requests generate at once across the page and the API; later ones
wait for a slot, and a Stop reaches them while they wait. ``on_zero_gpu`` tells whether this
process runs on a ZeroGPU Space.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger(__name__)

ENGINES = ("hf", "vllm")
T = TypeVar("T")


def on_zero_gpu(env: Mapping[str, str] | None = None) -> bool:
    """Whether this is a ZeroGPU Space (``SPACES_ZERO_GPU`` set, as the ``spaces`` package reads
    it): there a call holds the GPU only inside ``spaces.GPU``."""
    env = os.environ if env is None else env
    return env.get("SPACES_ZERO_GPU", "").lower() in {"1", "t", "true"}


class Gate:
    """At most ``limit`` chat requests generate at once; the others wait for a slot, each until
    its stop event is set."""

    poll_s = 0.05  # how often a waiting request looks at its stop event

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the request limit must be at least 1, got {limit}")
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def through(self, items: Iterator[T], stop: threading.Event | None = None) -> Iterator[T]:
        """``items``, taking a slot at the first item and giving it back when they end (or the
        reader leaves). A ``stop`` set while waiting for the slot ends the wait: ``items`` are
        closed unrun, nothing comes, and the slot is never taken."""
        taken = False
        try:
            taken = self._take(stop)
            if taken:
                yield from items
        finally:
            try:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
            finally:
                if taken:
                    self._slots.release()

    def _take(self, stop: threading.Event | None) -> bool:
        """Wait for a slot; False (no slot taken) once ``stop`` is set first."""
        if stop is None:
            return self._slots.acquire()
        while not stop.is_set():
            if self._slots.acquire(timeout=self.poll_s):
                return True
        return False


@dataclass
class Serving:
    """The chat engine per loaded model (see the module) and the bound on requests at once."""

    engine_kind: str = "hf"
    shared_batch: bool = True
    num_gpus: int = 1
    max_requests: int = 8
    gate: Gate = field(init=False)
    _schedulers: dict[str, Any] = field(default_factory=dict, init=False)
    _remote: dict[str, Any] = field(default_factory=dict, init=False)
    loader: Callable[[Any, int], Any] | None = None  # (lm, num_gpus) -> interp-engine model

    def __post_init__(self) -> None:
        if self.engine_kind not in ENGINES:
            raise ValueError(f"unknown engine {self.engine_kind!r}; use one of {ENGINES}")
        if self.num_gpus < 1:
            raise ValueError(f"--num-gpus must be at least 1, got {self.num_gpus}")
        self.gate = Gate(self.max_requests)

    @property
    def path(self) -> str:
        """Which path replies take, in words for the log and the status."""
        if self.engine_kind == "vllm":
            return f"interp-engine's vLLM backend on {self.num_gpus} GPU(s)"
        if self.shared_batch:
            return "the shared batch (one scheduler per model)"
        return "one generate per request (ZeroGPU)"

    def engine(self, model_id: str, lm: Any, vectors: Any, neuron_sets: Any) -> Any:
        """A chat engine over ``lm`` with ``vectors`` and ``neuron_sets``, on this path."""
        if self.engine_kind == "vllm":
            from personachat.chat.interp import InterpChatEngine

            if model_id not in self._remote:
                self._remote[model_id] = self._load_remote(lm)
            return InterpChatEngine(lm, self._remote[model_id], vectors, neuron_sets)
        from personachat.chat import ChatEngine, Scheduler

        scheduler = None
        if self.shared_batch:
            if model_id not in self._schedulers:
                self._schedulers[model_id] = Scheduler(lm)
            scheduler = self._schedulers[model_id]
        return ChatEngine(lm, vectors, neuron_sets, scheduler=scheduler)

    def forget(self, model_id: str) -> None:
        """Drop what was built for ``model_id`` (the model itself was dropped)."""
        self._schedulers.pop(model_id, None)
        self._remote.pop(model_id, None)

    def _load_remote(self, lm: Any) -> Any:
        if self.loader is not None:
            return self.loader(lm, self.num_gpus)
        from personachat.chat.interp import load_vllm

        log.info("loading %s on interp-engine's vLLM backend", lm.info.model_id)
        return load_vllm(lm, self.num_gpus)


def for_environment(
    engine_kind: str = "hf",
    num_gpus: int = 1,
    max_requests: int = 8,
    env: Mapping[str, str] | None = None,
) -> Serving:
    """The serving this process should use: on a ZeroGPU Space one request at a time, each
    inside its own ``spaces.GPU`` call (the vLLM engine is refused there), else the shared
    batch; ``ValueError`` when ``--engine vllm`` cannot run here (no GPU, no vLLM)."""
    zero = on_zero_gpu(env)
    if zero and engine_kind != "hf":
        raise ValueError(
            "--engine vllm cannot run on a ZeroGPU Space (the GPU is lent per call); "
            "use --engine hf there"
        )
    if engine_kind == "vllm":
        from personachat.chat.interp import vllm_problem

        problem = vllm_problem()
        if problem is not None:
            raise ValueError(problem)
    return Serving(engine_kind, not zero, num_gpus, max_requests)
