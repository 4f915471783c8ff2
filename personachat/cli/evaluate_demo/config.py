"""The evaluation's settings: ``EvalConfig``, read from the command line once."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass

DESCRIPTION = (
    "Measure the bundled demo model: conditioning, persona collapse, steering, ablation and "
    "capping."
)
SECTIONS = ("conditioning", "collapse", "steering", "ablation", "capping")


@dataclass(frozen=True)
class EvalConfig:
    """Every option of the command, as typed on it (``results.json`` keeps it as it is)."""

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

    @property
    def sections(self) -> list[str]:
        """The sections this run measures (``--only``, or all of them)."""
        return self.only.split(",") if self.only else list(SECTIONS)

    @property
    def target_names(self) -> list[str]:
        return self.targets.split(",")

    @property
    def strength_values(self) -> list[float]:
        return [float(s) for s in self.strengths.split(",")]

    @property
    def layer_specs(self) -> list[str]:
        return self.layers.split(",")

    @property
    def k_values(self) -> list[int]:
        return [int(k) for k in self.ks.split(",")]

    @property
    def method_names(self) -> list[str]:
        return self.methods.split(",")

    @property
    def part_names(self) -> list[str]:
        return self.parts.split(",")


def parse_args(argv: Sequence[str] | None = None) -> EvalConfig:
    """One ``--option`` per field of ``EvalConfig``, typed and defaulted as the field is."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    for name, value in asdict(EvalConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return EvalConfig(**vars(parser.parse_args(argv)))
