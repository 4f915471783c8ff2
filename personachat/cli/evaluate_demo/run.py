"""The evaluation end to end: load the model, measure the chosen sections, merge an earlier run,
write ``results.json`` and ``eval.png`` and print the tables."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from personachat.cli.evaluate_demo.ablation import ablation
from personachat.cli.evaluate_demo.capping import capping
from personachat.cli.evaluate_demo.conditioning import collapse, conditioning
from personachat.cli.evaluate_demo.config import SECTIONS, EvalConfig, parse_args
from personachat.cli.evaluate_demo.merge import carried_over, merged_ablation
from personachat.cli.evaluate_demo.plots import plot, plot_capping
from personachat.cli.evaluate_demo.replies import Asker
from personachat.cli.evaluate_demo.report import print_report
from personachat.cli.evaluate_demo.steering import steering
from personachat.cli.evaluate_demo.vectors import best_layers, vectors_by_kind
from personachat.model import LoadedModel, load_model
from personachat.prompts import demo


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    sections = cfg.sections
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {SECTIONS}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(cfg.model)
    qs = demo.eval_questions(1)[: cfg.n_questions]
    start = time.monotonic()
    results: dict[str, Any] = {"config": asdict(cfg), "questions": [q.text for q in qs]}
    old: dict[str, Any] = {}
    if cfg.merge:  # keep the sections (and parts) this run does not redo, and their config
        old = json.loads(Path(cfg.merge).read_text())
        results.update(carried_over(old, sections))
    results.update(measure(lm, qs, cfg, old))
    results["seconds"] = time.monotonic() - start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "eval.png")  # nothing is drawn without its sections
    if "capping" in results:
        plot_capping(results["capping"], out / "capping.png")
    print_report(results)
    written = ", ".join(str(p) for p in sorted(out.glob("*")) if p.suffix in (".json", ".png"))
    print(f"\nwrote {written} in {results['seconds']:.0f}s")
    return 0


def measure(
    lm: LoadedModel, qs: Sequence[demo.Question], cfg: EvalConfig, old: dict[str, Any]
) -> dict[str, Any]:
    """The sections of ``cfg.sections``, on the held-out questions ``qs`` (conditioning: on one
    held-out question per topic); ``old``: an earlier run's results, whose ablation rows this run
    does not redo are kept."""
    sections = cfg.sections
    results: dict[str, Any] = {}
    if "conditioning" in sections:
        results["conditioning"] = conditioning(
            Asker.of(lm, demo.eval_questions(1), cfg.max_new_tokens)
        )
    if "collapse" in sections:
        results["collapse"] = collapse(lm, cfg.max_new_tokens)
    if "capping" in sections:
        data = demo.planted_dataset(cfg.n_extract_questions, cfg.seed)
        others = [p for p in demo.PERSONA_NAMES if p != demo.DEFAULT_PERSONA]
        results["capping"] = capping(Asker.of(lm, qs, cfg.max_new_tokens), data, others)
    if "steering" in sections or "ablation" in sections:
        data = demo.planted_dataset(cfg.n_extract_questions, cfg.seed)
        vecs = vectors_by_kind(lm, data)
        results["vector_best_layers"] = best_layers(vecs)
        ask = Asker.of(lm, qs, cfg.max_new_tokens)
        if "steering" in sections:
            results["steering"] = steering(ask, vecs, cfg)
        if "ablation" in sections:
            new = ablation(ask, data, vecs, cfg)
            results["ablation"] = merged_ablation(old.get("ablation", {}), new, cfg.methods)
    return results
