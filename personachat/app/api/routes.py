"""The API's routes: ``POST /v1/chat/completions`` and ``GET /v1/models``, over the backend.

Each request is read and checked (``schema``), started on the model's chat engine (``mapping``:
the same engines, and so the same shared scheduler, as the page's) and answered whole or as
server-sent events (``replies``). A refused request gets its ``ApiError`` as OpenAI's error
object; anything else that fails answers 500 with the error named, and the server goes on.
Generation runs in worker threads, never on the event loop. A client that goes away stops its
request, also while it waits for a generation slot: a stream's end sets the request's stop, and
a whole reply's request is watched for the disconnect while it runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from personachat.app.api import mapping, replies
from personachat.app.api.fields import ApiError
from personachat.app.api.schema import parse_request
from personachat.app.serving import on_zero_gpu

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.25  # how often a whole reply's request is checked for a gone client


def router(backend: Any) -> APIRouter:
    """The API's routes over ``backend``."""
    api = APIRouter()

    @api.get("/v1/models")
    def models() -> dict[str, Any]:
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "personachat"}
            for name in mapping.served_models(backend)
        ]
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        try:
            if on_zero_gpu():
                raise ApiError(
                    "the OpenAI API is not served on a ZeroGPU Space (the GPU is lent to page "
                    "events only); use the page's /chat endpoint (gradio_client) there",
                    None,
                    "unavailable",
                    503,
                )
            body = await _json(request)
            chat = parse_request(body)
            call = await run_in_threadpool(mapping.prepare, backend, chat)
            if chat.stream:
                return StreamingResponse(
                    _stream(chat, call),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            return JSONResponse(await _whole(request, chat, call))
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except Exception as err:  # a bug or a failed generation: answer, and keep serving
            log.exception("chat completion failed")
            message = f"the reply failed: {type(err).__name__}: {backend.access.scrub(str(err))}"
            failure = ApiError(message, None, "failed", 500)
            return JSONResponse(failure.body(), status_code=500)

    return api


async def _stream(chat: Any, call: mapping.Call) -> AsyncIterator[str]:
    """The reply's events; however the stream ends (the client gone included), the request's
    stop is set, so a reply still waiting for a slot or running ends at once."""
    chunks = replies.events(chat, call)
    try:
        # a cancelled wait leaves the worker thread (the stop set below ends its wait), so a
        # stream whose client left is let go now, not when a slot frees up
        while chunk := await to_thread.run_sync(next, chunks, None, abandon_on_cancel=True):
            yield chunk
    finally:
        call.stop.set()


async def _whole(request: Request, chat: Any, call: mapping.Call) -> dict[str, Any]:
    """The whole reply, its request stopped if the client goes away before it is done."""
    watch = asyncio.create_task(_stop_when_gone(request, call.stop))
    try:
        return await run_in_threadpool(replies.completion, chat, call)
    finally:
        watch.cancel()


async def _stop_when_gone(request: Request, stop: threading.Event) -> None:
    while not stop.is_set():
        if await request.is_disconnected():
            stop.set()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(f"the body is not valid JSON: {err}", None, "invalid_json") from None
