"""The page's interactive plots (Plotly): the token x layer heatmap of a readout, quality by
layer, the persona map, and the conversation's drift.

Pure functions from numbers to ``plotly.graph_objects.Figure``; ``plot_data`` turns a figure
into what ``gr.Plot`` shows, with the page's Plotly config. Gradio's own frontend bundles
plotly.js, so nothing is fetched from the network. plotly is imported inside the functions, so
importing this module is cheap. Titles sit inside each figure with room above them; the plots
are shown without Gradio's label, which would cover them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from personachat.app.readout import token_details
from personachat.app.views import printable

if TYPE_CHECKING:
    from personachat.app.browse import LayerCurves
    from personachat.app.drift import Drift
    from personachat.app.readout import Readout

CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["lasso2d"]}
TOKEN_PX = 18  # the heatmap's width per token: labels stay readable, long replies scroll
LAYER_PX = 26
FONT = {"family": "ui-sans-serif, system-ui, sans-serif", "size": 12}
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")


def plot_json(fig: Any) -> str:
    """A figure as Plotly JSON with the page's config (NaN written as null)."""
    from plotly.utils import PlotlyJSONEncoder

    return json.dumps({**fig.to_plotly_json(), "config": CONFIG}, cls=PlotlyJSONEncoder)


def _label(token: str, width: int = 10) -> str:
    text = printable(token).replace(" ", "·") or "∅"
    return text if len(text) <= width else text[: width - 1] + "…"


def heatmap_figure(readout: Readout, persona: str | None = None) -> Any:
    """Token x layer heatmap of the projection on ``persona`` (the first shown by default):
    values on hover, tokens without a projection left blank, the colour scale set by the tokens
    steering was not added at (clipped at a percentile), the prompt's end and the steered
    tokens marked."""
    import plotly.graph_objects as go

    name = readout.shown(persona)[0]
    grid = readout.values(name)
    assert grid is not None
    limit = readout.colour_limit(grid)
    n, n_layers = grid.shape
    z = [[None if not np.isfinite(v) else float(v) for v in row] for row in grid.T]
    shown = [printable(t) for t in readout.tokens]
    details = [token_details(readout, name, layer) for layer in range(n_layers)]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(n)),
            y=list(range(n_layers)),
            customdata=[list(zip(shown, row, strict=True)) for row in details],
            zmin=-limit,
            zmax=limit,
            colorscale="RdBu",
            reversescale=True,
            hoverongaps=False,
            hovertemplate=(
                "'%{customdata[0]}'<br>layer %{y}<br>value %{z:.3f}<br>%{customdata[1]}"
                "<extra></extra>"
            ),
            colorbar={"title": {"text": readout.unit.replace(", ", "<br>"), "side": "right"}},
        )
    )
    _marks(fig, readout, n, n_layers)
    fig.update_layout(
        title={"text": f"<b>{name}</b>: projection by token and layer", "x": 0.01},
        width=max(640, TOKEN_PX * n + 220),
        height=max(280, LAYER_PX * n_layers + 200),
        margin={"t": 70, "l": 60, "r": 20, "b": 110},
        font=FONT,
        xaxis={
            "tickmode": "array",
            "tickvals": list(range(n)),
            "ticktext": [_label(t) for t in readout.tokens],
            "tickangle": -90,
            "tickfont": {"size": 11},
        },
        yaxis={"title": {"text": "layer"}, "dtick": 1, "range": [-0.5, n_layers - 0.5]},
        plot_bgcolor="#f4f4f4",
    )
    return fig


def _marks(fig: Any, readout: Readout, n: int, n_layers: int) -> None:
    """The prompt's end as a line, the steered tokens as a dotted box, both named above."""
    top = n_layers - 0.5
    above = {"yref": "paper", "y": 1.0, "yanchor": "bottom", "showarrow": False}
    if 0 < readout.n_prompt < n:
        x = readout.n_prompt - 0.5
        fig.add_shape(type="line", x0=x, x1=x, y0=-0.5, y1=top, line={"color": "black"})
        fig.add_annotation(x=x, text="reply →", xanchor="left", **above)
    if readout.steered is not None:
        lo, hi = readout.steered
        fig.add_shape(
            type="rect",
            x0=lo - 0.5,
            x1=hi - 0.5,
            y0=-0.5,
            y1=top,
            line={"color": "#555", "dash": "dot"},
            fillcolor="rgba(0,0,0,0)",
        )
        fig.add_annotation(
            x=(lo + hi - 1) / 2,
            text="steered here (left out of the colour scale)",
            font={"size": 10, "color": "#555"},
            **above,
        )


def layers_figure(curves: Mapping[str, LayerCurves]) -> Any:
    """AUC (and the held-out AUC, mean ± spread over folds, when stored) and separation by
    layer, one colour per persona."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("AUC by layer", "separation by layer"))
    for i, (name, c) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        layers = list(range(len(c.auc)))
        line = {"color": colour}
        fig.add_trace(
            go.Scatter(x=layers, y=c.auc, name=f"{name} AUC", line=line, legendgroup=name), 1, 1
        )
        if c.auc_heldout is not None:
            spread = {"type": "data", "array": c.auc_heldout_std or [], "visible": True}
            fig.add_trace(
                go.Scatter(
                    x=layers,
                    y=c.auc_heldout,
                    name=f"{name} held-out AUC",
                    error_y=spread,
                    line={**line, "dash": "dash"},
                    legendgroup=name,
                ),
                1,
                1,
            )
        fig.add_trace(
            go.Scatter(
                x=layers, y=c.separation, name=f"{name} separation", line=line, legendgroup=name
            ),
            1,
            2,
        )
    fig.update_yaxes(range=[0, 1.05], row=1, col=1)
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_layout(
        height=380,
        margin={"t": 60, "l": 50, "r": 20, "b": 50},
        font=FONT,
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def map_figure(
    names: Sequence[str],
    vectors: np.ndarray,
    point: np.ndarray | None,
    title: str,
    highlight: Sequence[str] = (),
) -> Any:
    """Persona vectors [P, H] on their first two principal components (names on hover and
    beside each point; the picked ones in red), with ``point`` (this conversation) as a star."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if len(names) >= 2:
        _pca_points(fig, names, np.asarray(vectors, dtype=np.float64), point, highlight)
        fig.update_xaxes(title_text="PC 1")
        fig.update_yaxes(title_text="PC 2")
    else:
        fig.add_annotation(text="register at least two personas", showarrow=False)
    fig.update_layout(
        title={"text": title, "x": 0.01},
        height=460,
        font=FONT,
        showlegend=False,
        margin={"t": 60, "l": 50, "r": 20, "b": 50},
    )
    return fig


def _pca_points(
    fig: Any,
    names: Sequence[str],
    vectors: np.ndarray,
    point: np.ndarray | None,
    highlight: Sequence[str],
) -> None:
    """The vectors' PCA as named points, and ``point`` projected the same way as a star."""
    import plotly.graph_objects as go

    center = vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(vectors - center, full_matrices=False)
    axes = vt[:2]
    xy = (vectors - center) @ axes.T
    if xy.shape[1] == 1:
        xy = np.concatenate([xy, np.zeros_like(xy)], axis=1)
    fig.add_trace(
        go.Scatter(
            x=xy[:, 0],
            y=xy[:, 1],
            mode="markers+text",
            text=list(names),
            textposition="top center",
            marker={
                "size": 10,
                "color": ["#d62728" if n in highlight else "#7f7f7f" for n in names],
            },
            name="persona vectors",
            hovertemplate="%{text}<br>PC1 %{x:.2f}, PC2 %{y:.2f}<extra></extra>",
        )
    )
    if point is None:
        return
    p = (np.asarray(point, dtype=np.float64) - center) @ axes.T
    star = {"symbol": "star", "size": 20, "color": "gold", "line": {"color": "black", "width": 1}}
    fig.add_trace(
        go.Scatter(
            x=[float(p[0])],
            y=[float(p[1]) if len(p) > 1 else 0.0],
            mode="markers+text",
            text=["this chat"],
            textposition="bottom center",
            name="this chat",
            marker=star,
        )
    )


def drift_figure(drift: Drift) -> Any:
    """Each assistant turn's projection on the tracked vectors, at each one's best layer: as a
    percentile of its reference (above; the reference's ``BAND`` shaded) and scaled (below; 0 =
    baseline mean, 1 = persona mean; each vector's band in its colour)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from personachat.app.drift import BAND

    low, high = BAND
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.12,
        subplot_titles=(
            f"percentile of the reference (normal band: its {low}th-{high}th, shaded)",
            "scaled: 0 = baseline mean, 1 = persona mean (band: the reference's, same colour)",
        ),
    )
    band = {"line_width": 0, "layer": "below", "exclude_empty_subplots": False}
    fig.add_hrect(y0=low, y1=high, fillcolor="#2ca02c", opacity=0.15, row=1, col=1, **band)
    missing = []
    for i, (name, track) in enumerate(drift.tracks.items()):
        colour = PALETTE[i % len(PALETTE)]
        label = f"{name} (layer {track.layer}, {track.positions})"
        style = {"mode": "lines+markers", "line": {"color": colour}, "legendgroup": name}
        turns, ranks = drift.series(name, "percentile")
        if track.reference:
            fig.add_trace(go.Scatter(x=turns, y=ranks, name=label, **style), 1, 1)
        else:
            missing.append(name)
        turns, scaled = drift.series(name, "scaled")
        shown = not track.reference
        fig.add_trace(go.Scatter(x=turns, y=scaled, name=label, showlegend=shown, **style), 2, 1)
        if track.band is not None and turns:
            lo, hi = (float(v) for v in track.band[:, track.layer])
            fig.add_hrect(y0=lo, y1=hi, fillcolor=colour, opacity=0.15, row=2, col=1, **band)
    notes = [f"{', '.join(missing)}: raw and scaled only (no reference distribution stored)"]
    if not drift.turns:
        notes = ["send a message: each reply adds a turn (pick a persona or register the axis)"]
    if missing or not drift.turns:
        fig.add_annotation(text=notes[0], xref="paper", yref="paper", x=0, y=-0.22, showarrow=False)
    fig.update_yaxes(title_text="percentile", range=[-3, 103], row=1, col=1)
    fig.update_yaxes(title_text="scaled", row=2, col=1)
    fig.update_xaxes(title_text="assistant turn", dtick=1, row=2, col=1)
    fig.update_layout(
        title={"text": "Drift over the conversation, turn by turn", "x": 0.01},
        height=520,
        margin={"t": 80, "l": 60, "r": 20, "b": 90},
        font=FONT,
        legend={"orientation": "h", "y": -0.28},
    )
    return fig
