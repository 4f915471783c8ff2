"""What every group of page handlers shares: the backend, the default model, the chat format.

The handlers are plain methods, testable without a browser, grouped by what they serve: the
model and store (``model_handlers``), the steering settings (``setting_handlers``), the chat
(``chat_handlers``) and the views of the model's inside (``view_handlers``); ``handlers.Handlers``
puts them together. A bad input never raises into Gradio: it shows a warning toast and a status
line, and the page goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from personachat.app.backend import Backend

Messages = list[dict[str, Any]]


def gpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``spaces.GPU(fn)`` on a ZeroGPU Space (the ``spaces`` package is there), else ``fn``."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return fn
    return spaces.GPU(fn)  # type: ignore[no-any-return]


class HandlerBase:
    """A group of page handlers over the shared ``Backend``."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def model_id(self, model_id: str | None) -> str:
        """The model a request names; the app's default model when it names none."""
        return (model_id or self.backend.default_model).strip()
