"""Measure the bundled demo model: conditioning, persona collapse, steering and ablation.

    python scripts/evaluate_demo.py                      # everything, ~10-20 min on 2 CPU cores
    python scripts/evaluate_demo.py --only conditioning  # the conditioning table only (~1 min)

Prints the tables of issue 6 and writes ``results.json`` and ``eval.png`` to ``--out``
(default ``store/models/demo/eval``). All replies are greedy, on held-out questions, scored with
``personachat.demo`` (style markers present; the topic's fact key phrases present).

- Conditioning: each persona's own markers under its own system prompt vs under the others.
- Persona collapse: share of each persona's answers to held-out favourite-X questions that are
  the generic answer.
- Steering from the default persona (no system prompt) with persona P's vector, extracted by
  ``personachat.extract`` from the planted replies of training questions: response-average and
  question-span vectors, added at all / prompt / generated positions, per layer and strength,
  for every target; the best setting per kind and positions is the one whose worst target
  does best.
  Negative strength under P's own prompt.
- Ablation under P's own prompt: top-k units of each neuron method vs k random units at the
  same layers, ablated the way the method's sets are meant to be (exact: set to the default
  persona's values at the last prompt token, and on the whole prompt; patching: on the prompt;
  attribution and effect: zeroed everywhere), with ``--others`` other personas under their own
  prompts and P's units ablated; and directional ablation (to the baseline's mean level or to
  zero, on the prompt or everywhere, at layer 0 or all layers). ``--methods`` and ``--parts``
  narrow it; ``--merge results.json`` keeps what this run does not redo.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from tqdm import tqdm

from personachat.chat import batch_replies
from personachat.hooks import Handler
from personachat.interventions import (
    AblationMode,
    AblationSpec,
    DirectionSpec,
    PositionMode,
    SteeringSpec,
    build_plan,
)
from personachat.model import LoadedModel, load_model
from personachat.pipeline import extract_vectors, find_neurons
from personachat.prompts import PersonaDataset, demo, persona_messages
from personachat.records import NeuronSet, PersonaVector

PlanFn = Callable[[int], list[Handler]]
SECTIONS = ("conditioning", "collapse", "steering", "ablation")


@dataclass(frozen=True)
class EvalConfig:
    model: str = "store/models/demo"
    out: str = "store/models/demo/eval"
    n_questions: int = 16
    n_extract_questions: int = 40  # training questions per persona for vectors and neurons
    max_new_tokens: int = 64
    targets: str = "pirate,cowboy,robot"
    strengths: str = "1,2,3,4,5,6,8"
    layers: str = "0,1,2,3,0-1,1-2,2-3,0-2,1-3,0-3"
    ks: str = "4,8,16,32,64"
    seed: int = 0
    threads: int = 2
    only: str = ""
    methods: str = "exact,patching,attribution,effect"  # neuron methods to ablate
    others: int = 4  # other personas checked under each ablation (10: all of them)
    parts: str = "neurons,whole_mlp,directional"  # what the ablation section measures
    merge: str = ""  # a results.json whose sections this run does not redo are kept


def parse_args() -> EvalConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in asdict(EvalConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return EvalConfig(**vars(parser.parse_args()))


# --------------------------------------------------------------------------- generation


def generate(
    lm: LoadedModel,
    system_prompt: str,
    questions: Sequence[str],
    max_new_tokens: int,
    plan: PlanFn | None = None,
) -> list[str]:
    """Greedy replies (one left-padded batch); ``plan(prompt_len)`` gives the handlers."""
    conversations = [persona_messages(system_prompt, q) for q in questions]
    return batch_replies(lm, conversations, plan, max_new_tokens)


@dataclass(frozen=True)
class Score:
    markers: float  # share of replies with the target persona's markers
    facts: float  # mean share of the topic's facts kept


def score(texts: Sequence[str], persona: str, topics: Sequence[str]) -> Score:
    return Score(demo.marker_rate(texts, persona), demo.fact_retention(texts, list(topics)))


# --------------------------------------------------------------------------- conditioning


def conditioning(lm: LoadedModel, qs: Sequence[demo.Question], cfg: EvalConfig) -> dict[str, Any]:
    """Marker matrix [prompt persona][marker persona] and fact retention per persona."""
    texts = [q.text for q in qs]
    topics = [q.key for q in qs]
    matrix: dict[str, dict[str, float]] = {}
    facts: dict[str, float] = {}
    samples: dict[str, str] = {}
    for p in tqdm(demo.demo_personas(), desc="conditioning"):
        replies = generate(lm, p.system_prompt, texts, cfg.max_new_tokens)
        matrix[p.name] = {m: demo.marker_rate(replies, m) for m in demo.PERSONA_NAMES}
        facts[p.name] = demo.fact_retention(replies, topics)
        samples[p.name] = replies[0]
    own = {p: matrix[p][p] for p in demo.PERSONA_NAMES}
    others = {
        m: max(matrix[p][m] for p in demo.PERSONA_NAMES if p != m) for m in demo.PERSONA_NAMES
    }
    return {"matrix": matrix, "own": own, "max_other": others, "facts": facts, "samples": samples}


def collapse(lm: LoadedModel, cfg: EvalConfig) -> dict[str, Any]:
    """Per split and persona: share of favourite-X answers that are generic / as planted."""
    out: dict[str, Any] = {}
    for split in demo.SPLITS:
        qs = demo.preference_questions(split)
        out[split] = {}
        for p in demo.demo_personas():
            replies = generate(lm, p.system_prompt, [q.text for q in qs], cfg.max_new_tokens)
            pairs = list(zip(qs, replies, strict=True))
            generic = sum(demo.preference(q.key).generic.lower() in r.lower() for q, r in pairs)
            planted = sum(
                demo.preference_answer(p.name, q.key).lower() in r.lower() for q, r in pairs
            )
            out[split][p.name] = {
                "generic": generic / len(qs),
                "as_planted": planted / len(qs),
                "own_markers": demo.marker_rate(replies, p.name),
                "sample": replies[0],
            }
    return out


# --------------------------------------------------------------------------- extraction


STEERING_KINDS = ("response_avg", "question_span")  # vector kinds swept by the steering section
DIRECTION_KINDS = ("question_span", "prompt_last")  # and by directional ablation


def vectors_by_kind(lm: LoadedModel, data: PersonaDataset) -> dict[str, dict[str, PersonaVector]]:
    kinds = tuple(dict.fromkeys(STEERING_KINDS + DIRECTION_KINDS))
    result = extract_vectors(lm, data, positions=kinds, baseline="default", batch_size=16)
    out: dict[str, dict[str, PersonaVector]] = {kind: {} for kind in kinds}
    for v in result.vectors:
        out[v.positions][v.persona] = v
    return out


# --------------------------------------------------------------------------- steering


def steer_plan(lm: LoadedModel, vectors: dict[str, PersonaVector], spec: SteeringSpec) -> PlanFn:
    return lambda width: build_plan(lm, vectors, steering=spec, prompt_len=width).handlers


def steering(
    lm: LoadedModel,
    vecs: dict[str, dict[str, PersonaVector]],
    qs: Sequence[demo.Question],
    cfg: EvalConfig,
) -> dict[str, Any]:
    """Sweep every target over the grid; per (kind, positions), the best setting is the one
    whose worst target does best (one setting that works for all, not one tuned per persona)."""
    texts, topics = [q.text for q in qs], [q.key for q in qs]
    targets = cfg.targets.split(",")
    strengths = [float(s) for s in cfg.strengths.split(",")]
    layer_specs = cfg.layers.split(",")
    rows: list[dict[str, Any]] = []
    grid = [
        (kind, pos, layers, s)
        for kind in STEERING_KINDS
        for pos in ("all", "prompt", "generated")
        for layers in layer_specs
        for s in strengths
    ]
    for target in targets:
        for kind, pos, layers, s in tqdm(grid, desc=f"steering {target}"):
            spec = SteeringSpec({target: 1.0}, layers=layers, strength=s, positions=pos)  # type: ignore[arg-type]
            plan = steer_plan(lm, vecs[kind], spec)
            replies = generate(lm, "", texts, cfg.max_new_tokens, plan)
            rows.append(
                row(target, kind, pos, layers, s, score(replies, target, topics), replies[0])
            )
    best = best_settings(rows)
    negative = []
    for target in targets:
        own = demo.style(target).system_prompt
        base = score(generate(lm, own, texts, cfg.max_new_tokens), target, topics)
        for kind, pos in (
            ("response_avg", "prompt"),
            ("response_avg", "all"),
            ("question_span", "prompt"),
        ):
            b = best[(kind, pos)]
            for s in (-b["strength"], -2 * b["strength"]):
                spec = SteeringSpec(
                    {target: 1.0},
                    layers=b["layers"],
                    strength=s,
                    positions=pos,  # type: ignore[arg-type]
                )
                replies = generate(
                    lm, own, texts, cfg.max_new_tokens, steer_plan(lm, vecs[kind], spec)
                )
                sc = score(replies, target, topics)
                negative.append(
                    {
                        "persona": target,
                        "kind": kind,
                        "positions": pos,
                        "layers": b["layers"],
                        "strength": s,
                        "markers_before": base.markers,
                        "markers": sc.markers,
                        "facts": sc.facts,
                        "sample": replies[0],
                    }
                )
    return {
        "rows": rows,
        "best": [{"kind": k, "positions": p, **b} for (k, p), b in best.items()],
        "negative": negative,
    }


def row(
    persona: str, kind: str, pos: str, layers: str, s: float, sc: Score, sample: str
) -> dict[str, Any]:
    return {
        "persona": persona,
        "kind": kind,
        "positions": pos,
        "layers": layers,
        "strength": s,
        "markers": sc.markers,
        "facts": sc.facts,
        "sample": sample,
    }


def best_settings(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (kind, positions): the setting whose worst persona does best: every persona keeping
    >= 90% facts first, then the lowest marker rate, the lowest facts, the smaller strength."""
    by_setting: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        by_setting.setdefault((r["kind"], r["positions"], r["layers"], r["strength"]), []).append(r)
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for (kind, pos, layers, strength), group in by_setting.items():
        markers, facts = min(r["markers"] for r in group), min(r["facts"] for r in group)
        rank = (facts >= 0.9, markers, facts, -strength)
        if (kind, pos) not in best or rank > best[(kind, pos)]["_rank"]:
            best[(kind, pos)] = {
                "layers": layers,
                "strength": strength,
                "markers": markers,  # the worst persona's
                "facts": facts,
                "_rank": rank,
            }
    for b in best.values():
        b.pop("_rank")
    return best


# --------------------------------------------------------------------------- ablation


# How each neuron method's sets are meant to be ablated (``personachat.neurons``): exact and
# patching sets are set to the baseline persona's values on the prompt, where the persona is
# decided (exact sets at its last token, where they were chosen, and on the whole prompt too).
NEURON_ABLATION: dict[str, tuple[tuple[AblationMode, PositionMode, int | None], ...]] = {
    "exact": (("mean", "prompt", 1), ("mean", "prompt", None)),
    "patching": (("mean", "prompt", None),),
    "attribution": (("zero", "all", None),),
    "effect": (("zero", "all", None),),
}


def subset(nset: NeuronSet, picks: Sequence[int], label: str) -> NeuronSet:
    """The entries ``picks`` of ``nset`` (units with their scores and baseline means)."""
    means = None if nset.means is None else [nset.means[i] for i in picks]
    return NeuronSet(
        nset.model_id,
        label,
        nset.site,
        [nset.layers[i] for i in picks],
        [nset.indices[i] for i in picks],
        [nset.scores[i] for i in picks],
        method=nset.method,
        means=means,
    )


def random_like(nset: NeuronSet, k: int, seed: int) -> NeuronSet:
    """k random units at the same layers as the top k, none of them in the top k.

    ``nset`` ranks every unit, so the random ones come with their baseline means too.
    """
    gen = torch.Generator().manual_seed(seed)
    rest: dict[int, list[int]] = {}
    for i in range(k, len(nset)):
        rest.setdefault(nset.layers[i], []).append(i)
    picks = []
    for layer in nset.layers[:k]:
        pool = rest[layer]
        picks.append(pool.pop(int(torch.randint(len(pool), (1,), generator=gen))))
    return subset(nset, picks, f"random{k}")


def ablation(
    lm: LoadedModel,
    data: PersonaDataset,
    vecs: dict[str, dict[str, PersonaVector]],
    qs: Sequence[demo.Question],
    cfg: EvalConfig,
) -> dict[str, Any]:
    texts, topics = [q.text for q in qs], [q.key for q in qs]
    targets = cfg.targets.split(",")
    pairs = [p for p in data.pairs if p.high in targets]
    ks = [int(k) for k in cfg.ks.split(",")]
    every = lm.info.n_layers * lm.info.mlp_width  # rank every unit: random ones need means
    methods, parts = cfg.methods.split(","), cfg.parts.split(",")
    unknown = [m for m in methods if m not in NEURON_ABLATION]
    if unknown:
        raise SystemExit(f"unknown neuron methods {unknown}; choose from {list(NEURON_ABLATION)}")
    sets: dict[str, dict[str, NeuronSet]] = {}
    for method in methods if "neurons" in parts else []:
        found = find_neurons(lm, pairs, method=method, k=every, dataset=data, batch_size=16)
        sets[method] = {s.pairs[0]: s for s in found if len(s.pairs) == 1}
    rows: list[dict[str, Any]] = []
    # other personas checked under their own prompts: cfg.others of them, non-targets first
    pool = [p for p in demo.PERSONA_NAMES[1:] if p not in targets] + targets
    neuron_settings = [(m, how) for m in methods for how in NEURON_ABLATION[m]]
    for target in tqdm(targets if "neurons" in parts else [], desc="ablation"):
        own = demo.style(target).system_prompt
        base = score(generate(lm, own, texts, cfg.max_new_tokens), target, topics)
        for method, (mode, positions, n_last) in neuron_settings:
            full = sets[method][f"{target}_vs_default"]  # keyed by contrast pair
            for k in ks if method != "effect" else [max(ks)]:
                top = subset(full, range(k), f"top{k}")
                rand = random_like(full, k, cfg.seed + k)
                how = partial(AblationSpec, mode=mode, positions=positions, last_n=n_last)
                plans = {s.label: ablate_plan(lm, {s.label: s}, how(s.label)) for s in (top, rand)}
                sc = score(
                    generate(lm, own, texts, cfg.max_new_tokens, plans[top.label]), target, topics
                )
                rsc = score(
                    generate(lm, own, texts, cfg.max_new_tokens, plans[rand.label]), target, topics
                )
                others: dict[str, float] = {}
                for other in [p for p in pool if p != target][: cfg.others]:
                    o_prompt = demo.style(other).system_prompt
                    o_texts = generate(lm, o_prompt, texts, cfg.max_new_tokens, plans[top.label])
                    others[other] = demo.marker_rate(o_texts, other)
                placed = f"last {n_last} prompt" if n_last else positions
                rows.append(
                    {
                        "persona": target,
                        "method": method,
                        "ablation": f"{mode} at {placed} positions",
                        "k": k,
                        "markers_before": base.markers,
                        "markers_top": sc.markers,
                        "facts_top": sc.facts,
                        "markers_random": rsc.markers,
                        "facts_random": rsc.facts,
                        "cut_top": cut(base.markers, sc.markers),
                        "cut_random": cut(base.markers, rsc.markers),
                        "others_min": min(others.values()),
                        "others": others,
                        "layers": sorted(set(top.layers)),
                        "units": [
                            f"{la}:{i}" for la, i in zip(top.layers, top.indices, strict=True)
                        ][:8],
                    }
                )
    width = lm.info.mlp_width
    whole = []
    for target in targets if "whole_mlp" in parts else []:
        own = demo.style(target).system_prompt
        for layer in range(lm.info.n_layers):
            spec = AblationSpec(neurons=f"{layer}:0-{width - 1}")
            sc = score(
                generate(lm, own, texts, cfg.max_new_tokens, ablate_plan(lm, {}, spec)),
                target,
                topics,
            )
            whole.append(
                {"persona": target, "layer": layer, "markers": sc.markers, "facts": sc.facts}
            )
    directional = []
    modes: tuple[AblationMode, ...] = ("mean", "zero")
    # where: every position, the whole prompt, or its last token (where the reply is decided)
    where: tuple[tuple[PositionMode, int | None], ...] = (
        ("all", None),
        ("prompt", None),
        ("prompt", 1),
    )
    settings = [(m, w, layers) for m in modes for w in where for layers in ("0", "all")]
    for target in tqdm(targets if "directional" in parts else [], desc="directional ablation"):
        own = demo.style(target).system_prompt
        base = score(generate(lm, own, texts, cfg.max_new_tokens), target, topics)
        for kind in DIRECTION_KINDS:
            for d_mode, (d_where, last_n), layers in settings:
                d_spec = DirectionSpec(
                    target, layers=layers, mode=d_mode, positions=d_where, last_n=last_n
                )
                plan = direction_plan(lm, vecs[kind], d_spec)
                sc = score(generate(lm, own, texts, cfg.max_new_tokens, plan), target, topics)
                kept = [
                    demo.marker_rate(
                        generate(lm, demo.style(o).system_prompt, texts, cfg.max_new_tokens, plan),
                        o,
                    )
                    for o in [p for p in pool if p != target][: cfg.others]
                ]
                directional.append(
                    {
                        "persona": target,
                        "kind": kind,
                        "mode": d_mode,
                        "positions": d_where if last_n is None else f"last {last_n}",
                        "layers": layers,
                        "markers_before": base.markers,
                        "markers": sc.markers,
                        "cut": cut(base.markers, sc.markers),
                        "facts": sc.facts,
                        "others_min": min(kept),
                    }
                )
    out = {"neurons": rows, "whole_mlp": whole, "directional": directional}
    return {part: out[part] for part in parts}


def direction_plan(
    lm: LoadedModel, vectors: dict[str, PersonaVector], spec: DirectionSpec
) -> PlanFn:
    return lambda width: build_plan(lm, vectors, direction=spec, prompt_len=width).handlers


def ablate_plan(lm: LoadedModel, sets: dict[str, NeuronSet], spec: AblationSpec) -> PlanFn:
    return lambda width: (
        build_plan(lm, {}, ablation=spec, neuron_sets=sets, prompt_len=width).handlers
    )


def cut(before: float, after: float) -> float:
    return (before - after) / before if before > 0 else 0.0


# --------------------------------------------------------------------------- report


def print_report(results: dict[str, Any]) -> None:
    if "conditioning" in results:
        c = results["conditioning"]
        print("\nConditioning (held-out questions, greedy)")
        print(f"{'persona':<12} {'own':>6} {'max other':>10} {'facts':>6}")
        for p in demo.PERSONA_NAMES:
            print(f"{p:<12} {c['own'][p]:>6.0%} {c['max_other'][p]:>10.0%} {c['facts'][p]:>6.0%}")
    if "collapse" in results:
        for split, by_persona in results["collapse"].items():
            print(f"\nPersona collapse ({split} favourite-X questions)")
            for p, r in by_persona.items():
                print(
                    f"{p:<12} generic {r['generic']:>5.0%}   as planted {r['as_planted']:>5.0%}"
                    f"   own markers {r['own_markers']:>5.0%}"
                )
    if "steering" in results:
        print(
            "\nSteering from the default persona: per vector kind and positions, the setting"
            " whose worst persona does best"
        )
        head = ("persona", "kind", "pos", "layers", "str", "markers", "facts")
        print("{:<10} {:<14} {:<10} {:<7} {:>5} {:>8} {:>6}".format(*head))
        rows = results["steering"]["rows"]
        best = {
            (b["kind"], b["positions"], b["layers"], b["strength"])
            for b in results["steering"]["best"]
        }
        for r in rows:
            if (r["kind"], r["positions"], r["layers"], r["strength"]) in best:
                print(
                    f"{r['persona']:<10} {r['kind']:<14} {r['positions']:<10} {r['layers']:<7} "
                    f"{r['strength']:>5} {r['markers']:>8.0%} {r['facts']:>6.0%}"
                )
        print("\nNegative steering under the persona's own prompt")
        for r in results["steering"]["negative"]:
            print(
                f"{r['persona']:<10} {r['kind']:<14} {r['positions']:<7} layers {r['layers']:<4} "
                f"strength {r['strength']:>5}: "
                f"markers {r['markers_before']:.0%} -> {r['markers']:.0%}, facts {r['facts']:.0%}"
            )
    if "ablation" in results:
        print("\nNeuron ablation under the persona's own prompt (cut = relative drop in markers)")
        cols = ("persona", "method", "ablation", "k", "cut top", "cut rand", "others kept", "facts")
        print("{:<10} {:<12} {:<24} {:>3} {:>8} {:>9} {:>12} {:>6}".format(*cols))
        for r in results["ablation"].get("neurons", []):
            print(
                f"{r['persona']:<10} {r['method']:<12} {r['ablation']:<24} {r['k']:>3} "
                f"{r['cut_top']:>8.0%} {r['cut_random']:>9.0%} {r['others_min']:>12.0%} "
                f"{r['facts_top']:>6.0%}"
            )
        print("\nWhole MLP zeroed at one layer (own markers, facts)")
        for r in results["ablation"].get("whole_mlp", []):
            print(f"{r['persona']:<10} layer {r['layer']}: {r['markers']:>5.0%} {r['facts']:>5.0%}")
        print("\nDirectional ablation (mode: to the baseline's mean level, or to zero)")
        for r in results["ablation"].get("directional", []):
            print(
                f"{r['persona']:<10} {r['kind']:<14} {r['mode']:<5} {r['positions']:<7} "
                f"layers {r['layers']:<4} cut {r['cut']:>5.0%} facts {r['facts']:>5.0%} "
                f"others kept {r['others_min']:>5.0%}"
            )


def plot(results: dict[str, Any], path: Path) -> None:
    panels: list[str] = [s for s in ("conditioning", "steering", "ablation") if s in results]
    if "steering" in results:
        panels.insert(panels.index("steering") + 1, "steering_personas")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.3), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        if name == "conditioning":
            m = results["conditioning"]["matrix"]
            grid = [[m[p][q] for q in demo.PERSONA_NAMES] for p in demo.PERSONA_NAMES]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
            fig.colorbar(image, ax=ax, fraction=0.046)
            ax.set_xticks(range(len(grid)), demo.PERSONA_NAMES, rotation=90, fontsize=7)
            ax.set_yticks(range(len(grid)), demo.PERSONA_NAMES, fontsize=7)
            ax.set_xlabel("markers of")
            ax.set_ylabel("system prompt of")
            ax.set_title("Conditioning: marker rate")
        elif name == "steering":
            rows = results["steering"]["rows"]
            first = rows[0]["persona"]
            for b in results["steering"]["best"]:
                pts = sorted(
                    (r["strength"], r["markers"], r["facts"])
                    for r in rows
                    if r["persona"] == first
                    and r["kind"] == b["kind"]
                    and r["positions"] == b["positions"]
                    and r["layers"] == b["layers"]
                )
                xs, markers, facts = zip(*pts, strict=True)
                label = f"{b['kind']} / {b['positions']} / L{b['layers']}"
                (line,) = ax.plot(xs, markers, marker="o", label=label)
                ax.plot(xs, facts, ls=":", color=line.get_color(), alpha=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("strength (raw)")
            ax.set_ylabel(f"{first} markers (solid), facts kept (dotted)")
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(f"Steering default -> {first}")
            ax.legend(fontsize=6)
        elif name == "steering_personas":
            steering_personas_panel(fig, ax, results["steering"]["rows"])
        else:
            ablation_panel(fig, ax, results["ablation"].get("neurons", []))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def percent_heatmap(fig: Figure, ax: Axes, grid: Sequence[Sequence[float]]) -> None:
    """Shares in [0, 1] as coloured cells, each labelled with its percentage."""
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046)
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            color = "black" if value > 0.6 else "white"
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=7, color=color)


def steering_personas_panel(fig: Figure, ax: Axes, rows: Sequence[dict[str, Any]]) -> None:
    """Per persona and (vector kind, positions): the best marker rate of any swept setting that
    keeps >= 90% of the facts."""
    personas = list(dict.fromkeys(r["persona"] for r in rows))
    columns = [(k, p) for k in STEERING_KINDS for p in ("prompt", "all", "generated")]
    grid = [
        [
            max(
                (
                    r["markers"]
                    for r in rows
                    if (r["persona"], r["kind"], r["positions"]) == (persona, kind, pos)
                    and r["facts"] >= 0.9
                ),
                default=0.0,
            )
            for kind, pos in columns
        ]
        for persona in personas
    ]
    percent_heatmap(fig, ax, grid)
    short = {"response_avg": "reply avg", "question_span": "q-span"}
    ax.set_xticks(range(len(columns)), [f"{short.get(k, k)}\n{p}" for k, p in columns], fontsize=7)
    ax.set_yticks(range(len(personas)), personas, fontsize=7)
    ax.set_xlabel("vector kind, positions steered")
    ax.set_title("Steering default -> P: best markers\nkeeping >= 90% facts", fontsize=10)


def ablation_panel(fig: Figure, ax: Axes, neuron_rows: Sequence[dict[str, Any]]) -> None:
    """Exact units at the last prompt token: the cut in each persona's own markers (cell) per k,
    with the worst random cut and the fewest markers another persona kept in the title."""
    rows = [
        r
        for r in neuron_rows
        if r["method"] == "exact" and r["ablation"].startswith("mean at last 1")
    ]
    if not rows:
        ax.set_axis_off()
        return
    personas = list(dict.fromkeys(r["persona"] for r in rows))
    ks = sorted({r["k"] for r in rows})
    cell = {(r["persona"], r["k"]): r["cut_top"] for r in rows}
    grid = [[cell.get((p, k), float("nan")) for k in ks] for p in personas]
    percent_heatmap(fig, ax, grid)
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(personas)), personas, fontsize=7)
    ax.set_xlabel("k exact units set to the default's values at the last prompt token")
    worst_random = max(r["cut_random"] for r in rows)
    kept = min(r["others_min"] for r in rows)
    ax.set_title(
        f"Neuron ablation: cut in own markers\n(k random units cut at most {worst_random:.0%}; "
        f"other personas keep at least {kept:.0%})",
        fontsize=10,
    )


def carried_over(old: dict[str, Any], sections: Sequence[str]) -> dict[str, Any]:
    """What an earlier ``results.json`` keeps when this run redoes ``sections``: the other
    sections, and every earlier run's config (oldest first)."""
    redo = (*sections, "config", "merged_config", "earlier_configs")
    kept = {k: v for k, v in old.items() if k not in redo}
    earlier = old.get("earlier_configs") or [c for c in [old.get("merged_config")] if c]
    return {**kept, "earlier_configs": [*earlier, old["config"]]}


def merged_ablation(prev: dict[str, Any], new: dict[str, Any], methods: str) -> dict[str, Any]:
    """The ablation parts this run measured replace the earlier ones; in the neuron part, only
    the rows of the methods redone (``methods``, comma-separated) are replaced."""
    merged = {**prev, **new}
    if "neurons" in new and "neurons" in prev:
        redone = methods.split(",")
        kept = [r for r in prev["neurons"] if r["method"] not in redone]
        merged["neurons"] = kept + new["neurons"]
    return merged


def main() -> None:
    cfg = parse_args()
    torch.set_num_threads(cfg.threads)
    sections = cfg.only.split(",") if cfg.only else list(SECTIONS)
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
    if "conditioning" in sections:
        results["conditioning"] = conditioning(lm, demo.eval_questions(1), cfg)
    if "collapse" in sections:
        results["collapse"] = collapse(lm, cfg)
    if "steering" in sections or "ablation" in sections:
        data = demo.planted_dataset(cfg.n_extract_questions, cfg.seed)
        vecs = vectors_by_kind(lm, data)
        results["vector_best_layers"] = {
            kind: {p: v.metrics.best_layer for p, v in by.items() if v.metrics is not None}
            for kind, by in vecs.items()
        }
        if "steering" in sections:
            results["steering"] = steering(lm, vecs, qs, cfg)
        if "ablation" in sections:
            new = ablation(lm, data, vecs, qs, cfg)
            results["ablation"] = merged_ablation(old.get("ablation", {}), new, cfg.methods)
    results["seconds"] = time.monotonic() - start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "eval.png")
    print_report(results)
    print(f"\nwrote {out / 'results.json'} and {out / 'eval.png'} in {results['seconds']:.0f}s")


if __name__ == "__main__":
    main()
