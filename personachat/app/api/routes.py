"""The API's routes: ``POST /v1/chat/completions`` and ``GET /v1/models``, over the backend.

Each request is read and checked (``schema``), started on the model's chat engine (``mapping``:
the same engines, and so the same shared scheduler, as the page's) and answered whole or as
server-sent events (``replies``). A refused request gets its ``ApiError`` as OpenAI's error
object; anything else that fails answers 500 with the error named, and the server goes on.
Generation runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from personachat.app.api import mapping, replies
from personachat.app.api.fields import ApiError
from personachat.app.api.schema import parse_request
from personachat.app.serving import on_zero_gpu

log = logging.getLogger(__name__)


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
                    replies.events(chat, call),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            return JSONResponse(await run_in_threadpool(replies.completion, chat, call))
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except Exception as err:  # a bug or a failed generation: answer, and keep serving
            log.exception("chat completion failed")
            message = f"the reply failed: {type(err).__name__}: {backend.access.scrub(str(err))}"
            failure = ApiError(message, None, "failed", 500)
            return JSONResponse(failure.body(), status_code=500)

    return api


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(f"the body is not valid JSON: {err}", None, "invalid_json") from None
