"""The per-model persona-analysis report: ``report.md`` with PNG figures, tables and findings.

``write_report`` writes the sections goal, data, method, results, analysis, next steps and
takeaways, stating the findings in words, plus ``results.json`` (the numbers) and, when a circuit
was found, ``circuit.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from personachat.analysis.answers import Answer
from personachat.analysis.collapse import CollapseResult
from personachat.analysis.figures import (
    axis_figure,
    collapse_figure,
    comparison_figure,
    contrasts_figure,
    heads_figure,
    patching_figure,
    persona_space_figure,
    probe_figure,
)
from personachat.analysis.findings import (
    HEAD_THRESHOLD,
    collapse_finding,
    comparison_finding,
    contrasts_finding,
    findings,
    heads_finding,
    patching_finding,
    probe_finding,
    space_finding,
)
from personachat.analysis.interpretation import interpretation
from personachat.analysis.run import ModelAnalysis


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


def write_report(r: ModelAnalysis, out: str | Path) -> Path:
    """Write ``report.md``, its PNG figures, ``results.json`` and (if any) ``circuit.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md: list[str] = [f"# Persona analysis: {r.model_id}", ""]
    md += _goal(r) + _data(r) + _method(r)
    md += ["## Results", ""]
    md += _collapse_results(r, out) + _probe_results(r, out) + _patching_results(r, out)
    md += _space_results(r, out) + _comparison_results(r, out) + _contrasts_results(r, out)
    if r.collapse_late is not None:
        md += [collapse_finding(r.collapse_late), ""]
    md += ["## Analysis", "", *interpretation(r), ""]
    md += _next_steps() + _takeaways(r)
    path = out / "report.md"
    path.write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps(results_json(r), indent=2) + "\n")
    return path


def _goal(r: ModelAnalysis) -> list[str]:
    """What persona collapse is and the questions this report asks about it."""
    return [
        "## Goal",
        "",
        "*Persona collapse* is when personas with clearly different descriptions give the same "
        "answer to a preference question (favourite dessert, colour, ...). This report asks, for "
        f"`{r.model_id}`, how personas are represented (persona space), whether the persona "
        "signal persists to the answer position or decays (probes), where the persona's "
        "influence enters the answer (activation patching), and whether collapse comes from weak "
        "persona representations, strong generic priors or a bottleneck (controlled contrasts).",
        "",
    ]


def _data(r: ModelAnalysis) -> list[str]:
    """The personas and preferences, with a few example prompts and answers."""
    return [
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
    ]


def _method(r: ModelAnalysis) -> list[str]:
    """How each analysis measures what it reports."""
    return [
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
        "until their joint patch restores 0.8; nodes are named `input`, `a{layer}.h{head}` "
        "(an attention head) and `m{layer}` (an MLP).",
        "- **Persona space**: cosine similarity of mean-centered persona vectors, PCA, and the "
        "assistant axis (mean of neutral personas minus mean of the others) with each persona's "
        "projection.",
        "- **Contrasts**: persona pairs with the lowest vs highest persona-space cosine; "
        "preferences where the neutral persona gives the modal answer's first token the highest "
        "vs lowest probability (generic bias); persona as system prompt (early) vs appended "
        "after the question (late).",
        "",
    ]


def _collapse_results(r: ModelAnalysis, out: Path) -> list[str]:
    """Collapse per preference: finding, figure and table."""
    return [
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
    ]


def _probe_results(r: ModelAnalysis, out: Path) -> list[str]:
    """Probe accuracy by layer and token group: finding, figure and table."""
    return [
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


def _patching_results(r: ModelAnalysis, out: Path) -> list[str]:
    """Each patched pair (and its heads), then the circuit, which is also written as JSON."""
    md = ["### Activation patching", ""]
    for i, p in enumerate(r.patching):
        md += [patching_finding(p), "", _save(patching_figure(p), out, f"patching_{i}.png"), ""]
        if p.heads:
            md += [heads_finding(p), "", _save(heads_figure(p), out, f"heads_{i}.png"), ""]
    if not r.patching:
        md += ["No persona pair with different answers to patch.", ""]
    if r.circuit is not None:
        (out / "circuit.json").write_text(json.dumps(r.circuit.to_json(), indent=2) + "\n")
        md += [f"Circuit (`circuit.json`): `{json.dumps(r.circuit.to_json())}`", ""]
    return md


def _space_results(r: ModelAnalysis, out: Path) -> list[str]:
    if r.space is None:
        return []
    return [
        "### Persona space",
        "",
        space_finding(r.space),
        "",
        _save(persona_space_figure(r.space), out, "persona_space.png"),
        "",
        _save(axis_figure(r.space), out, "assistant_axis.png"),
        "",
    ]


def _comparison_results(r: ModelAnalysis, out: Path) -> list[str]:
    if r.comparison is None or r.space is None or r.other_space is None:
        return []
    return [
        "### Cross-model comparison",
        "",
        comparison_finding(r.comparison),
        "",
        _save(comparison_figure(r.comparison, r.space, r.other_space), out, "comparison.png"),
        "",
    ]


def _contrasts_results(r: ModelAnalysis, out: Path) -> list[str]:
    if r.contrasts is None:
        return []
    return [
        "### Controlled contrasts",
        "",
        contrasts_finding(r.contrasts),
        "",
        _save(contrasts_figure(r.contrasts), out, "contrasts.png"),
        "",
    ]


def _next_steps() -> list[str]:
    return [
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
    ]


def _takeaways(r: ModelAnalysis) -> list[str]:
    return [
        "## Takeaways",
        "",
        *[f"- {f}" for f in findings(r)],
        "",
    ]


def _examples(c: CollapseResult, n: int = 8) -> list[Answer]:
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
                "modal_answer": q.modal_answer,
                "modal_share": q.modal_share,
                "collapsed": q.collapsed,
                "token_js": q.token_js,
                "span_js": q.span_js,
                "generic_prob": None if not np.isfinite(q.generic_prob) else q.generic_prob,
                "answers": q.answers,
            }
            for q in r.collapse.questions
        },
        "probe": {g: [round(float(v), 4) for v in r.probe.curve(g)] for g in r.probe.groups},
        "patching": [
            {
                "target": p.target,
                "source": p.source,
                "question": p.question,
                "restored": {
                    f"{s}@{g}": [round(float(v), 4) for v in c] for (s, g), c in p.restored.items()
                },
                "heads": {
                    g: [[round(float(v), 4) for v in row] for row in grid]
                    for g, grid in p.heads.items()
                },
            }
            for p in r.patching
        ],
        "circuit": r.circuit.to_json() if r.circuit else None,
        "findings": findings(r),
    }
