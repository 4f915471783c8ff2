"""Write the persona-analysis report (collapse, probes, patching, persona space) of one model.

    python scripts/analyze.py --model store/models/demo --out store/reports/demo
    python scripts/analyze.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset personas \
        --personas default,assistant,pirate,cynic,poet --compare-model Qwen/Qwen2.5-0.5B

``--dataset demo`` (the default for ``store/models/demo``) uses the demo model's planted personas
and preference questions; any other dataset (built-in name or .json/.jsonl file) supplies the
personas, and the questions are ``personachat.analysis.default_preferences()``. Persona vectors
come from the store (``--store``) when it has some for the model, otherwise from the model's
own mean activations over the question tokens. The report goes to ``--out/report.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from personachat import analysis as an
from personachat.model import LoadedModel, load_model
from personachat.records import Persona, PersonaVector
from personachat.report import analyze_model, demo_preferences, findings, write_report

log = logging.getLogger("analyze")


@dataclass(frozen=True)
class Config:
    model: str
    out: str
    store: str | None
    personas: tuple[str, ...] | None
    compare_model: str | None
    dataset: str
    n_patch: int
    threshold: float
    max_new_tokens: int
    forced: bool


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="hub name or local path of a causal LM")
    p.add_argument("--out", default=None, help="report folder (default store/reports/<model>)")
    p.add_argument("--store", default=None, help="store root with persona vectors (optional)")
    p.add_argument("--personas", default=None, help="comma-separated persona names (default all)")
    p.add_argument("--compare-model", default=None, help="second model for the comparison")
    p.add_argument("--dataset", default="auto", help="demo, a built-in dataset or a file")
    p.add_argument("--n-patch", type=int, default=2, help="persona pairs to patch")
    p.add_argument("--threshold", type=float, default=0.5, help="modal share that is collapse")
    p.add_argument("--max-new-tokens", type=int, default=24, help="greedy answer length")
    p.add_argument(
        "--forced", action="store_true",
        help="demo only: measure collapse with the forced reply prefix too (default: free replies)",
    )  # fmt: skip
    a = p.parse_args(argv)
    dataset = a.dataset
    if dataset == "auto":
        dataset = "demo" if Path(a.model).name == "demo" else "personas"
    out = a.out or str(Path("store/reports") / Path(a.model).name)
    personas = tuple(x.strip() for x in a.personas.split(",") if x.strip()) if a.personas else None
    return Config(
        a.model, out, a.store, personas, a.compare_model, dataset, a.n_patch, a.threshold,
        a.max_new_tokens, a.forced,
    )  # fmt: skip


def load_personas(cfg: Config) -> tuple[list[Persona], list[an.PreferenceItem]]:
    if cfg.dataset == "demo":
        from personachat.demo import demo_personas

        personas, items = demo_personas(), demo_preferences(forced=cfg.forced)
    else:
        from personachat.datasets import load_dataset

        personas, items = list(load_dataset(cfg.dataset).personas), an.default_preferences()
    if cfg.personas:
        known = {p.name: p for p in personas}
        missing = [n for n in cfg.personas if n not in known]
        if missing:
            raise SystemExit(f"unknown personas {missing}; known: {sorted(known)}")
        personas = [known[n] for n in cfg.personas]
    return personas, items


def stored_vectors(
    store_root: str | None, lm: LoadedModel, names: list[str]
) -> list[PersonaVector]:
    """The model's stored persona vectors (one per persona, newest), or [] when there are none."""
    if store_root is None or not (Path(store_root) / "catalog.duckdb").is_file():
        return []
    from personachat.store import Store

    store = Store(store_root, read_only=True)
    model_ids = [m.model_id for m in store.models()]
    candidates = [lm.info.model_id, Path(lm.info.model_id).name]
    model_id = next((m for m in candidates if m in model_ids), None)
    if model_id is None:
        log.warning("store %s has no model %s (has %s)", store_root, candidates, model_ids)
        return []
    out = []
    for name in names:
        entries = store.vectors(model_id, name)
        if entries:
            e = next((x for x in entries if x.positions == "response_avg"), entries[0])
            out.append(store.load_vector(model_id, name, positions=e.positions, method=e.method))
    log.info("loaded %d stored vectors of %s", len(out), model_id)
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    personas, items = load_personas(cfg)
    lm = load_model(cfg.model)
    names = [p.name for p in personas]
    compare = None
    if cfg.compare_model:
        other = load_model(cfg.compare_model)
        compare = (other, stored_vectors(cfg.store, other, names))
    patch_items = demo_preferences(forced=True) if cfg.dataset == "demo" else None
    result = analyze_model(
        lm, personas, items, vectors=stored_vectors(cfg.store, lm, names), compare=compare,
        patch_items=patch_items,
        n_patch=cfg.n_patch, threshold=cfg.threshold, max_new_tokens=cfg.max_new_tokens,
        dataset=cfg.dataset,
    )  # fmt: skip
    path = write_report(result, cfg.out)
    for line in findings(result):
        print(f"- {line}")
    print(f"report: {path}")


if __name__ == "__main__":
    main()
