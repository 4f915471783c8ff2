"""Render what the page shows inside the model: coloured tokens, heatmaps, layer plots, maps.

Pure functions from numbers to HTML strings or RGB images (numpy ``uint8`` arrays, which
``gr.Image`` shows as they are); no model, no store, no Gradio. matplotlib is imported inside the
functions that draw, so importing this module is cheap.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
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
) -> str:
    """Tokens coloured by ``values``: red positive, blue negative, full colour at |value| =
    ``scale`` (default: the largest |value|).

    Prompt tokens come first (``n_prompt`` of them); reply tokens are bold. Each token is a
    ``span.pc-tok`` with its value in ``title`` and ``data-value``.
    """
    vals = np.asarray(values, dtype=np.float64)
    if scale is None:
        scale = float(np.abs(vals).max()) if vals.size else 0.0
    scale = scale if scale > 0 else 1.0
    spans = []
    for i, (token, value) in enumerate(zip(tokens, vals, strict=True)):
        r, g, b = POSITIVE if value >= 0 else NEGATIVE
        alpha = min(1.0, abs(value) / scale) * 0.85
        kind = "pc-prompt" if i < n_prompt else "pc-reply"
        spans.append(
            f'<span class="pc-tok {kind}" data-value="{value:.4g}" '
            f'title="{html.escape(repr(token))}: {value:+.3f}" '
            f'style="background: rgba({r},{g},{b},{alpha:.2f})">{_shown(token)}</span>'
            + ("<br>" if "\n" in token else "")
        )
    head = f'<div class="pc-caption">{html.escape(caption)}</div>' if caption else ""
    return f'{head}<div class="pc-tokens">{"".join(spans)}</div>'


def empty_html(text: str) -> str:
    return f'<div class="pc-caption">{html.escape(text)}</div>'


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _figure(width: float, height: float) -> tuple[Any, Any]:
    fig = _new_figure(width, height)
    return fig, fig.add_subplot(1, 1, 1)


def _to_image(fig: Any) -> np.ndarray:
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def heatmap_image(
    tokens: Sequence[str], values: np.ndarray, n_prompt: int, title: str, max_tokens: int = 80
) -> np.ndarray:
    """A token x layer heatmap of ``values`` [tokens, layers] (the last ``max_tokens`` tokens)."""
    values = np.asarray(values, dtype=np.float64)
    start = max(0, len(tokens) - max_tokens)
    shown, grid = list(tokens[start:]), values[start:]
    fig, ax = _figure(min(14.0, 2.0 + 0.16 * len(shown)), 3.2)
    limit = float(np.abs(grid).max()) or 1.0
    image = ax.imshow(grid.T, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_yticks(range(grid.shape[1]))
    ax.set_ylabel("layer")
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([printable(t) for t in shown], rotation=90, fontsize=7)
    if n_prompt > start:
        ax.axvline(n_prompt - start - 0.5, color="black", linewidth=1)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _to_image(fig)


def layer_metrics_image(
    metrics: Mapping[str, tuple[Sequence[float], Sequence[float]]],
) -> np.ndarray:
    """AUC and separation by layer for each persona: ``{persona: (auc[L], separation[L])}``."""
    fig = _new_figure(8, 3)
    ax_auc, ax_sep = fig.subplots(1, 2)
    for name, (auc, sep) in metrics.items():
        ax_auc.plot(range(len(auc)), list(auc), marker="o", label=name)
        ax_sep.plot(range(len(sep)), list(sep), marker="o", label=name)
    from matplotlib.ticker import MaxNLocator

    ax_auc.set(title="AUC by layer", xlabel="layer", ylim=(0.0, 1.05))
    ax_sep.set(title="separation (effect size) by layer", xlabel="layer")
    for ax in (ax_auc, ax_sep):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if metrics:
        ax_auc.legend(fontsize=7)
    return _to_image(fig)


def pca_map_image(
    names: Sequence[str],
    vectors: np.ndarray,
    point: np.ndarray | None,
    title: str,
    highlight: Sequence[str] = (),
) -> np.ndarray:
    """Persona vectors [P, H] on their first two principal components, with ``point`` (the
    conversation's position, same space) drawn as a star."""
    vectors = np.asarray(vectors, dtype=np.float64)
    fig, ax = _figure(5.5, 4.5)
    if len(names) >= 2:
        center = vectors.mean(axis=0)
        _, _, vt = np.linalg.svd(vectors - center, full_matrices=False)
        axes = vt[:2]
        xy = (vectors - center) @ axes.T
        if xy.shape[1] == 1:
            xy = np.concatenate([xy, np.zeros_like(xy)], axis=1)
        colors = ["tab:red" if n in highlight else "tab:gray" for n in names]
        ax.scatter(xy[:, 0], xy[:, 1], c=colors, s=30)
        for (x, y), name in zip(xy, names, strict=True):
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if point is not None:
            p = (np.asarray(point, dtype=np.float64) - center) @ axes.T
            px, py = (float(p[0]), float(p[1]) if len(p) > 1 else 0.0)
            ax.scatter([px], [py], marker="*", s=220, c="gold", edgecolors="black")
            ax.annotate(
                "this chat", (px, py), fontsize=8, xytext=(4, -10), textcoords="offset points"
            )
        ax.set(xlabel="PC 1", ylabel="PC 2")
    else:
        ax.text(0.5, 0.5, "register at least two personas", ha="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=9)
    return _to_image(fig)


def figure_image(fig: Any) -> np.ndarray:
    """A matplotlib ``Figure`` (built without pyplot, e.g. ``report.report_figures``) as RGB."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def findings_markdown(
    model_id: str, dataset: str, personas: Sequence[str], findings: Sequence[str], seconds: float
) -> str:
    """The analysis findings as a Markdown list under a line saying what was analysed."""
    head = (
        f"**Persona analysis of `{model_id}`**: {len(personas)} personas "
        f"({', '.join(personas)}), {dataset} questions; computed in {seconds:.1f} s."
    )
    return head + "\n\n" + "\n".join(f"- {line}" for line in findings)
