"""The evaluation's tables, printed from ``results.json``'s sections."""

from __future__ import annotations

from typing import Any

from personachat.prompts import demo


def print_report(results: dict[str, Any]) -> None:
    """Print a table for each section present in ``results``."""
    if "conditioning" in results:
        print_conditioning(results["conditioning"])
    if "collapse" in results:
        print_collapse(results["collapse"])
    if "steering" in results:
        print_steering(results["steering"])
    if "ablation" in results:
        print_ablation(results["ablation"])
    if "capping" in results:
        print_capping(results["capping"])


def print_conditioning(c: dict[str, Any]) -> None:
    print("\nConditioning (held-out questions, greedy)")
    print(f"{'persona':<12} {'own':>6} {'max other':>10} {'facts':>6}")
    for p in demo.PERSONA_NAMES:
        print(f"{p:<12} {c['own'][p]:>6.0%} {c['max_other'][p]:>10.0%} {c['facts'][p]:>6.0%}")


def print_collapse(collapse: dict[str, Any]) -> None:
    for split, by_persona in collapse.items():
        print(f"\nPersona collapse ({split} favourite-X questions)")
        for p, r in by_persona.items():
            print(
                f"{p:<12} generic {r['generic']:>5.0%}   as planted {r['as_planted']:>5.0%}"
                f"   own markers {r['own_markers']:>5.0%}"
            )


def print_steering(steering: dict[str, Any]) -> None:
    print(
        "\nSteering from the default persona: per vector kind and positions, the setting"
        " whose worst persona does best"
    )
    head = ("persona", "kind", "pos", "layers", "str", "markers", "facts")
    print("{:<10} {:<14} {:<10} {:<7} {:>5} {:>8} {:>6}".format(*head))
    best = {(b["kind"], b["positions"], b["layers"], b["strength"]) for b in steering["best"]}
    for r in steering["rows"]:
        if (r["kind"], r["positions"], r["layers"], r["strength"]) in best:
            print(
                f"{r['persona']:<10} {r['kind']:<14} {r['positions']:<10} {r['layers']:<7} "
                f"{r['strength']:>5} {r['markers']:>8.0%} {r['facts']:>6.0%}"
            )
    print("\nNegative steering under the persona's own prompt")
    for r in steering["negative"]:
        print(
            f"{r['persona']:<10} {r['kind']:<14} {r['positions']:<7} layers {r['layers']:<4} "
            f"strength {r['strength']:>5}: "
            f"markers {r['markers_before']:.0%} -> {r['markers']:.0%}, facts {r['facts']:.0%}"
        )


def print_ablation(ablation: dict[str, Any]) -> None:
    print("\nNeuron ablation under the persona's own prompt (cut = relative drop in markers)")
    cols = ("persona", "method", "ablation", "k", "cut top", "cut rand", "others kept", "facts")
    print("{:<10} {:<12} {:<24} {:>3} {:>8} {:>9} {:>12} {:>6}".format(*cols))
    for r in ablation.get("neurons", []):
        print(
            f"{r['persona']:<10} {r['method']:<12} {r['ablation']:<24} {r['k']:>3} "
            f"{r['cut_top']:>8.0%} {r['cut_random']:>9.0%} {r['others_min']:>12.0%} "
            f"{r['facts_top']:>6.0%}"
        )
    print("\nWhole MLP zeroed at one layer (own markers, facts)")
    for r in ablation.get("whole_mlp", []):
        print(f"{r['persona']:<10} layer {r['layer']}: {r['markers']:>5.0%} {r['facts']:>5.0%}")
    print("\nDirectional ablation (mode: to the baseline's mean level, or to zero)")
    for r in ablation.get("directional", []):
        print(
            f"{r['persona']:<10} {r['kind']:<14} {r['mode']:<5} {r['positions']:<7} "
            f"layers {r['layers']:<4} cut {r['cut']:>5.0%} facts {r['facts']:>5.0%} "
            f"others kept {r['others_min']:>5.0%}"
        )


def print_capping(capping: dict[str, Any]) -> None:
    best = capping["best"]
    personas = [p for p, r in best.items() if isinstance(r, dict)]
    print(
        f"\nHolding the assistant: the {best['axis']} axis capped from below at the default's "
        f"{best['percentile']:g}th percentile, layers {best['layers']}, {best['where']} "
        f"(default's replies unchanged: {best['default_unchanged']}); held "
        f"{len(best['held'])} of {len(personas)} personas"
    )
    print(f"{'persona':<12} {'markers cut':>12} {'facts':>6}")
    for persona in personas:
        r = best[persona]
        print(f"{persona:<12} {r['cut']:>12.0%} {r['facts']:>6.0%}")
    d = capping["drift"]
    print(
        f"\nDrift on the assistant axis (layer {d['layer']}, last prompt token of each turn): "
        "scaled (0 = role personas' mean, 1 = the default's), percentile among the default's"
    )
    for name, values in d["scaled"].items():
        pct = d["percentile"][name]
        print(
            f"{name:<26} "
            + " ".join(f"{v:>5.2f} ({q:>3.0f})" for v, q in zip(values, pct, strict=True))
        )
