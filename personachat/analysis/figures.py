"""The figures of the persona-analysis report, as matplotlib ``Figure`` objects.

They are built without pyplot (safe in the app's worker threads); the app's analysis tab can show
them directly (``gr.Plot``):

    persona_space_figure(space)          cosine heatmap, PCA scatter, variance explained
    axis_figure(space)                   personas ranked on the assistant axis
    comparison_figure(comparison, a, b)  two models' similarities and axis ranks
    probe_figure(probe)                  persona-probe accuracy by layer and token group
    collapse_figure(collapse)            per-preference modal share and divergence, answer grid
    patching_figure(patching)            restored answer difference by layer, site and group
    heads_figure(patching)               restored answer difference per attention head (heatmap)
    contrasts_figure(contrasts)          strong/mild pairs, high/low bias, early/late placement
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np
from matplotlib.figure import Figure

from personachat.analysis.collapse import CollapseResult
from personachat.analysis.contrasts import Contrasts
from personachat.analysis.patching import SITE_LABEL, PatchingResult
from personachat.analysis.probes import ProbeResult
from personachat.analysis.run import ModelAnalysis
from personachat.analysis.space import PersonaSpace, SpaceComparison, upper_triangle


def persona_space_figure(space: PersonaSpace) -> Figure:
    """Cosine-similarity heatmap, PCA scatter coloured by assistant-axis projection, variance."""
    fig = Figure(figsize=(15, 4.8))
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1.1, 0.7]})
    n = len(space.personas)
    im = ax1.imshow(space.cosine, cmap="RdBu_r", vmin=-1, vmax=1)
    ax1.set_xticks(range(n), space.personas, rotation=90, fontsize=7)
    ax1.set_yticks(range(n), space.personas, fontsize=7)
    ax1.set_title(f"cosine similarity (mean-centered), layer {space.layer}")
    fig.colorbar(im, ax=ax1, fraction=0.046)
    xs = space.pca[:, 0]
    ys = space.pca[:, 1] if space.pca.shape[1] > 1 else np.zeros(n)
    sc = ax2.scatter(xs, ys, c=space.projection, cmap="viridis", s=40)
    for x, y, name in zip(xs, ys, space.personas, strict=True):
        ax2.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ratio = space.explained
    ax2.set_xlabel(f"PC1 ({ratio[0]:.0%})")
    ax2.set_ylabel(f"PC2 ({ratio[1]:.0%})" if len(ratio) > 1 else "")
    ax2.set_title("PCA (colour: assistant-axis projection)")
    fig.colorbar(sc, ax=ax2, fraction=0.046)
    ks = np.arange(1, len(ratio) + 1)
    ax3.bar(ks, ratio, color="tab:blue", label="per component")
    ax3.plot(ks, np.cumsum(ratio), "o-", color="tab:orange", label="cumulative")
    ax3.set_ylim(0, 1.05)
    ax3.set_xlabel("component")
    ax3.set_title("variance explained")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    return fig


def axis_figure(space: PersonaSpace) -> Figure:
    """Personas sorted by their projection on the assistant axis (neutral personas in orange)."""
    order = np.argsort(space.projection)
    fig = Figure(figsize=(6, 0.28 * len(order) + 1.2))
    ax = fig.subplots()
    names = [space.personas[i] for i in order]
    colors = ["tab:orange" if n in space.neutral else "tab:blue" for n in names]
    ax.barh(range(len(order)), space.projection[order], color=colors)
    ax.set_yticks(range(len(order)), names, fontsize=8)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("projection on the assistant axis (neutral - roles)")
    ax.set_title(f"assistant axis, layer {space.layer}")
    fig.tight_layout()
    return fig


def comparison_figure(comparison: SpaceComparison, a: PersonaSpace, b: PersonaSpace) -> Figure:
    """Pairwise similarities of model A against model B, and assistant-axis ranks."""
    sa, sb = a.subset(comparison.personas), b.subset(comparison.personas)
    fig = Figure(figsize=(11, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.scatter(upper_triangle(sa.cosine), upper_triangle(sb.cosine), s=12)
    ax1.plot([-1, 1], [-1, 1], "k--", lw=0.5)
    ax1.set_xlabel(f"cosine in {comparison.model_a}")
    ax1.set_ylabel(f"cosine in {comparison.model_b}")
    ax1.set_title(f"persona similarities: Pearson {comparison.pearson:.2f}")
    for name in comparison.personas:
        ra, rb = comparison.ranks_a[name], comparison.ranks_b[name]
        ax2.scatter(ra, rb, s=14, color="tab:blue")
        ax2.annotate(name, (ra, rb), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax2.set_xlabel(f"assistant-axis rank in {comparison.model_a}")
    ax2.set_ylabel(f"rank in {comparison.model_b}")
    ax2.set_title(f"axis rank agreement: Spearman {comparison.axis_spearman:.2f}")
    fig.tight_layout()
    return fig


def probe_figure(probe: ProbeResult) -> Figure:
    """Cross-validated persona-probe accuracy per layer for each token group."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for g, group in enumerate(probe.groups):
        acc, std = probe.accuracy[g], probe.std[g]
        ax.plot(probe.layers, acc, "o-", label=group)
        ax.fill_between(probe.layers, acc - std, acc + std, alpha=0.15)
    ax.axhline(probe.chance, color="gray", ls="--", lw=1, label="chance")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"probe accuracy ({probe.folds}-fold CV)")
    ax.set_title(
        f"persona decodability, {len(probe.personas)} personas, placement {probe.placement}"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def collapse_figure(collapse: CollapseResult) -> Figure:
    """Per preference: modal-answer share and JS divergence; grid of who gives the modal answer."""
    qs = collapse.questions
    fig = Figure(figsize=(13, 0.32 * len(collapse.personas) + 3.2))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    x = np.arange(len(qs))
    colors = ["tab:red" if q.collapsed else "tab:green" for q in qs]
    ax1.bar(x - 0.2, [q.modal_share for q in qs], 0.4, color=colors, label="modal share")
    ax1.bar(x + 0.2, [q.token_js for q in qs], 0.4, color="tab:gray", label="token JS (nats)")
    ax1.axhline(collapse.threshold, color="k", ls="--", lw=0.8)
    ax1.set_xticks(x, [q.key for q in qs], rotation=45, ha="right", fontsize=8)
    ax1.set_title(f"collapse on {collapse.n_collapsed} of {len(qs)} (red = collapsed)")
    ax1.legend(fontsize=7)
    grid = np.array([[q.answers[p] == q.modal_answer for q in qs] for p in collapse.personas])
    ax2.imshow(grid, cmap="Reds", vmin=0, vmax=1.4, aspect="auto")
    for i, p in enumerate(collapse.personas):
        for j, q in enumerate(qs):
            ax2.text(j, i, q.answers[p][:14], ha="center", va="center", fontsize=5.5)
    ax2.set_xticks(x, [q.key for q in qs], rotation=45, ha="right", fontsize=8)
    ax2.set_yticks(range(len(collapse.personas)), collapse.personas, fontsize=7)
    ax2.set_title("answers (shaded = modal answer)")
    fig.tight_layout()
    return fig


def patching_figure(patching: PatchingResult) -> Figure:
    """Fraction of the answer logit difference restored per layer, by site and token group."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    styles = {"persona": "tab:blue", "question": "tab:green", "answer": "tab:red"}
    lines = {"residual": "-", "mlp_hidden": "--", "attn_heads": ":"}
    for (site, group), curve in patching.restored.items():
        ls = lines.get(site, "-.")
        ax.plot(
            patching.layers,
            curve,
            ls,
            marker="o",
            color=styles.get(group),
            ms=3,
            label=f"{SITE_LABEL.get(site, site)} @ {group}",
        )
    ax.axhline(0, color="k", lw=0.5)
    ax.axhline(1, color="gray", lw=0.5, ls=":")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of logit difference restored")
    ax.set_title(
        f"patch {patching.source} -> {patching.target}: "
        f"{patching.answer_a.strip()!r} vs {patching.answer_b.strip()!r}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def heads_figure(patching: PatchingResult) -> Figure:
    """Heatmap per token group: fraction restored by patching one attention head [layer x head]."""
    groups = list(patching.heads)
    fig = Figure(figsize=(3.6 * max(1, len(groups)) + 0.8, 3.8))
    axes = fig.subplots(1, max(1, len(groups)), squeeze=False)[0]
    grids = [patching.heads[g] for g in groups]
    lim = max([float(np.nanmax(np.abs(g))) for g in grids] + [1e-6])
    for ax, group, grid in zip(axes, groups, grids, strict=False):
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        n_layers, n_heads = grid.shape
        for i in range(n_layers):
            for h in range(n_heads):
                color = "white" if abs(grid[i, h]) > 0.6 * lim else "black"
                ax.text(
                    h, i, f"{grid[i, h]:.2f}", ha="center", va="center", fontsize=6, color=color
                )
        ax.set_xticks(range(n_heads), [f"h{h}" for h in range(n_heads)], fontsize=7)
        ax.set_yticks(range(n_layers), [str(la) for la in patching.layers], fontsize=7)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"one head patched @ {group}", fontsize=9)
    if groups:
        fig.colorbar(im, ax=list(axes), fraction=0.03)
    fig.suptitle(
        f"per-head patching {patching.source} -> {patching.target}: "
        f"{patching.answer_a.strip()!r} vs {patching.answer_b.strip()!r}",
        fontsize=9,
    )
    return fig


def contrasts_figure(c: Contrasts) -> Figure:
    """Agreement of strong vs mild pairs, modal share at high vs low bias, early vs late."""
    fig = Figure(figsize=(11, 3.6))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    agree = [c.mean(c.strong, "agreement"), c.mean(c.mild, "agreement")]
    ax1.bar(["strongly\ndifferent", "mildly\ndifferent"], agree, color=["C0", "C1"])
    ax1.set_ylim(0, 1.05)
    ax1.set_title("same answer (share of preferences)")
    ax2.bar(
        ["high generic\nbias", "low generic\nbias"],
        [c.share_high_bias, c.share_low_bias],
        color=["C3", "C2"],
    )
    ax2.set_ylim(0, 1.05)
    ax2.set_title("modal-answer share")
    labels, values = ["early"], [c.early["modal_share"]]
    if c.late is not None:
        labels.append("late")
        values.append(c.late["modal_share"])
    ax3.bar(labels, values, color=["C4", "C5"][: len(values)])
    ax3.set_ylim(0, 1.05)
    ax3.set_title("modal share by persona placement")
    fig.tight_layout()
    return fig


def report_figures(r: ModelAnalysis) -> dict[str, Figure]:
    """Every figure of a report by file stem (what the app's analysis tab shows)."""
    figs = {"collapse": collapse_figure(r.collapse), "probe": probe_figure(r.probe)}
    for i, p in enumerate(r.patching):
        figs[f"patching_{i}"] = patching_figure(p)
        if p.heads:
            figs[f"heads_{i}"] = heads_figure(p)
    if r.space is not None:
        figs["persona_space"] = persona_space_figure(r.space)
        figs["assistant_axis"] = axis_figure(r.space)
    if r.comparison is not None and r.space is not None and r.other_space is not None:
        figs["comparison"] = comparison_figure(r.comparison, r.space, r.other_space)
    if r.contrasts is not None:
        figs["contrasts"] = contrasts_figure(r.contrasts)
    return figs
