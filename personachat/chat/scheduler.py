"""Continuous batching: the requests of all sessions as rows of shared batched forwards.

    scheduler = Scheduler(lm)
    engine = ChatEngine(lm, vectors, neuron_sets, scheduler=scheduler)
    for update in engine.stream(messages, settings, steering=...):  # from any number of threads
        ...

A request's prompt runs alone, under its own plan as a lone ``generate`` would run it, in the
reader's own thread when it first asks for an update (so its first token does not wait for the
batch's step in flight, and the next step waits for it: prompts first); its KV cache then
joins the batch's (``personachat.chat.kvcache``) at the next step. One worker thread owns the
batch: each loop it admits the prefilled requests, then runs ONE decode step for every row of
every request. In that step each row gets its own
interventions: the plans' effects at generated tokens are stacked into one op per layer
(``personachat.interventions.shared``), and a request's extra handlers act on its rows alone
(``personachat.hooks.RowMap``). A request leaves the batch as soon as it is done (all its rows
ended, max tokens reached, or its stop event or reader asked it to stop); an error in its own
handlers fails it alone. Side by side and sweeps are one request of several rows, which stay
together until the request ends (an ended row is fed padding, as ``generate`` does).

Greedy replies equal those of the same request run alone. Sampling uses the request's own
seeded generators (one per row), so a reply does not depend on who else is in the batch.

Models whose cache cannot be joined row by row (sliding-window or hybrid caches) run their
requests one at a time through ``generate`` instead; a log line says so.

The worker lives only while there is work: it ends once the batch and the queue are empty, and
the next request starts a new one. It is not a daemon thread, so at interpreter exit it finishes
the requests it holds (each ends within its ``max_new_tokens``) instead of dying inside torch.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import threading
import time
from collections.abc import Generator
from contextlib import ExitStack

import torch

from personachat.chat.job import Job, run_generate
from personachat.chat.kvcache import BatchCache, unmergeable
from personachat.chat.replies import stream_updates
from personachat.chat.running import Running
from personachat.chat.updates import ChatUpdate
from personachat.hooks import ALL_ROWS, RowMap, attached, shared_rows
from personachat.interventions.shared import SharedPlan
from personachat.model import LoadedModel

log = logging.getLogger(__name__)


class Scheduler:
    """Runs the chat requests on one loaded model as rows of shared batches (see the module).

    ``max_rows`` caps the rows decoded together; later requests wait for rows to free up.
    """

    def __init__(self, lm: LoadedModel, *, max_rows: int = 64) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.lm = lm
        self.max_rows = max_rows
        self._device = lm.device
        self.one_at_a_time = unmergeable(lm.model)
        if self.one_at_a_time is not None:
            log.warning(
                "scheduler: %s runs one request at a time (no shared batches): %s",
                lm.info.model_id,
                self.one_at_a_time,
            )
        params = inspect.signature(lm.model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self._lock = threading.Lock()
        self._prefilling = 0  # prompts running in their readers' threads
        self._prefilled = threading.Condition(self._lock)
        self._step_seconds = 0.0  # how long the last decode step took
        self._inbox: list[Running] = []
        self._worker: threading.Thread | None = None
        self._batch: list[Running] = []  # in row order
        self._cache = BatchCache()
        self._shared: SharedPlan | None = None
        self._shared_rows: list[tuple[Running, int]] = []  # (request, its row) per batch row
        self._shared_hooks = ExitStack()
        self._owners: dict[object, slice] = {}
        self._dirty = False

    def submit(
        self, job: Job, stop: threading.Event | None = None
    ) -> Generator[ChatUpdate, None, None]:
        """The updates of ``job`` (prepared by ``ChatEngine``), as ``ChatEngine.stream`` gives
        them; the request joins the batch when this iterator is first advanced."""
        running = Running(job, stop)

        def release() -> None:
            # A stream finalized by the garbage collector inside the worker must not wait on
            # the worker: the halt it set is enough, the worker lets the request go next step.
            if threading.current_thread() is not self._worker:
                running.released.wait()

        return stream_updates(
            self.lm.tokenizer,
            job,
            running.sink,
            stop,
            running.halt,
            lambda: self._enqueue(running),
            release,
        )

    # ------------------------------------------------------------------ the worker

    def _enqueue(self, running: Running) -> None:
        """Start a request, in its reader's thread: run its prompt alone (in a context of its
        own, while the worker goes on with the batch), send its first tokens, and queue it to
        join the batch (or finish it there, if that was all)."""
        if running.asked_to_stop:  # stopped before its prompt ran: nothing to run
            running.finish()
            return
        if self.one_at_a_time is None:
            running.prepare(self.lm)
            with self._lock:
                self._prefilling += 1
            try:
                contextvars.Context().run(running.prefill, self.lm, self._logits_to_keep)
            finally:
                with self._lock:
                    self._prefilling -= 1
                    self._prefilled.notify_all()
            if running.done:
                running.finish()
                return
        with self._lock:
            self._inbox.append(running)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="personachat-scheduler")
                self._worker.start()

    def _take(self) -> list[Running] | None:
        """The requests that fit in the batch now; None when there is nothing left to do (the
        worker then ends, and the next request starts a new one)."""
        with self._lock:
            if not self._inbox and not self._batch:
                self._worker = None
                return None
            taken: list[Running] = []
            rows = self._cache.rows
            while self._inbox and (not rows or rows + self._inbox[0].rows <= self.max_rows):
                running = self._inbox.pop(0)
                rows += running.rows
                taken.append(running)
            return taken

    def _work(self) -> None:
        try:
            with torch.no_grad():
                while (arrivals := self._take()) is not None:
                    for running in arrivals:
                        self._admit(running)
                    if self._batch:
                        self._yield_to_prompts()
                        start = time.perf_counter()
                        self._step()
                        self._step_seconds = time.perf_counter() - start
        except BaseException as err:  # a bug in the loop itself: fail everyone, leave clean
            log.exception("scheduler: the batch loop failed; failing its requests")
            self._fail_batch(err)
            with self._lock:
                waiting, self._inbox = self._inbox, []
                self._worker = None
            for running in waiting:
                running.finish(err)

    def _yield_to_prompts(self) -> None:
        """Prompts first: while some run, the next step waits (up to two steps' time), so a
        new request's first token does not share the machine with the batch."""
        with self._lock:
            self._prefilled.wait_for(lambda: self._prefilling == 0, 2 * self._step_seconds)

    def _admit(self, running: Running) -> None:
        """Add a prefilled request's rows to the batch (or finish it, if asked to stop)."""
        if self.one_at_a_time is not None:
            if not running.halt.is_set():  # else its reader left before it started
                events = [running.halt] + ([running.stop] if running.stop is not None else [])
                run_generate(self.lm, running.job, running.sink, events)
            running.released.set()
            return
        if running.done or running.cache is None:
            running.finish()
            return
        self._cache.add(running.cache, torch.ones_like(running.job.input_ids))
        running.cache = None
        self._batch.append(running)
        self._dirty = True

    def _step(self) -> None:
        """One decode step of every row; then send each request its tokens, let the done go."""
        if self._dirty:
            self._rebuild()
        cache = self._cache.cache
        device = self._device
        ids = torch.tensor([t for r in self._batch for t in r.last], device=device)[:, None]
        positions = [r.position for r in self._batch for _ in range(r.rows)]
        rows = RowMap(self._owners)
        try:
            mask = self._cache.grow()
            with shared_rows(rows):
                out = self.lm.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=torch.tensor(positions, device=device)[:, None],
                    cache=cache,
                    use_cache=True,
                    **({"logits_to_keep": 1} if self._logits_to_keep else {}),
                )
        except Exception as err:  # the shared forward failed: its rows fail
            self._fail_batch(err)
            return
        picks = self._pick(out.logits[:, -1].to(copy=True, dtype=torch.float32), rows)
        failed: dict[int, BaseException] = {}
        start = 0
        for i, running in enumerate(self._batch):
            stop = start + running.rows
            if running.token in rows.errors:
                failed[i] = rows.errors[running.token]
            else:
                running.advance(picks[start:stop])
            start = stop
        self._leave(failed)

    def _pick(self, scores: torch.Tensor, rows: RowMap) -> list[int]:
        """Each row's next token from a step's float32 logits: requests with logits processors
        run them on their rows; end-of-sequence floors go in one op for all rows."""
        floor_rows: list[int] = []
        floor_ids: list[int] = []
        start = 0
        for running in self._batch:
            stop = start + running.rows
            if running.floored:
                for row in range(start, stop):
                    floor_rows.extend([row] * len(running.floor_ids))
                    floor_ids.extend(running.floor_ids)
            if running.processors is not None and running.token not in rows.errors:
                scores[start:stop] = running.process(scores[start:stop])
            start = stop
        if floor_rows:
            at = scores.device
            cells = (torch.tensor(floor_rows, device=at), torch.tensor(floor_ids, device=at))
            scores[cells] = float("-inf")
        picks: list[int] = scores.argmax(dim=-1).tolist()
        return picks

    def _leave(self, failed: dict[int, BaseException]) -> None:
        """Let the requests that are done (or failed) go; the others keep their rows."""
        leaves = [i in failed or r.done for i, r in enumerate(self._batch)]  # read once
        if not any(leaves):
            return
        self._collect_readout()
        gone = [i for i, leave in enumerate(leaves) if leave]
        leaving = [self._batch[i] for i in gone]
        kept = [r for r, leave in zip(self._batch, leaves, strict=True) if not leave]
        index: list[int] = []
        start = 0
        for running, leave in zip(self._batch, leaves, strict=True):
            if not leave:
                index.extend(range(start, start + running.rows))
            start += running.rows
        self._batch = kept
        self._cache.keep(index)
        self._dirty = True
        if not kept:
            self._rebuild()  # nothing shared stays attached once the batch is empty
        for i, running in zip(gone, leaving, strict=True):
            running.finish(failed.get(i))

    def _rebuild(self) -> None:
        """Stack the effects of the batch's rows anew, and map each request to its rows."""
        self._collect_readout()
        self._shared_hooks.close()
        self._shared_hooks = ExitStack()
        effects = [e for r in self._batch for e in r.effects]
        self._shared = SharedPlan(effects) if effects else None
        self._shared_rows = [(r, row) for r in self._batch for row in range(r.rows)]
        self._owners = {}
        if self._shared is not None and self._shared.handlers:
            handlers = self._shared.handlers
            token = self._shared_hooks.enter_context(attached(self.lm.sites, handlers, first=True))
            self._owners[token] = ALL_ROWS
        start = 0
        for running in self._batch:
            if running.token is not None:
                self._owners[running.token] = slice(start, start + running.rows)
            start += running.rows
        self._dirty = False

    def _collect_readout(self) -> None:
        """Hand each row the projections the shared readout kept since the last time."""
        if self._shared is None or self._shared.readout is None:
            return
        parts = self._shared.readout.take()
        by_request: dict[int, list[torch.Tensor | None]] = {}
        owners: dict[int, Running] = {}
        for (running, row), part in zip(self._shared_rows, parts, strict=True):
            owners[id(running)] = running
            by_request.setdefault(id(running), [None] * running.rows)[row] = part
        for key, rows in by_request.items():
            owners[key].add_readout(rows)

    def _fail_batch(self, error: BaseException) -> None:
        """Fail every request in the batch with ``error``; detach everything shared."""
        batch, self._batch = self._batch, []
        self._cache.clear()
        self._shared = None
        self._shared_rows = []
        self._owners = {}
        self._shared_hooks.close()
        for running in batch:
            running.finish(error)
