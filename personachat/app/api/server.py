"""One server for the page and the API: a FastAPI app with the API's routes, the page mounted at
``/`` (its Gradio API under ``/gradio_api``), run by uvicorn in a thread.

    app = build_app(demo, backend, css=CSS, theme=theme(), footer_links=["api"])
    server = serve(app, "127.0.0.1", 7860)   # returns once it listens; raises if it cannot
    server.wait()                            # until Ctrl-C or server.close()
"""

from __future__ import annotations

import threading
import time
from typing import Any

import gradio as gr
import uvicorn
from fastapi import FastAPI

from personachat.app.api.routes import router

START_TIMEOUT_S = 60.0


def build_app(demo: gr.Blocks, backend: Any, **page: Any) -> FastAPI:
    """The API's routes first, then ``demo`` mounted at ``/`` (``page``: ``css``, ``theme``,
    ``footer_links`` and the other ``gr.mount_gradio_app`` settings). Call ``demo.queue()``
    before."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router(backend))
    return gr.mount_gradio_app(app, demo, path="/", **page)


GRACE_S = 2


class Server:
    """A uvicorn server running in a thread of this process."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        # On close, open connections (a page's event stream, a client's keep-alive) get a few
        # seconds, not uvicorn's unbounded wait
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=GRACE_S,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="personachat-server")
        self.url = f"http://{host}:{port}"

    def start(self) -> Server:
        """Start and wait until it listens; raises ``OSError`` when it cannot (a port in use)."""
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive():
                raise OSError(f"cannot serve on {self.url}: is the port in use?")
            if time.monotonic() > deadline:
                self.close()
                raise OSError(f"the server on {self.url} did not start in {START_TIMEOUT_S:g} s")
            time.sleep(0.05)
        return self

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it)."""
        try:
            while self.thread.is_alive():
                self.thread.join(0.5)
        except KeyboardInterrupt:
            self.close()

    def close(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(10)


def serve(app: FastAPI, host: str, port: int) -> Server:
    """Serve ``app`` on ``host:port`` in a thread; returns once it listens."""
    return Server(app, host, port).start()
