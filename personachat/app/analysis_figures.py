"""The analysis tab's figures as interactive Plotly figures, drawn from a model's analysis.

The report (``scripts/analyze.py``) keeps its matplotlib figures (``personachat.analysis.figures``);
the page draws the same numbers with values on hover: persona collapse per preference question,
the persona probe by layer, persona space, the assistant axis, activation patching by layer,
per-head patching and the controlled contrasts. ``analysis_figures`` returns them keyed as
``personachat.app.analysis.ANALYSIS_FIGURES``; plotly is imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from personachat.app.figures import FONT, PALETTE

GROUP_COLOURS = {"persona": "#1f77b4", "question": "#2ca02c", "answer": "#d62728"}
SITE_DASH = {"residual": "solid", "mlp_hidden": "dash", "attn_heads": "dot"}
SITE_WORDS = {"residual": "residual", "mlp_hidden": "MLP", "attn_heads": "attention"}


def _layout(fig: Any, title: str, height: int = 380) -> Any:
    fig.update_layout(
        title={"text": title, "x": 0.01},
        height=height,
        font=FONT,
        margin={"t": 70, "l": 60, "r": 20, "b": 60},
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def collapse_figure(collapse: Any) -> Any:
    """Per preference question: the share of personas giving the modal answer (red: collapsed)
    and the divergence of their next-token distributions; beside it, who answers what."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    qs = collapse.questions
    keys = [q.key for q in qs]
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.45, 0.55],
        subplot_titles=("modal-answer share", "answers (shaded: the modal one)"),
    )
    colours = ["#d62728" if q.collapsed else "#2ca02c" for q in qs]
    fig.add_trace(
        go.Bar(x=keys, y=[q.modal_share for q in qs], marker_color=colours, name="modal share"),
        1,
        1,
    )
    fig.add_trace(
        go.Bar(x=keys, y=[q.token_js for q in qs], marker_color="#7f7f7f", name="token JS (nats)"),
        1,
        1,
    )
    fig.add_hline(y=collapse.threshold, line_dash="dash", row=1, col=1)
    personas = list(collapse.personas)
    shaded = [[float(q.answers[p] == q.modal_answer) for q in qs] for p in personas]
    answers = [[q.answers[p] for q in qs] for p in personas]
    fig.add_trace(
        go.Heatmap(
            z=shaded,
            x=keys,
            y=personas,
            text=answers,
            texttemplate="%{text}",
            textfont={"size": 9},
            colorscale=[[0, "#ffffff"], [1, "#f4a3a3"]],
            showscale=False,
            hovertemplate="%{y} on %{x}: %{text}<extra></extra>",
        ),
        1,
        2,
    )
    title = f"Persona collapse: {collapse.n_collapsed} of {len(qs)} questions"
    return _layout(fig, title, height=max(380, 24 * len(personas) + 160))


def probe_figure(probe: Any) -> Any:
    """Cross-validated probe accuracy by layer for each token group, with its spread."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for g, group in enumerate(probe.groups):
        fig.add_trace(
            go.Scatter(
                x=list(probe.layers),
                y=probe.accuracy[g].tolist(),
                name=group,
                error_y={"type": "data", "array": probe.std[g].tolist()},
                line={"color": GROUP_COLOURS.get(group, PALETTE[g % len(PALETTE)])},
            )
        )
    fig.add_hline(y=probe.chance, line_dash="dash", line_color="gray", annotation_text="chance")
    fig.update_yaxes(range=[0, 1.05], title_text=f"probe accuracy ({probe.folds}-fold CV)")
    fig.update_xaxes(title_text="layer", dtick=1)
    return _layout(
        fig, f"Which persona is speaking, read from each layer ({len(probe.personas)} personas)"
    )


def space_figure(space: Any) -> Any:
    """Cosine similarity of the persona vectors, and their PCA coloured by the assistant axis."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(space.personas)
    ratio = space.explained
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "cosine similarity (mean-centered)",
            "PCA (colour: assistant-axis projection)",
        ),
    )
    fig.add_trace(
        go.Heatmap(
            z=space.cosine.tolist(),
            x=names,
            y=names,
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            reversescale=True,
            colorbar={"x": 0.45},
            hovertemplate="%{y} · %{x}: %{z:.2f}<extra></extra>",
        ),
        1,
        1,
    )
    ys = space.pca[:, 1] if space.pca.shape[1] > 1 else np.zeros(len(names))
    fig.add_trace(
        go.Scatter(
            x=space.pca[:, 0].tolist(),
            y=ys.tolist(),
            mode="markers+text",
            text=names,
            textposition="top center",
            name="personas",
            marker={
                "color": space.projection.tolist(),
                "colorscale": "Viridis",
                "size": 10,
                "showscale": True,
            },
            hovertemplate="%{text}<br>PC1 %{x:.2f}, PC2 %{y:.2f}<extra></extra>",
        ),
        1,
        2,
    )
    fig.update_xaxes(title_text=f"PC1 ({ratio[0]:.0%})", row=1, col=2)
    if len(ratio) > 1:
        fig.update_yaxes(title_text=f"PC2 ({ratio[1]:.0%})", row=1, col=2)
    fig.update_layout(showlegend=False)
    return _layout(fig, f"Persona space at layer {space.layer}", height=460)


def axis_figure(space: Any) -> Any:
    """Personas sorted by their projection on the assistant axis (neutral ones in orange)."""
    import plotly.graph_objects as go

    order = np.argsort(space.projection)
    names = [space.personas[i] for i in order]
    colours = ["#ff7f0e" if n in space.neutral else "#1f77b4" for n in names]
    fig = go.Figure(
        go.Bar(
            x=space.projection[order].tolist(),
            y=names,
            orientation="h",
            marker_color=colours,
            hovertemplate="%{y}: %{x:.2f}<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="projection on the assistant axis (neutral - roles)")
    return _layout(
        fig, f"The assistant axis, layer {space.layer}", height=max(300, 22 * len(names) + 140)
    )


def _pair(patching: Any) -> str:
    return (
        f"{patching.source} → {patching.target}: "
        f"{patching.answer_a.strip()!r} vs {patching.answer_b.strip()!r}"
    )


def patching_figure(patching: Any) -> Any:
    """The share of the answer difference restored by patching one layer, by site and group."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for (site, group), curve in patching.restored.items():
        fig.add_trace(
            go.Scatter(
                x=list(patching.layers),
                y=[float(v) for v in curve],
                name=f"{SITE_WORDS.get(site, site)} @ {group}",
                line={"color": GROUP_COLOURS.get(group), "dash": SITE_DASH.get(site)},
            )
        )
    fig.add_hline(y=1, line_dash="dot", line_color="gray")
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_yaxes(title_text="share of the answer difference restored")
    return _layout(fig, f"Activation patching {_pair(patching)}")


def heads_figure(patching: Any) -> Any:
    """Per token group: the share restored by patching one attention head [layer x head]."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    groups = list(patching.heads)
    fig = make_subplots(
        rows=1, cols=max(1, len(groups)), subplot_titles=[f"one head patched @ {g}" for g in groups]
    )
    grids = [patching.heads[g] for g in groups]
    limit = max([float(np.nanmax(np.abs(g))) for g in grids] + [1e-6])
    for i, grid in enumerate(grids):
        heads = [f"h{h}" for h in range(grid.shape[1])]
        fig.add_trace(
            go.Heatmap(
                z=grid.tolist(),
                x=heads,
                y=[str(la) for la in patching.layers],
                zmin=-limit,
                zmax=limit,
                colorscale="RdBu",
                reversescale=True,
                texttemplate="%{z:.2f}",
                showscale=i == 0,
                hovertemplate="layer %{y}, %{x}: %{z:.3f}<extra></extra>",
            ),
            1,
            i + 1,
        )
    fig.update_yaxes(title_text="layer", row=1, col=1)
    return _layout(fig, f"Per-head patching {_pair(patching)}")


def contrasts_figure(c: Any) -> Any:
    """Same answers of strongly vs mildly different pairs, modal share at high vs low generic
    bias, and with the persona before vs after the question."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=(
            "same answer (share)",
            "modal share by generic bias",
            "modal share by placement",
        ),
    )
    bars = [
        (
            ["strongly different", "mildly different"],
            [c.mean(c.strong, "agreement"), c.mean(c.mild, "agreement")],
        ),
        (["high bias", "low bias"], [c.share_high_bias, c.share_low_bias]),
        (
            ["early", "late"] if c.late is not None else ["early"],
            [c.early["modal_share"]] + ([c.late["modal_share"]] if c.late is not None else []),
        ),
    ]
    for i, (labels, values) in enumerate(bars):
        fig.add_trace(
            go.Bar(x=labels, y=[float(v) for v in values], marker_color=PALETTE[2 * i : 2 * i + 2]),
            1,
            i + 1,
        )
    fig.update_yaxes(range=[0, 1.05])
    fig.update_layout(showlegend=False)
    return _layout(fig, "Controlled contrasts", height=340)


def analysis_figures(result: Any) -> dict[str, Any]:
    """Every figure of an analysis, keyed as ``ANALYSIS_FIGURES``."""
    figs = {"collapse": collapse_figure(result.collapse), "probe": probe_figure(result.probe)}
    for i, p in enumerate(result.patching):
        figs[f"patching_{i}"] = patching_figure(p)
        if p.heads:
            figs[f"heads_{i}"] = heads_figure(p)
    if result.space is not None:
        figs["persona_space"] = space_figure(result.space)
        figs["assistant_axis"] = axis_figure(result.space)
    if result.contrasts is not None:
        figs["contrasts"] = contrasts_figure(result.contrasts)
    return figs
