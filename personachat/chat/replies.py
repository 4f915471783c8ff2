"""The consumer side of a reply: tokens from a worker's queue turned into ``ChatUpdate``s.

Whoever generates (a ``generate`` thread per request, or the scheduler's shared batch) puts each
step's tokens (one per row) on the request's queue, then ``Failed`` on an error, then ``END``.
``stream_updates`` reads them into the reply of each row (a row stops at its end-of-sequence
token), yields the reply so far after each step and a final update with the readout, and on
exit (finished, failed, or closed by the reader) sets ``halt`` and waits for the worker's
``release``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Sequence
from typing import Any

from personachat.chat.job import END, Failed, Job
from personachat.chat.updates import ChatUpdate, ReplyReadout, row_readout


def stream_updates(
    tokenizer: Any,
    job: Job,
    sink: queue.Queue[Any],
    stop: threading.Event | None,
    halt: threading.Event,
    start: Callable[[], object],
    release: Callable[[], object],
) -> Generator[ChatUpdate, None, None]:
    """``ChatUpdate``s of ``job`` from ``sink``; ``start`` begins the work, ``release`` waits
    for its end (after ``halt`` is set, whatever ended the stream)."""
    rows = job.rows
    replies: list[list[int]] = [[] for _ in range(rows)]
    job.replies = replies
    finished = [False] * rows
    failure: BaseException | None = None
    start()
    try:
        while True:
            item = sink.get()
            if item is END:
                break
            if isinstance(item, Failed):
                failure = item.error
                continue
            for row, token in enumerate(item):
                if not finished[row]:
                    replies[row].append(int(token))
                    finished[row] = int(token) in job.eos
            yield partial_update(tokenizer, job, replies)
        if failure is not None:
            raise failure
        job.stopped = stop is not None and stop.is_set()
        yield final_update(tokenizer, job, replies, job.stopped)
    finally:
        halt.set()
        release()


def decode(tokenizer: Any, tokens: Sequence[int], partial: bool) -> str:
    text = str(tokenizer.decode(list(tokens), skip_special_tokens=True))
    if partial:
        text = text.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for the rest
    return text


def partial_update(
    tokenizer: Any, job: Job, replies: list[list[int]], partial: bool = True
) -> ChatUpdate:
    """The reply so far: the last row (steered), and row 0 as the baseline side by side."""
    steered = replies[-1]
    base = replies[0] if job.side_by_side else None
    return ChatUpdate(
        text=decode(tokenizer, steered, partial),
        tokens=tuple(steered),
        baseline_text=None if base is None else decode(tokenizer, base, partial),
        baseline_tokens=None if base is None else tuple(base),
    )


def final_update(
    tokenizer: Any, job: Job, replies: list[list[int]], stopped: bool, row: int | None = None
) -> ChatUpdate:
    """The last update: of the steered row and the baseline, or of one ``row`` alone."""
    if row is not None:
        replies = [replies[row]]
    update = partial_update(tokenizer, job, replies, partial=False)
    readouts: list[ReplyReadout | None] = [None] * len(replies)
    if job.plan.readout is not None:
        if job.readout_result is None:
            job.readout_result = job.plan.readout.result()
        prompt = job.input_ids[0].tolist()
        rows = [row] if row is not None else list(range(len(replies)))
        for i, r in enumerate(rows):
            readouts[i] = row_readout(job.plan, job.readout_result, r, prompt, replies[i])
    side = job.side_by_side and row is None
    return ChatUpdate(
        text=update.text,
        tokens=update.tokens,
        baseline_text=update.baseline_text if side else None,
        baseline_tokens=update.baseline_tokens if side else None,
        done=True,
        stopped=stopped,
        readout=readouts[-1],
        baseline_readout=readouts[0] if side else None,
        interference=job.plan.interference,
        steered_layers=dict(job.plan.steered_layers),
        warnings=tuple(job.plan.warnings),
    )
