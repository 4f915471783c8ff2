"""Render what the page shows as HTML: coloured tokens, the conversation's turns side by side,
the analysis' findings.

Pure functions from numbers and text to HTML or Markdown strings; no model, no store, no Gradio.
The interactive plots are in ``personachat.app.figures`` and ``personachat.app.analysis_figures``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

POSITIVE = (214, 39, 40)  # red: the token's residual points along the persona vector
NEGATIVE = (31, 119, 180)  # blue: it points away


def printable(token: str) -> str:
    """``token`` with control characters spelled out (``\\x07``), newlines as ``↵``."""
    out = []
    for ch in token:
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("⇥")
        elif not ch.isprintable() and ch != " ":
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def _shown(token: str) -> str:
    return html.escape(printable(token)) or "∅"


def tokens_html(
    tokens: Sequence[str],
    values: Sequence[float] | np.ndarray,
    n_prompt: int,
    caption: str = "",
    scale: float | None = None,
    details: Sequence[str] = (),
) -> str:
    """Tokens coloured by ``values``: red positive, blue negative, full colour at |value| >=
    ``scale`` (default: the largest |value|); a NaN value (no projection) stays uncoloured.

    Prompt tokens come first (``n_prompt`` of them); reply tokens are bold. Each token is a
    ``span.pc-tok`` with its value in ``title`` and ``data-value``; ``details`` (one text per
    token) follow the value in ``title``.
    """
    vals = np.asarray(values, dtype=np.float64)
    if scale is None:
        finite = np.abs(vals[np.isfinite(vals)])
        scale = float(finite.max()) if finite.size else 0.0
    scale = scale if scale > 0 else 1.0
    spans = []
    for i, (token, value) in enumerate(zip(tokens, vals, strict=True)):
        kind = "pc-prompt" if i < n_prompt else "pc-reply"
        if np.isfinite(value):
            r, g, b = POSITIVE if value >= 0 else NEGATIVE
            alpha = min(1.0, abs(value) / scale) * 0.85
            style, said = f"background: rgba({r},{g},{b},{alpha:.2f})", f"{value:+.3f}"
            said += f" ({details[i]})" if i < len(details) else ""
        else:
            kind += " pc-none"
            style, said = "", "no projection (never fed through the model)"
        spans.append(
            f'<span class="pc-tok {kind}" data-value="{value:.4g}" '
            f'title="{html.escape(repr(token))}: {said}" '
            f'style="{style}">{_shown(token)}</span>' + ("<br>" if "\n" in token else "")
        )
    head = f'<div class="pc-caption">{html.escape(caption)}</div>' if caption else ""
    return f'{head}<div class="pc-tokens">{"".join(spans)}</div>'


def _text(line: str) -> str:
    """``line`` safe inside HTML, its ``->`` and ``>=`` kept as typed."""
    return line.replace("&", "&amp;").replace("<", "&lt;")


def empty_html(text: str) -> str:
    return f'<div class="pc-caption">{html.escape(text)}</div>'


COLUMNS = (("pc-steered", "Steered"), ("pc-unsteered", "Plain"), ("pc-prompted", "Prompted"))
OFF = "—"  # a column's reply in a turn that did not ask for it


def _replies(messages: Sequence[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """(user message, the assistant reply after it or None) for each user turn."""
    out: list[tuple[str, str | None]] = []
    for message in messages:
        text = _content(message)
        if message.get("role") == "user":
            out.append((text, None))
        elif message.get("role") == "assistant" and out:
            out[-1] = (out[-1][0], text)
    return out


def _content(message: dict[str, Any]) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in parts)


def compare_html(
    steered: Sequence[dict[str, Any]],
    plain: Sequence[dict[str, Any]],
    prompted: Sequence[dict[str, Any]],
    labels: Sequence[str] = (),
    empty: str = "No messages yet: type one below or pick an example.",
) -> str:
    """The conversation turn by turn: each user message, then its replies side by side (the
    steered one; the plain and the prompted ones when some turn has them), so the replies to
    one message always line up. ``labels`` name the columns (default ``COLUMNS``)."""
    turns = _replies(steered)
    if not turns:
        return f'<div class="pc-conv pc-empty">{html.escape(empty)}</div>'
    others = [_replies(plain), _replies(prompted)]
    shown = [0] + [i + 1 for i, o in enumerate(others) if any(r not in (None, OFF) for _, r in o)]
    names = [labels[i] if i < len(labels) else COLUMNS[i][1] for i in range(3)]
    rows = []
    for t, (question, reply) in enumerate(turns):
        cells = []
        for column in shown:
            text = reply if column == 0 else _nth(others[column - 1], t)
            kind, _ = COLUMNS[column]
            body = html.escape(text) if text not in (None, OFF) else OFF
            cells.append(
                f'<div class="pc-card {kind}"><div class="pc-label">{html.escape(names[column])}'
                f'</div><div class="pc-text">{body}</div></div>'
            )
        rows.append(
            f'<div class="pc-turn"><div class="pc-user">{html.escape(question)}</div>'
            f'<div class="pc-replies" style="--pc-cols: {len(shown)}">{"".join(cells)}</div></div>'
        )
    return f'<div class="pc-conv">{"".join(rows)}</div>'


def _nth(turns: Sequence[tuple[str, str | None]], index: int) -> str | None:
    return turns[index][1] if index < len(turns) else None


def findings_markdown(
    model_id: str,
    dataset: str,
    personas: Sequence[str],
    findings: Sequence[str],
    seconds: float,
    plain: Sequence[str] = (),
) -> str:
    """The analysis under a line saying what was analysed: the ``plain`` findings as a list,
    then every finding folded under 'All findings'."""
    head = (
        f"**Persona analysis of `{model_id}`**: {len(personas)} personas "
        f"({', '.join(personas)}), {dataset} questions; computed in {seconds:.1f} s."
    )
    items = "".join(f"<li>{_text(line)}</li>" for line in findings)
    folded = f"<details><summary>All findings (technical)</summary><ul>{items}</ul></details>"
    lines = "\n".join(f"{i}. {line}" for i, line in enumerate(plain, 1))
    return "\n\n".join(part for part in (head, lines, folded) if part)
