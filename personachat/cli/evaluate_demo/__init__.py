"""Measure the bundled demo model: conditioning, persona collapse, steering and ablation.

The code behind ``python scripts/evaluate_demo.py``. It prints one table per section and writes
``results.json`` and ``eval.png`` to ``--out`` (default ``store/models/demo/eval``). All replies
are greedy, on held-out questions, scored with ``personachat.prompts.demo`` (style markers
present; the topic's fact key phrases present).

- Conditioning (``conditioning``): each persona's own markers under its own system prompt vs
  under the others.
- Persona collapse (``conditioning``): share of each persona's answers to held-out favourite-X
  questions that are the generic answer.
- Steering (``steering``) from the default persona (no system prompt) with persona P's vector,
  extracted by ``personachat.pipeline.extract_vectors`` from the planted replies of training
  questions (``vectors``): response-average and question-span vectors, added at all / prompt /
  generated positions, per layer and strength, for every target; the best setting per kind and
  positions is the one whose worst target does best. Negative strength under P's own prompt.
- Ablation (``ablation``, ``neurons``) under P's own prompt: top-k units of each neuron method vs
  k random units at the same layers, ablated the way the method's sets are meant to be (exact:
  set to the default persona's values at the last prompt token, and on the whole prompt;
  patching: on the prompt; attribution and effect: zeroed everywhere), with ``--others`` other
  personas under their own prompts and P's units ablated; and directional ablation (to the
  baseline's mean level or to zero, on the prompt or everywhere, at layer 0 or all layers).
  ``--methods`` and ``--parts`` narrow it; ``--merge results.json`` keeps what this run does not
  redo (``merge``).

``replies`` generates and scores, ``report`` prints the tables, ``plots`` draws ``eval.png``,
``run`` ties it together.
"""

from __future__ import annotations

from personachat.cli.evaluate_demo.config import EvalConfig, parse_args
from personachat.cli.evaluate_demo.merge import carried_over, merged_ablation
from personachat.cli.evaluate_demo.plots import plot
from personachat.cli.evaluate_demo.report import print_report
from personachat.cli.evaluate_demo.run import main
from personachat.cli.evaluate_demo.steering import best_settings

__all__ = [
    "EvalConfig",
    "best_settings",
    "carried_over",
    "main",
    "merged_ablation",
    "parse_args",
    "plot",
    "print_report",
]
