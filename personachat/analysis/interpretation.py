"""The report's interpretation: which hypotheses about persona collapse the numbers support.

Each piece reads one result and returns its bullet line (or none when the numbers say nothing):
whether the persona is still decodable where the answer is chosen, where patching hands the
persona over to the answer position, whether one MLP builds the persona signal, whether a strong
generic prior or a late persona goes with more collapse, which heads carry the persona, and
whether a small circuit carries the answer difference.
"""

from __future__ import annotations

import numpy as np

from personachat.analysis.circuit import Circuit
from personachat.analysis.contrasts import Contrasts
from personachat.analysis.findings import HEAD_THRESHOLD, carrying_heads, handoff_layer
from personachat.analysis.patching import PatchingResult
from personachat.analysis.run import ModelAnalysis


def interpretation(r: ModelAnalysis) -> list[str]:
    """The report's Analysis section as Markdown bullets: which hypotheses the numbers support."""
    lines = _persona_signal(r)
    for p in r.patching:
        lines += _handoff(p) + _mlp_builds(p)
    if r.contrasts is not None:
        lines += _generic_prior(r.contrasts) + _placement(r.contrasts)
    for p in r.patching:
        lines += _heads(p)
    if r.circuit is not None:
        lines += _localised(r.circuit)
    return lines or ["- Not enough signal for an interpretation (see the results)."]


def _persona_signal(r: ModelAnalysis) -> list[str]:
    """Collapse with the persona still decodable at the answer position, or faded before it."""
    ans = r.probe.curve("answer")
    per = r.probe.curve("persona")
    n_col = r.collapse.n_collapsed
    if n_col and float(ans.max()) >= 0.9:
        return [
            f"- **Persona is not lost.** The persona is decodable at the answer position "
            f"(up to {float(ans.max()):.2f}) on a model that still collapses on {n_col} "
            f"preference question(s): collapse is not explained by a weak or vanished persona "
            "representation, but by how (little) the answer computation reads it."
        ]
    if n_col:
        return [
            f"- **Persona fades before the answer.** Over the persona text accuracy peaks at "
            f"{float(per.max()):.2f} but at the answer position only {float(ans.max()):.2f}: the "
            "signal does not reach the decision, consistent with the weak/transient hypothesis."
        ]
    return []


def _handoff(p: PatchingResult) -> list[str]:
    """The layer from which the persona's effect lives at the answer position, not the persona."""
    hand = handoff_layer(p)
    if hand is None:
        return []
    per = p.restored[("residual", "persona")]
    ans = p.restored[("residual", "answer")]
    i = p.layers.index(hand)
    before = f" (answer position at layer {hand - 1}: {ans[i - 1]:.2f})" if i else ""
    return [
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
    ]


def _mlp_builds(p: PatchingResult) -> list[str]:
    """One MLP over the persona tokens restoring as much as the whole residual stream there."""
    mlp = p.restored.get(("mlp_hidden", "persona"))
    res = p.restored.get(("residual", "persona"))
    if mlp is not None and res is not None and float(res.max()) > 0.2:
        j = int(np.argmax(mlp))
        if mlp[j] >= 0.8 * float(res.max()):
            return [
                f"- **MLP {p.layers[j]} builds the persona signal** ({p.source} vs "
                f"{p.target}). "
                f"Patching only MLP {p.layers[j]} over the persona tokens restores "
                f"{mlp[j]:.2f}, as much as the whole residual stream there "
                f"({float(res.max()):.2f})."
            ]
    return []


def _generic_prior(c: Contrasts) -> list[str]:
    """Whether preferences with a strong default answer collapse more than the others."""
    if not c.high_bias or not np.isfinite(c.share_high_bias):
        return []
    if abs(c.share_high_bias - c.share_low_bias) < 0.02:
        verdict = (
            "collapse equally: the generic bias does not vary enough across these "
            "preferences to separate them"
        )
    elif c.share_high_bias > c.share_low_bias:
        verdict = "collapse more: a strong default preference overrides the persona"
    else:
        verdict = "collapse less: the default preference's strength does not drive collapse"
    return [
        f"- **Generic prior.** Preferences where the neutral persona is most confident in the "
        f"modal answer {verdict} ({c.share_high_bias:.2f} vs {c.share_low_bias:.2f} modal "
        "share)."
    ]


def _placement(c: Contrasts) -> list[str]:
    """What moving the persona after the question does to collapse and to the own answers."""
    if c.late is None:
        return []
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
    return [text]


def _heads(p: PatchingResult) -> list[str]:
    """The heads that alone carry the persona into the answer position, or that none does."""
    carry = carrying_heads(p, "answer")
    if carry:
        names = ", ".join(f"a{la}.h{h} ({v:.2f})" for la, h, v in carry)
        return [
            f"- **Heads that carry the persona ({p.source} vs {p.target}).** Patching one "
            f"head at the answer position restores >= {HEAD_THRESHOLD:.1f} for {names}: "
            "these heads read the persona into the position that picks the answer."
        ]
    if p.heads:
        return [
            f"- **No single head carries the persona ({p.source} vs {p.target}).** No head "
            f"alone restores >= {HEAD_THRESHOLD:.1f} at the answer position: the persona "
            "reaches it through several heads at once."
        ]
    return []


def _localised(circuit: Circuit) -> list[str]:
    return [
        f"- **Localised.** The answer difference is carried by {circuit.nodes} "
        f"(joint restoration {circuit.restored:.2f})."
    ]
