"""The findings of one model's analysis, stated in words: one sentence per result."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from personachat.analysis.circuit import Circuit
from personachat.analysis.collapse import CollapseResult
from personachat.analysis.contrasts import Contrasts
from personachat.analysis.patching import SITE_LABEL, PatchingResult
from personachat.analysis.probes import ProbeResult
from personachat.analysis.run import ModelAnalysis
from personachat.analysis.space import PersonaSpace, SpaceComparison

HEAD_THRESHOLD = 0.2  # a head "carries the persona" when patching it alone restores this much


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


def probe_finding(probe: ProbeResult, threshold: float = 0.9) -> str:
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


def collapse_finding(c: CollapseResult) -> str:
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


def patching_finding(p: PatchingResult) -> str:
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
    p: PatchingResult, group: str, threshold: float = HEAD_THRESHOLD
) -> list[tuple[int, int, float]]:
    """Heads whose single patch at ``group`` restores >= ``threshold``: (layer, head, value)."""
    grid = p.heads.get(group)
    if grid is None:
        return []
    return [t for t in p.top_heads(group, k=grid.size) if t[2] >= threshold]


def heads_finding(p: PatchingResult) -> str:
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


def circuit_finding(c: Circuit) -> str:
    kinds = Counter("head" if s.site == "attn_heads" else "MLP" for s in c.sites)
    parts = ", ".join(f"{n} {k}{'s' if n > 1 else ''}" for k, n in sorted(kinds.items()))
    return (
        f"Circuit: patching {len(c.sites)} site(s) together ({parts}) restores "
        f"{c.restored:.2f} of the answer difference: nodes {c.nodes}."
    )


def handoff_layer(p: PatchingResult) -> int | None:
    """First layer where patching the answer position restores more than the persona span."""
    ans = p.restored.get(("residual", "answer"))
    per = p.restored.get(("residual", "persona"))
    if ans is None or per is None:
        return None
    for la, a, b in zip(p.layers, ans, per, strict=True):
        if a > b:
            return la
    return None


def space_finding(s: PersonaSpace) -> str:
    rank = s.ranking()
    ratio = s.explained
    return (
        f"Persona space at layer {s.layer} ({s.source}): PC1 explains {ratio[0]:.0%}"
        + (f", PC1-2 {ratio[:2].sum():.0%}" if len(ratio) > 1 else "")
        + f"; most assistant-like: {', '.join(rank[:3])}; furthest from the assistant: "
        f"{', '.join(rank[-3:])}."
    )


def contrasts_finding(c: Contrasts) -> str:
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


def comparison_finding(c: SpaceComparison) -> str:
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
