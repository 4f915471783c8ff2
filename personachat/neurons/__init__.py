"""Persona neurons: score MLP units for contrast pairs and pick persona-specific sets.

Four scoring methods (``records.NEURON_METHODS``), one module each:

- ``effect`` (``effect.py``): standardized effect of each unit's pooled activation, high persona
  vs low persona, over many prompts: (mean_high - mean_low) / pooled std (Cohen's d). Ranked by
  ``|d|``.
- ``attribution`` (``attribution.py``): activation x gradient of the log-probability of the
  persona's own reply, summed over every token of the conversation (the first-order change in
  log-prob if the unit were zeroed, negated), averaged over the persona's samples; the pair's
  score is ``attr(high) - attr(low)``: units that support the high persona's replies more than
  the low persona's. Ranked by the signed score, largest first.
- ``patching`` (``patching.py``): attribution patching at the decision: at the last prompt
  position (where the reply's first token is chosen), ``(a_high - a_low) x d logodds / d a``,
  averaged over the questions, where ``logodds`` is the high persona's log-odds of opening its
  reply the way it does (any first token of its replies vs every other token). It estimates how
  much patching the unit to its value under the low persona's prompt would take away. Only units
  the high persona turns up (mean ``a_high - a_low > 0``) are kept. The set's means are the low
  persona's values there, so ``AblationSpec(mode="mean", positions="prompt")`` is that patch. A
  model whose style, once started, carries itself through the reply is steered by its first
  tokens: units found over the whole reply then change nothing (see the demo model's card).
- ``exact`` (``exact.py``, on the patched forward of ``decision.py``): exact activation patching
  at the same place, unit by unit: each unit set to the low persona's mean there, the drop of the
  high persona's log-odds minus the mean drop of every other persona's (their own openers, under
  their own prompts). The set's order is then chosen greedily, units patched together, so that
  the high persona stops opening its way while no other persona does (``exact_selection``).
  Slower (a forward per unit of the chosen layers) but not fooled where the log-odds is far from
  linear in a unit, as in layer 0 of the demo model, whose patching sets miss 7 of its 11
  personas. Meant for ``AblationSpec(mode="mean", positions="prompt", last_n=1)``.

Sets are labelled ``{pair or kind}.{site}.{method}`` (``teacher_student.gate.effect``) and built
by ``sets.neuron_sets``: cross-pair stability keeps, for pairs of the same ``kind``, each unit's
rank (0 = best) in every pair (``NeuronSet.ranks``), with the fraction of those pairs that have it
in their top k. Gradients are taken with ``torch.autograd.grad`` on activations captured by a
``hooks.intervene`` handler; no hook is registered here.
"""

from __future__ import annotations

from personachat.neurons.attribution import attribution_sums
from personachat.neurons.effect import standardized_effect
from personachat.neurons.exact import exact_selection
from personachat.neurons.patching import patching_scores, patching_sums
from personachat.neurons.sets import neuron_sets, ranks, top_units

__all__ = [
    "attribution_sums",
    "exact_selection",
    "neuron_sets",
    "patching_scores",
    "patching_sums",
    "ranks",
    "standardized_effect",
    "top_units",
]
