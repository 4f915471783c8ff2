"""The pieces every field check shares: OpenAI's error object and checked scalars."""

from __future__ import annotations

import math
from typing import Any


class ApiError(Exception):
    """A request this server refuses: HTTP ``status`` and OpenAI's error object."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str = "invalid_value",
        status: int = 400,
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}


def integer(value: Any, param: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ApiError(f"{param} must be a whole number, got {value!r}", param)
    if not low <= value <= high:
        raise ApiError(f"{param} must be in {low}..{high}, got {value}", param)
    return int(value)


def number(value: Any, param: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(f"{param} must be a finite number, got {value!r}", param)
    if value > high or value < low or (low_open and value == low):
        bounds = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise ApiError(f"{param} must be in {bounds}, got {value}", param)
    return float(value)


def flag(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise ApiError(f"{param} must be true or false, got {value!r}", param)
    return value
