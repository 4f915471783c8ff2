"""What a visitor may do when the app is hosted in public (``--public``, the default on a Space).

``Access()`` is local use: every model folder or hub name loads, extraction writes to the store,
errors name the server's paths. ``Access(public=True, models=..., admin_token=...)``:

- only the models of the allow-list load (the configured model, plus ``--allow-models``);
- extraction and every other store write need the admin token (``PERSONACHAT_ADMIN_TOKEN``),
  typed in the page's "Admin token" box (shown in public mode only) or sent as an
  ``Authorization: Bearer`` header, compared in constant time; without a token set on the
  server they are off;
- error texts show no server path (``scrub``: each absolute path becomes its last part);
- uploads are capped at ``max_upload_bytes`` (Gradio refuses a larger file, naming the limit).
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Any

ADMIN_ENV = "PERSONACHAT_ADMIN_TOKEN"
MAX_UPLOAD_BYTES = 1_000_000  # public mode's default upload cap
# an absolute path: a slash not preceded by a word character, dot, colon or slash (a URL, 1/2)
_PATH = re.compile(r"(?<![\w.:/~])/(?:[\w.@+-]+/)+([\w.@+-]+)")


class AccessError(ValueError):
    """A public server refuses the action; the message says why and what would allow it."""


@dataclass(frozen=True)
class Access:
    """What visitors may do (see the module); the default is local use, with no limits."""

    public: bool = False
    models: tuple[str, ...] = ()
    admin_token: str | None = None
    max_upload_bytes: int = MAX_UPLOAD_BYTES

    def check_model(self, model_id: str) -> None:
        """Refuse a model outside the allow-list in public mode."""
        if self.public and model_id not in self.models:
            raise AccessError(
                f"model {self.scrub(model_id)!r} is not offered on this public server; "
                f"use one of: {', '.join(self.models)} (the server's --allow-models)"
            )

    def check_admin(self, token: str | None, what: str) -> None:
        """Refuse ``what`` (a store write) in public mode without the right admin token."""
        if not self.public:
            return
        if not self.admin_token:
            raise AccessError(
                f"{what} is off on this public server: it writes to the store. The server's "
                f"owner can turn it on by setting {ADMIN_ENV}."
            )
        given = (token or "").strip().encode()
        if not hmac.compare_digest(given, self.admin_token.encode()):
            raise AccessError(
                f"{what} needs the admin token on this public server: type it in the page's "
                "Admin token box (Model and store), or send it as an 'Authorization: Bearer "
                "TOKEN' header (gradio_client: Client(url, headers=...)); "
                + ("the token given is wrong." if given else "none was given.")
            )

    def scrub(self, text: str) -> str:
        """``text`` without the server's paths in public mode (each keeps its last part)."""
        return _PATH.sub(r"…/\1", text) if self.public else text

    def error(self, err: BaseException) -> str:
        """An error's message for a visitor: its text (a KeyError's without quotes), scrubbed."""
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        return self.scrub(text.strip() or type(err).__name__)


def bearer(request: Any) -> str | None:
    """The token of a request's ``Authorization: Bearer TOKEN`` header, if any."""
    headers = getattr(request, "headers", None)
    value = headers.get("authorization") if headers is not None else None
    if not value or not str(value).lower().startswith("bearer "):
        return None
    return str(value)[7:].strip()
