"""The per-model persona-analysis report: collect the analyses, draw the figures, write markdown.

``analyze_model`` runs every analysis of ``personachat.analysis`` on one model (and, with
``compare``, the cross-model comparison) into a ``ModelAnalysis``; ``write_report`` writes
``report.md`` with PNG figures and tables in the sections seed 002 asks for (goal, data, method,
results, analysis, next steps, takeaways), stating the findings in words.

The figure functions return matplotlib ``Figure`` objects built without pyplot (safe in the
app's worker threads); the app's analysis tab can show them directly (``gr.Plot``):

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

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np
from matplotlib.figure import Figure

import personachat.analysis.core as an
from personachat.hooks import Site
from personachat.model import LoadedModel
from personachat.records import Persona, PersonaVector

log = logging.getLogger(__name__)

SITE_LABEL = {"residual": "residual", "mlp_hidden": "MLP", "attn_heads": "attention"}
HEAD_THRESHOLD = 0.2  # a head "carries the persona" when patching it alone restores this much


# --------------------------------------------------------------------------------------------
# Figures


def persona_space_figure(space: an.PersonaSpace) -> Figure:
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


def axis_figure(space: an.PersonaSpace) -> Figure:
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


def comparison_figure(
    comparison: an.SpaceComparison, a: an.PersonaSpace, b: an.PersonaSpace
) -> Figure:
    """Pairwise similarities of model A against model B, and assistant-axis ranks."""
    sa, sb = a.subset(comparison.personas), b.subset(comparison.personas)
    fig = Figure(figsize=(11, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.scatter(an.upper_triangle(sa.cosine), an.upper_triangle(sb.cosine), s=12)
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


def probe_figure(probe: an.ProbeResult) -> Figure:
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


def collapse_figure(collapse: an.CollapseResult) -> Figure:
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


def patching_figure(patching: an.PatchingResult) -> Figure:
    """Fraction of the answer logit difference restored per layer, by site and token group."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    styles = {"persona": "tab:blue", "question": "tab:green", "answer": "tab:red"}
    lines = {"residual": "-", "mlp_hidden": "--", "attn_heads": ":"}
    for (site, group), curve in patching.restored.items():
        ls = lines.get(site, "-.")
        ax.plot(patching.layers, curve, ls, marker="o", color=styles.get(group), ms=3,
                label=f"{SITE_LABEL.get(site, site)} @ {group}")  # fmt: skip
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


def heads_figure(patching: an.PatchingResult) -> Figure:
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
                ax.text(h, i, f"{grid[i, h]:.2f}", ha="center", va="center", fontsize=6,
                        color=color)  # fmt: skip
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


def contrasts_figure(c: an.Contrasts) -> Figure:
    """Agreement of strong vs mild pairs, modal share at high vs low bias, early vs late."""
    fig = Figure(figsize=(11, 3.6))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    agree = [c.mean(c.strong, "agreement"), c.mean(c.mild, "agreement")]
    ax1.bar(["strongly\ndifferent", "mildly\ndifferent"], agree, color=["C0", "C1"])
    ax1.set_ylim(0, 1.05)
    ax1.set_title("same answer (share of preferences)")
    ax2.bar(["high generic\nbias", "low generic\nbias"], [c.share_high_bias, c.share_low_bias],
            color=["C3", "C2"])  # fmt: skip
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


# --------------------------------------------------------------------------------------------
# Collecting the analyses


@dataclass(eq=False)
class ModelAnalysis:
    """Everything one report shows for one model."""

    model_id: str
    personas: list[Persona]
    items: list[an.PreferenceItem]
    collapse: an.CollapseResult
    probe: an.ProbeResult
    space: an.PersonaSpace | None = None
    collapse_late: an.CollapseResult | None = None
    patching: list[an.PatchingResult] = field(default_factory=list)
    circuit: an.Circuit | None = None
    contrasts: an.Contrasts | None = None
    comparison: an.SpaceComparison | None = None
    other_space: an.PersonaSpace | None = None
    dataset: str = ""
    n_layers: int = 0


def demo_preferences(forced: bool = True) -> list[an.PreferenceItem]:
    """The demo model's planted preference questions (``personachat.demo``), all phrasings.

    ``forced`` starts every reply with ``My favourite {key} is`` so all personas share the tokens
    after the question (needed for patching); otherwise the answer is found in the free reply.
    """
    from personachat.prompts import demo

    return [
        an.PreferenceItem(
            key=p.key,
            questions=tuple(t.format(key=p.key) for t in demo.PREFERENCE_TEMPLATES),
            answer_prefix=f"My favourite {p.key} is" if forced else "",
            answer_pattern=rf"favourite {p.key} is\s*([^.,!?;]+)",
        )
        for p in demo.PREFERENCES
    ]


@dataclass(frozen=True)
class AnalysisInputs:
    """What one model's analysis runs on: personas, collapse questions, patching questions."""

    dataset: str
    personas: list[Persona]
    items: list[an.PreferenceItem]
    patch_items: list[an.PreferenceItem] | None  # None: patch on ``items``


def default_dataset(model: str) -> str:
    """``demo`` for the bundled demo model (a folder named ``demo``), else ``personas``."""
    return "demo" if Path(str(model)).name == "demo" else "personas"


def analysis_inputs(
    dataset: str, names: Sequence[str] | None = None, *, forced: bool = False
) -> AnalysisInputs:
    """The personas and questions of ``dataset``: ``demo`` is the demo model's planted personas
    and preference questions (patched with the forced reply prefix); any other dataset (built-in
    name or .json/.jsonl file) gives the personas, with ``analysis.default_preferences()``.
    ``names`` keeps only those personas, in that order (ValueError naming unknown ones)."""
    patch_items = None
    if dataset == "demo":
        from personachat.prompts.demo import demo_personas

        personas, items = demo_personas(), demo_preferences(forced=forced)
        patch_items = demo_preferences(forced=True)
    else:
        from personachat.prompts import load_dataset

        personas, items = list(load_dataset(dataset).personas), an.default_preferences()
    if names:
        known = {p.name: p for p in personas}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"unknown personas {missing} in dataset {dataset!r}; known: "
                             f"{sorted(known)}")  # fmt: skip
        personas = [known[n] for n in names]
    return AnalysisInputs(dataset, list(personas), list(items), patch_items)


def stored_vectors(
    store: Any, model_ids: Sequence[str], names: Sequence[str]
) -> list[PersonaVector]:
    """One stored persona vector per name (reply-average ones preferred) of the first of
    ``model_ids`` the store (``personachat.store.Store``) has; [] when it has none of them."""
    have = {m.model_id for m in store.models()}
    model_id = next((m for m in model_ids if m in have), None)
    if model_id is None:
        log.warning("store has no model %s (has %s)", list(model_ids), sorted(have))
        return []
    out = []
    for name in names:
        entries = store.vectors(model_id, name)
        if entries:
            e = next((x for x in entries if x.positions == "response_avg"), entries[0])
            out.append(store.load_vector(model_id, name, positions=e.positions, method=e.method))
    log.info("loaded %d stored vectors of %s", len(out), model_id)
    return out


def _patch_pairs(
    lm: LoadedModel,
    personas: Sequence[Persona],
    collapse: an.CollapseResult,
    items: Sequence[an.PreferenceItem],
    n: int,
) -> list[tuple[Persona, Persona, an.PreferenceItem]]:
    """(A, B, item): B gives its own answer, A the modal one, persona spans of equal length."""
    by_name = {p.name: p for p in personas}
    by_key = {it.key: it for it in items}
    out: list[tuple[Persona, Persona, an.PreferenceItem]] = []
    for q in collapse.questions:
        if not q.distinct_personas or not q.collapsed_personas:
            continue
        item = by_key[q.key]
        question = item.questions[0]
        used = {pair[1].name for pair in out}
        fresh = [n for n in q.distinct_personas if n not in used]
        b = by_name[(fresh or q.distinct_personas)[0]]
        span_b = an.encode_prompt(lm, b, question, item.answer_prefix).persona_span
        same_len = [
            by_name[a]
            for a in q.collapsed_personas
            if an.encode_prompt(lm, by_name[a], question, item.answer_prefix).persona_span == span_b
        ]
        a = same_len[0] if same_len else by_name[q.collapsed_personas[0]]
        out.append((a, b, item))
        if len(out) >= n:
            break
    return out


def analyze_model(
    lm: LoadedModel,
    personas: Sequence[Persona],
    items: Sequence[an.PreferenceItem],
    *,
    vectors: Sequence[PersonaVector] = (),
    compare: tuple[LoadedModel, Sequence[PersonaVector]] | None = None,
    patch_items: Sequence[an.PreferenceItem] | None = None,
    n_patch: int = 2,
    threshold: float = 0.5,
    max_new_tokens: int = 24,
    dataset: str = "",
    progress: bool = True,
) -> ModelAnalysis:
    """Run every analysis on ``lm`` (persona vectors come from the store or, if none are given,
    from the probe's mean question-span activations).

    Collapse is measured on ``items``; the probe and patching use ``patch_items`` (default
    ``items``), whose forced answer prefix makes every persona share the tokens after the
    question, so the ``answer`` position is the one that predicts the answer.
    """
    patch_items = list(patch_items or items)
    collapse = an.persona_collapse(
        lm, personas, items, threshold=threshold, max_new_tokens=max_new_tokens, progress=progress
    )
    late = an.persona_collapse(
        lm, personas, items, threshold=threshold, max_new_tokens=max_new_tokens,
        placement="late", progress=progress,
    )  # fmt: skip
    questions = [q for it in patch_items for q in it.questions]
    prefixes = [it.answer_prefix for it in patch_items for _ in it.questions]
    probe = an.persona_probe(lm, personas, questions, answer_prefix=prefixes, progress=progress)
    space = _space(lm, personas, probe, vectors)
    result = ModelAnalysis(
        model_id=lm.info.model_id, personas=list(personas), items=list(items), collapse=collapse,
        probe=probe, space=space, collapse_late=late, dataset=dataset, n_layers=lm.sites.n_layers,
    )  # fmt: skip
    patch_sites: tuple[Site, ...] = ("residual", "mlp_hidden")
    if lm.sites.attn_out is not None:
        patch_sites += ("attn_heads",)
    for a, b, item in _patch_pairs(lm, personas, collapse, patch_items, n_patch):
        patch = an.activation_patching(
            lm, a, b, item.questions[0], answer_prefix=item.answer_prefix, sites=patch_sites
        )
        result.patching.append(patch)
        if result.circuit is None and not patch.same_answer:
            result.circuit = an.find_circuit(
                lm, a, b, item.questions[0], patch, answer_prefix=item.answer_prefix
            )
    result.contrasts = an.contrasts(collapse, space, late)
    if compare is not None and space is not None:
        other_lm, other_vectors = compare
        other_probe = None
        if not other_vectors:
            other_probe = an.persona_probe(
                other_lm, personas, questions, answer_prefix=prefixes, progress=progress
            )
        other = _space(other_lm, personas, other_probe, other_vectors)
        if other is not None:
            result.other_space = other
            result.comparison = an.compare_spaces(space, other)
    return result


def _space(
    lm: LoadedModel,
    personas: Sequence[Persona],
    probe: an.ProbeResult | None,
    vectors: Sequence[PersonaVector],
) -> an.PersonaSpace | None:
    cats = {p.name: p.category for p in personas}
    try:
        if vectors:
            return an.persona_space(vectors, categories=cats)
        if probe is None or probe.means is None:
            return None
        g = probe.groups.index("question")
        layer = min(lm.sites.n_layers - 1, int(lm.sites.n_layers * 0.65 + 0.5))
        means = {p.name: probe.means[g, i] for i, p in enumerate(personas)}
        return an.persona_space(
            means, layer=layer, categories=cats, model_id=lm.info.model_id,
            source="mean residual over the question tokens (no stored vectors)",
        )  # fmt: skip
    except ValueError as err:
        log.warning("no persona space for %s: %s", lm.info.model_id, err)
        return None


# --------------------------------------------------------------------------------------------
# Findings in words


def _ranges(layers: Sequence[int]) -> str:
    """'2-5, 7' for [2, 3, 4, 5, 7]."""
    if not layers:
        return "none"
    parts, start, prev = [], layers[0], layers[0]
    for la in [*layers[1:], None]:
        if la is not None and la == prev + 1:
            prev = la
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if la is not None:
            start = prev = la
    return ", ".join(parts)


def probe_finding(probe: an.ProbeResult, threshold: float = 0.9) -> str:
    """One sentence per token group: where the persona is decodable, and whether it decays."""
    parts = []
    for group in probe.groups:
        curve = probe.curve(group)
        good = probe.decodable_layers(group, threshold)
        peak, last = float(curve.max()), float(curve[-1])
        trend = "decays" if last < peak - 0.1 else "persists"
        parts.append(
            f"over the {group} tokens the persona is decodable (accuracy >= {threshold}) at layers "
            f"{_ranges(good)}; peak {peak:.2f} at layer {probe.layers[int(curve.argmax())]}, "
            f"{last:.2f} at the last layer ({trend})"
        )
    return f"Probe (chance {probe.chance:.2f}): " + "; ".join(parts) + "."


def collapse_finding(c: an.CollapseResult) -> str:
    qs = c.questions
    collapsed = [q.key for q in qs if q.collapsed]
    share = np.mean([q.modal_share for q in qs]) if qs else float("nan")
    own = sorted({p for q in qs for p in q.distinct_personas})
    return (
        f"Collapse on {len(collapsed)} of {len(qs)} preference questions (placement {c.placement}; "
        f"modal answer shared by >= {c.threshold:.0%} of {len(c.personas)} personas): "
        f"{', '.join(collapsed) or 'none'}. Mean modal share {share:.2f}; personas with an answer "
        f"of their own somewhere: {', '.join(own) or 'none'}. An answer span was found in "
        f"{np.mean([q.answered for q in qs]):.0%} of the replies."
    )


def patching_finding(p: an.PatchingResult) -> str:
    if not p.restored:
        return f"Patching {p.source} -> {p.target}: nothing could be patched ({p.skipped})."
    bits = []
    for (site, group), curve in p.restored.items():
        strong = [la for la, v in zip(p.layers, curve, strict=True) if v >= 0.8]
        bits.append(
            f"{SITE_LABEL.get(site, site)} at the {group} restores >= 0.8 at layers "
            f"{_ranges(strong)} (max {float(np.nanmax(curve)):.2f})"
        )
    same = " (same first answer token: a collapsed pair)" if p.same_answer else ""
    skipped = "".join(f" The {g} group was skipped: {why}." for g, why in p.skipped.items())
    return (
        f"Patching {p.source} -> {p.target} on {p.question!r} ({p.answer_a.strip()!r} vs "
        f"{p.answer_b.strip()!r}{same}, logit difference {p.ld_a:.2f} -> {p.ld_b:.2f}): "
        + "; ".join(bits)
        + "."
        + skipped
    )


def carrying_heads(
    p: an.PatchingResult, group: str, threshold: float = HEAD_THRESHOLD
) -> list[tuple[int, int, float]]:
    """Heads whose single patch at ``group`` restores >= ``threshold``: (layer, head, value)."""
    grid = p.heads.get(group)
    if grid is None:
        return []
    return [t for t in p.top_heads(group, k=grid.size) if t[2] >= threshold]


def heads_finding(p: an.PatchingResult) -> str:
    """Which attention heads carry the persona into the answer, per token group."""
    if not p.heads:
        return f"Per-head patching {p.source} -> {p.target}: not run (no attention-head site)."
    bits = []
    for group in p.heads:
        top = ", ".join(f"a{la}.h{h} {v:.2f}" for la, h, v in p.top_heads(group, k=3))
        carry = carrying_heads(p, group)
        names = ", ".join(f"a{la}.h{h}" for la, h, _ in carry) or "none"
        bits.append(
            f"at the {group}, heads restoring >= {HEAD_THRESHOLD:.1f}: {names} (top: {top})"
        )
    return f"Per-head patching {p.source} -> {p.target}: " + "; ".join(bits) + "."


def circuit_finding(c: an.Circuit) -> str:
    kinds = Counter("head" if s.site == "attn_heads" else "MLP" for s in c.sites)
    parts = ", ".join(f"{n} {k}{'s' if n > 1 else ''}" for k, n in sorted(kinds.items()))
    return (
        f"Circuit: patching {len(c.sites)} site(s) together ({parts}) restores "
        f"{c.restored:.2f} of the answer difference: nodes {c.nodes}."
    )


def handoff_layer(p: an.PatchingResult) -> int | None:
    """First layer where patching the answer position restores more than the persona span."""
    ans = p.restored.get(("residual", "answer"))
    per = p.restored.get(("residual", "persona"))
    if ans is None or per is None:
        return None
    for la, a, b in zip(p.layers, ans, per, strict=True):
        if a > b:
            return la
    return None


def space_finding(s: an.PersonaSpace) -> str:
    rank = s.ranking()
    ratio = s.explained
    return (
        f"Persona space at layer {s.layer} ({s.source}): PC1 explains {ratio[0]:.0%}"
        + (f", PC1-2 {ratio[:2].sum():.0%}" if len(ratio) > 1 else "")
        + f"; most assistant-like: {', '.join(rank[:3])}; furthest from the assistant: "
        f"{', '.join(rank[-3:])}."
    )


def contrasts_finding(c: an.Contrasts) -> str:
    parts = []
    if c.strong:
        parts.append(
            f"strongly different persona pairs agree on {c.mean(c.strong, 'agreement'):.0%} of "
            f"preferences vs {c.mean(c.mild, 'agreement'):.0%} for mildly different pairs "
            f"(next-token JS {c.mean(c.strong, 'token_js'):.3f} vs "
            f"{c.mean(c.mild, 'token_js'):.3f})"
        )
    if c.high_bias:
        parts.append(
            f"modal share {c.share_high_bias:.2f} on high generic-bias preferences "
            f"({', '.join(c.high_bias)}) vs {c.share_low_bias:.2f} on low ({', '.join(c.low_bias)})"
        )
    if c.late is not None:
        parts.append(
            f"persona early (system prompt): {c.early['n_collapsed']:.0f} collapsed, modal share "
            f"{c.early['modal_share']:.2f}, JS {c.early['token_js']:.3f}; late (after the "
            f"question): {c.late['n_collapsed']:.0f} collapsed, modal share "
            f"{c.late['modal_share']:.2f}, JS {c.late['token_js']:.3f}, answers found in "
            f"{c.late['answered']:.0%} of replies (early {c.early['answered']:.0%}), "
            f"{c.late_own_kept:.0%} of the early own answers kept"
        )
    return "Contrasts: " + "; ".join(parts) + "." if parts else "Contrasts: not enough data."


def comparison_finding(c: an.SpaceComparison) -> str:
    return (
        f"{c.model_a} vs {c.model_b} over {len(c.personas)} shared personas: similarity matrices "
        f"correlate (Pearson {c.pearson:.2f}, Spearman {c.spearman:.2f}); assistant-axis ranks "
        f"agree with Spearman {c.axis_spearman:.2f}."
    )


def findings(r: ModelAnalysis) -> list[str]:
    """The key findings as sentences (the report's takeaways)."""
    out = [collapse_finding(r.collapse), probe_finding(r.probe)]
    if r.collapse_late is not None:
        out.append(collapse_finding(r.collapse_late))
    out += [patching_finding(p) for p in r.patching]
    out += [heads_finding(p) for p in r.patching if p.heads]
    if r.circuit is not None:
        out.append(circuit_finding(r.circuit))
    elif r.patching:
        what = "attention heads and MLPs" if any(p.heads for p in r.patching) else "MLPs"
        out.append(
            f"No small set of single {what} restores >= 0.8 of the answer difference: it is "
            "not localised in a few sites."
        )
    if r.space is not None:
        out.append(space_finding(r.space))
    if r.comparison is not None:
        out.append(comparison_finding(r.comparison))
    if r.contrasts is not None:
        out.append(contrasts_finding(r.contrasts))
    return out


# --------------------------------------------------------------------------------------------
# Markdown


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _save(fig: Figure, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=90)
    return f"![{name}]({name})"


def _analysis_text(r: ModelAnalysis) -> list[str]:
    """Interpretation: which of seed 002's hypotheses the numbers support."""
    lines = []
    ans = r.probe.curve("answer")
    per = r.probe.curve("persona")
    n_col = r.collapse.n_collapsed
    if n_col and float(ans.max()) >= 0.9:
        lines.append(
            f"- **Persona is not lost.** The persona is decodable at the answer position "
            f"(up to {float(ans.max()):.2f}) on a model that still collapses on {n_col} "
            f"preference question(s): collapse is not explained by a weak or vanished persona "
            "representation, but by how (little) the answer computation reads it."
        )
    elif n_col:
        lines.append(
            f"- **Persona fades before the answer.** Over the persona text accuracy peaks at "
            f"{float(per.max()):.2f} but at the answer position only {float(ans.max()):.2f}: the "
            "signal does not reach the decision, consistent with the weak/transient hypothesis."
        )
    for p in r.patching:
        hand = handoff_layer(p)
        if hand is not None:
            per = p.restored[("residual", "persona")]
            ans = p.restored[("residual", "answer")]
            i = p.layers.index(hand)
            before = f" (answer position at layer {hand - 1}: {ans[i - 1]:.2f})" if i else ""
            lines.append(
                f"- **Hand-off ({p.source} vs {p.target}).** Patching the persona span restores "
                f"up to {float(per[:i].max()) if i else 0.0:.2f} of the answer difference through "
                f"layer {max(hand - 1, 0)}, while the answer position carries little of it"
                f"{before}; from layer {hand} on ({ans[i]:.2f}) it lives at the answer position: "
                f"attention in layer {hand} reads the persona into the answer position"
                + (
                    " (the last layer, where patching the answer position restores fully by "
                    "construction; the telling number is how little it carries before)."
                    if hand == p.layers[-1]
                    else "."
                )
            )
        mlp = p.restored.get(("mlp_hidden", "persona"))
        res = p.restored.get(("residual", "persona"))
        if mlp is not None and res is not None and float(res.max()) > 0.2:
            j = int(np.argmax(mlp))
            if mlp[j] >= 0.8 * float(res.max()):
                lines.append(
                    f"- **MLP {p.layers[j]} builds the persona signal** ({p.source} vs "
                    f"{p.target}). "
                    f"Patching only MLP {p.layers[j]} over the persona tokens restores "
                    f"{mlp[j]:.2f}, as much as the whole residual stream there "
                    f"({float(res.max()):.2f})."
                )
    c = r.contrasts
    if c is not None and c.high_bias and np.isfinite(c.share_high_bias):
        if abs(c.share_high_bias - c.share_low_bias) < 0.02:
            verdict = (
                "collapse equally: the generic bias does not vary enough across these "
                "preferences to separate them"
            )
        elif c.share_high_bias > c.share_low_bias:
            verdict = "collapse more: a strong default preference overrides the persona"
        else:
            verdict = "collapse less: the default preference's strength does not drive collapse"
        lines.append(
            f"- **Generic prior.** Preferences where the neutral persona is most confident in the "
            f"modal answer {verdict} ({c.share_high_bias:.2f} vs {c.share_low_bias:.2f} modal "
            "share)."
        )
    if c is not None and c.late is not None:
        diff = c.late["modal_share"] - c.early["modal_share"]
        text = (
            f"- **Placement.** Moving the persona after the question changes the mean modal share "
            f"by {diff:+.2f} ({c.early['modal_share']:.2f} -> {c.late['modal_share']:.2f}) and "
            f"keeps {c.late_own_kept:.0%} of the personas' own answers."
        )
        if c.late["answered"] < 0.8 * c.early["answered"]:
            text += (
                f" The lower share is not divergence: late replies name an answer in only "
                f"{c.late['answered']:.0%} of cases (early {c.early['answered']:.0%}); the model "
                "does not adopt a persona stated late and loses the question as well."
            )
        elif np.isfinite(c.late_own_kept) and c.late_own_kept < 0.5:
            text += " A persona stated late is mostly ignored: collapse toward the generic answer."
        lines.append(text)
    for p in r.patching:
        carry = carrying_heads(p, "answer")
        if carry:
            names = ", ".join(f"a{la}.h{h} ({v:.2f})" for la, h, v in carry)
            lines.append(
                f"- **Heads that carry the persona ({p.source} vs {p.target}).** Patching one "
                f"head at the answer position restores >= {HEAD_THRESHOLD:.1f} for {names}: "
                "these heads read the persona into the position that picks the answer."
            )
        elif p.heads:
            lines.append(
                f"- **No single head carries the persona ({p.source} vs {p.target}).** No head "
                f"alone restores >= {HEAD_THRESHOLD:.1f} at the answer position: the persona "
                "reaches it through several heads at once."
            )
    if r.circuit is not None:
        lines.append(
            f"- **Localised.** The answer difference is carried by {r.circuit.nodes} "
            f"(joint restoration {r.circuit.restored:.2f})."
        )
    return lines or ["- Not enough signal for an interpretation (see the results)."]


def write_report(r: ModelAnalysis, out: str | Path) -> Path:
    """Write ``report.md``, its PNG figures, ``results.json`` and (if any) ``circuit.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md: list[str] = [f"# Persona analysis: {r.model_id}", ""]
    md += [
        "## Goal",
        "",
        "*Persona collapse* is when personas with clearly different descriptions give the same "
        "answer to a preference question (favourite dessert, colour, ...). This report asks, for "
        f"`{r.model_id}`, how personas are represented (persona space), whether the persona "
        "signal persists to the answer position or decays (probes), where the persona's "
        "influence enters the answer (activation patching), and whether collapse comes from weak "
        "persona representations, strong generic priors or a bottleneck (controlled contrasts).",
        "",
        "## Data",
        "",
        f"{len(r.personas)} personas{f' from {r.dataset}' if r.dataset else ''}, "
        f"{len(r.items)} preferences asked in "
        f"{sum(len(it.questions) for it in r.items)} phrasings; the model has {r.n_layers} layers.",
        "",
        _table(
            ["persona", "category", "system prompt"],
            [(p.name, p.category, p.system_prompt or "(none)") for p in r.personas],
        ),
        "",
        "Example prompts and answers (greedy):",
        "",
        _table(
            ["persona", "question", "reply", "answer"],
            [(a.persona, a.question, a.text[:90], a.answer) for a in _examples(r.collapse)],
        ),
        "",
        "## Method",
        "",
        "- **Collapse**: each persona answers every phrasing greedily ("
        + (
            "the reply is forced to start with `My favourite X is`; "
            if any(it.answer_prefix for it in r.items)
            else "free replies; "
        )
        + "the answer span is the first clause after `favourite X is`). Per preference: the share "
        "of personas whose most frequent answer is the modal one (collapsed if >= "
        f"{r.collapse.threshold:.0%} and at least two personas), the mean pairwise Jensen-Shannon "
        "divergence (nats) of the next-token distributions at the answer position (token JS) and "
        "of the answer spans over phrasings (span JS). Probes and patching force the reply "
        "prefix `My favourite X is` so all personas share the tokens after the question.",
        "- **Persona signal by layer**: a logistic-regression probe (scikit-learn, standardised "
        f"features, stratified {r.probe.folds}-fold CV) decodes which of the "
        f"{len(r.probe.personas)} personas wrote the prompt from the residual stream at each "
        "layer, mean-pooled over the persona text, the question text, and the answer position.",
        "- **Activation patching**: residual stream (block output), MLP (input of the output "
        "projection, which fixes the MLP output) and attention (input of the attention output "
        "projection `o_proj`, whole or one head's slice of it) of persona B's run are written "
        "into persona A's run, one layer (and head) and token group at a time; the score is the "
        "fraction of the logit difference between B's and A's first answer tokens that the "
        "patch restores (1 = A answers like B). A head *carries the persona* when patching it "
        f"alone restores >= {HEAD_THRESHOLD:.1f}.",
        "- **Circuit**: single heads and MLPs are joined greedily by their single-site score "
        "until their joint patch restores 0.8; nodes are named as in seed 002 (`input`, "
        "`a{layer}.h{head}`, `m{layer}`).",
        "- **Persona space**: cosine similarity of mean-centered persona vectors, PCA, and the "
        "assistant axis (mean of neutral personas minus mean of the others) with each persona's "
        "projection.",
        "- **Contrasts**: persona pairs with the lowest vs highest persona-space cosine; "
        "preferences where the neutral persona gives the modal answer's first token the highest "
        "vs lowest probability (generic bias); persona as system prompt (early) vs appended "
        "after the question (late).",
        "",
        "## Results",
        "",
        "### Persona collapse",
        "",
        collapse_finding(r.collapse),
        "",
        _save(collapse_figure(r.collapse), out, "collapse.png"),
        "",
        _table(
            [
                "preference",
                "modal answer",
                "modal share",
                "distinct answers",
                "token JS",
                "span JS",
                "generic p",
                "collapsed",
                "own answers",
            ],
            [
                (
                    q.key,
                    q.modal_answer,
                    q.modal_share,
                    q.n_distinct,
                    q.token_js,
                    q.span_js,
                    q.generic_prob,
                    "yes" if q.collapsed else "no",
                    ", ".join(f"{p}: {q.answers[p]}" for p in q.distinct_personas),
                )
                for q in r.collapse.questions
            ],
        ),
        "",
        "### Persona signal by layer",
        "",
        probe_finding(r.probe),
        "",
        _save(probe_figure(r.probe), out, "probe.png"),
        "",
        _table(
            ["layer", *r.probe.groups],
            [
                (la, *[float(r.probe.accuracy[g, i]) for g in range(len(r.probe.groups))])
                for i, la in enumerate(r.probe.layers)
            ],
        ),
        "",
    ]
    md += ["### Activation patching", ""]
    for i, p in enumerate(r.patching):
        md += [patching_finding(p), "", _save(patching_figure(p), out, f"patching_{i}.png"), ""]
        if p.heads:
            md += [heads_finding(p), "", _save(heads_figure(p), out, f"heads_{i}.png"), ""]
    if not r.patching:
        md += ["No persona pair with different answers to patch.", ""]
    if r.circuit is not None:
        (out / "circuit.json").write_text(json.dumps(r.circuit.to_json(), indent=2) + "\n")
        md += [f"Circuit (`circuit.json`): `{json.dumps(r.circuit.to_json())}`", ""]
    if r.space is not None:
        md += [
            "### Persona space",
            "",
            space_finding(r.space),
            "",
            _save(persona_space_figure(r.space), out, "persona_space.png"),
            "",
            _save(axis_figure(r.space), out, "assistant_axis.png"),
            "",
        ]
    if r.comparison is not None and r.space is not None and r.other_space is not None:
        md += [
            "### Cross-model comparison",
            "",
            comparison_finding(r.comparison),
            "",
            _save(comparison_figure(r.comparison, r.space, r.other_space), out, "comparison.png"),
            "",
        ]
    if r.contrasts is not None:
        md += [
            "### Controlled contrasts",
            "",
            contrasts_finding(r.contrasts),
            "",
            _save(contrasts_figure(r.contrasts), out, "contrasts.png"),
            "",
        ]
    if r.collapse_late is not None:
        md += [collapse_finding(r.collapse_late), ""]
    md += ["## Analysis", "", *_analysis_text(r), ""]
    md += [
        "## Next steps",
        "",
        "- Path patching from the persona-carrying heads' sources (which persona tokens they "
        "attend to) and ablating those heads on collapsed preferences, to test whether they "
        "are the bottleneck.",
        "- Steer with the persona vector at the hand-off layer only on collapsed preferences and "
        "measure whether the persona's own answer appears (control vs collapse).",
        "- Repeat on instruction-tuned vs base variants of one family (cross-model comparison) "
        "to see whether tuning strengthens the generic prior.",
        "",
        "## Takeaways",
        "",
        *[f"- {f}" for f in findings(r)],
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps(results_json(r), indent=2) + "\n")
    return path


def _examples(c: an.CollapseResult, n: int = 8) -> list[an.Answer]:
    """A few answers: one per persona on the first phrasing of the first preference."""
    if not c.answers:
        return []
    first = c.answers[0].question
    return [a for a in c.answers if a.question == first][:n]


def results_json(r: ModelAnalysis) -> dict[str, Any]:
    """The report's numbers as plain JSON (for comparisons across runs)."""
    return {
        "model_id": r.model_id,
        "collapse": {
            q.key: {
                "modal_answer": q.modal_answer, "modal_share": q.modal_share,
                "collapsed": q.collapsed, "token_js": q.token_js, "span_js": q.span_js,
                "generic_prob": None if not np.isfinite(q.generic_prob) else q.generic_prob,
                "answers": q.answers,
            }
            for q in r.collapse.questions
        },
        "probe": {
            g: [round(float(v), 4) for v in r.probe.curve(g)] for g in r.probe.groups
        },
        "patching": [
            {"target": p.target, "source": p.source, "question": p.question,
             "restored": {f"{s}@{g}": [round(float(v), 4) for v in c]
                          for (s, g), c in p.restored.items()},
             "heads": {g: [[round(float(v), 4) for v in row] for row in grid]
                       for g, grid in p.heads.items()}}
            for p in r.patching
        ],
        "circuit": r.circuit.to_json() if r.circuit else None,
        "findings": findings(r),
    }  # fmt: skip
