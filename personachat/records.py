"""The plain records that flow from extraction to the store to the runtime.

Records hold tensors and the identity of the model they came from, never a model. Tensors are
float32 on the CPU; ``[n_layers, hidden]`` follows the layer convention of ``personachat.sites``.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from datetime import datetime

import torch

POSITIONS = ("response_avg", "prompt_last", "prompt_avg", "question_span")
METHODS = ("diff_means", "imported", "axis_means", "axis_pc1")
NEURON_METHODS = ("effect", "attribution", "patching", "exact", "imported")
NEURON_SITES = ("mlp_hidden", "gate")
MEAN_BASELINE = "mean"  # baseline name meaning "the mean of all personas"
# Layer i is the output of decoder block i (0-based): hidden_states[i + 1] in transformers' terms.
LAYER_CONVENTION = "block_output: layer i = output of decoder block i = hidden_states[i+1]"

# Names that become (parts of) file names: personas, baselines, datasets, pairs, neuron sets.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_name(
    value: object, what: str = "name", where: str = "", *, error: type[ValueError] = ValueError
) -> str:
    """``value`` if it is safe as (part of) a file name, else ``error`` naming it and the rule:
    1-100 letters, digits, '_', '.' or '-', starting with a letter or digit, without '..'."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value) or ".." in value:
        prefix = f"{where}: " if where else ""
        raise error(
            f"{prefix}{what} {value!r} is not allowed: use 1-100 letters, digits, '_', '.' or "
            "'-', starting with a letter or digit and without '..' (it becomes part of a file "
            "name)"
        )
    return value


@dataclass(frozen=True)
class Persona:
    """A persona: a name (safe for file names), its system prompt and where it came from."""

    name: str
    system_prompt: str
    description: str = ""
    category: str = ""
    source: str = ""


@dataclass(eq=False)
class LayerMetrics:
    """Per-layer quality of a persona vector; each field is a float tensor [n_layers]."""

    auc: torch.Tensor
    separation: torch.Tensor  # effect size: (mean_p - mean_b) of projections / pooled std
    norm: torch.Tensor  # norm of the vector at each layer
    resid_norm: torch.Tensor  # mean residual-stream norm at each layer (calibrated units)
    # Held out: each figure computed on samples that did not build the vector (k-fold across
    # questions), as the mean over folds and its spread; None when not computed.
    auc_heldout: torch.Tensor | None = None
    auc_heldout_std: torch.Tensor | None = None
    separation_heldout: torch.Tensor | None = None
    separation_heldout_std: torch.Tensor | None = None
    best_by: str = "auc"  # the figure ``best_layer`` is chosen by: one of ``BEST_BY``

    @property
    def best_layer(self) -> int:
        """The layer ``best_by`` names (see ``BEST_BY``).

        ``auc``: the highest in-sample AUC, ties broken by the larger separation. The others
        rank the layers that hold a vector (nonzero norm): ``separation`` by in-sample
        separation among the layers sharing the top in-sample AUC (AUC saturated there);
        ``auc_heldout`` by held-out AUC, ties broken by held-out separation;
        ``separation_heldout`` by held-out separation among the layers sharing the top
        held-out AUC. A held-out choice on metrics without held-out figures raises.
        """
        if self.best_by not in BEST_BY:
            raise ValueError(f"unknown best_by {self.best_by!r}; use one of {BEST_BY}")
        if self.best_by == "auc":
            key = self.auc * 1e6 + self.separation.clamp(-1e5, 1e5)
            return int(torch.argmax(key))
        auc, sep = self.auc, self.separation
        if self.best_by.endswith("_heldout"):
            if self.auc_heldout is None or self.separation_heldout is None:
                raise ValueError(
                    f"best_by {self.best_by!r} needs held-out metrics; these have none"
                )
            auc, sep = self.auc_heldout, self.separation_heldout
        return top_then(auc, sep, self.norm > 0)


# The figures a best layer can be chosen by (``LayerMetrics.best_by``).
BEST_BY = ("auc", "separation", "auc_heldout", "separation_heldout")
TIE = 1e-6  # figures this close count as tied


def top_then(first: torch.Tensor, then: torch.Tensor, allowed: torch.Tensor) -> int:
    """The index with the highest ``first`` (within ``TIE``) among ``allowed`` ones (all when
    none is), ties broken by the highest ``then``."""
    ok = allowed if bool(allowed.any()) else torch.ones_like(allowed, dtype=torch.bool)
    a = first.double().masked_fill(~ok, float("-inf"))
    tied = ok & (a >= a.max() - TIE)
    return int(torch.argmax(then.double().masked_fill(~tied, float("-inf"))))


# The levels of stored projection quantiles: every whole percent, 0 to 100.
QUANTILE_LEVELS: tuple[float, ...] = tuple(i / 100 for i in range(101))


@dataclass(eq=False)
class ProjectionQuantiles:
    """Where the extraction samples project onto a persona vector, per layer: the quantiles
    (at ``QUANTILE_LEVELS``) of the baseline persona's samples and of the persona's own, each
    ``[n_layers, len(QUANTILE_LEVELS)]``, projected onto the unit vector at that layer."""

    baseline: torch.Tensor
    persona: torch.Tensor
    n_baseline: int
    n_persona: int


@dataclass(eq=False)
class PersonaMeans:
    """Raw mean activations of one persona, kept so other baselines can be derived later."""

    model_id: str
    persona: str
    positions: str
    mean: torch.Tensor  # [n_layers, hidden]
    n_samples: int
    dataset: str = ""
    dataset_sha256: str = ""
    render: str = ""  # how its prompts were rendered (JSON RenderConditions); "" if unknown


@dataclass(eq=False)
class PersonaVector:
    """A persona direction per layer: persona mean minus baseline mean, with provenance."""

    model_id: str
    persona: str
    vector: torch.Tensor  # [n_layers, hidden]
    method: str = "diff_means"
    positions: str = "response_avg"
    baseline: str = "default"
    dataset: str = ""
    dataset_sha256: str = ""
    n_samples: int = 0
    metrics: LayerMetrics | None = None
    created_at: datetime | None = None
    render: str = ""  # how its prompts were rendered (JSON RenderConditions); "" if unknown
    quantiles: ProjectionQuantiles | None = None
    # The baseline's raw mean activation [n_layers, hidden] at the same positions, when known:
    # mean directional ablation moves the stream's component to the baseline's level. Not part
    # of the vector's file; the store attaches it from its means table.
    baseline_mean: torch.Tensor | None = None

    @property
    def n_layers(self) -> int:
        return int(self.vector.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.vector.shape[1])


@dataclass(eq=False)
class NeuronSet:
    """MLP units that discriminate persona pairs, as parallel lists, best first.

    ``layers[i]``, ``indices[i]`` name unit i at ``site``; ``scores[i]`` is its score by
    ``method``; ``means[i]`` its baseline mean (for mean ablation); ``ranks[pair][i]`` its rank
    in each contrast pair (stability across pairs), ``stability[i]`` the fraction of pairs where
    it ranks in the top k.
    """

    model_id: str
    label: str
    site: str
    layers: list[int]
    indices: list[int]
    scores: list[float]
    method: str = "effect"
    pairs: list[str] = field(default_factory=list)
    means: list[float] | None = None
    ranks: dict[str, list[int]] = field(default_factory=dict)
    stability: list[float] | None = None
    source: str = ""
    created_at: datetime | None = None

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class ModelInfo:
    """The identity of a model as the store records it."""

    model_id: str
    revision: str | None
    architecture: str
    n_layers: int
    hidden_size: int
    mlp_width: int
    layer_convention: str = LAYER_CONVENTION


# What the store takes from a model's declared sizes (every stored vector is [n_layers, hidden]
# floats): far above any released model, far below what a typo or a forged file could ask for.
MAX_LAYERS = 1024
MAX_WIDTH = 1 << 20  # hidden size or MLP width
MAX_VECTOR_VALUES = 1 << 25  # n_layers * hidden_size: 128 MiB in float32


def check_model_sizes(info: ModelInfo) -> ModelInfo:
    """``info`` if its sizes are positive integers within ``MAX_LAYERS``, ``MAX_WIDTH`` and
    ``MAX_VECTOR_VALUES``, else ValueError naming the model and the sizes. Run before anything
    is allocated from them (a [60000, 60000] vector is 14 GB)."""
    sizes = {}
    for name in ("n_layers", "hidden_size", "mlp_width"):
        value = getattr(info, name)
        try:
            sizes[name] = operator.index(value)
        except TypeError:
            sizes[name] = 0
        if isinstance(value, bool) or sizes[name] <= 0:
            raise ValueError(
                f"model {info.model_id!r}: {name} {value!r} must be a positive integer"
            )
    layers, hidden, mlp = sizes["n_layers"], sizes["hidden_size"], sizes["mlp_width"]
    if (
        layers > MAX_LAYERS
        or hidden > MAX_WIDTH
        or mlp > MAX_WIDTH
        or layers * hidden > MAX_VECTOR_VALUES
    ):
        raise ValueError(
            f"model {info.model_id!r} declares n_layers x hidden_size = {layers} x {hidden} "
            f"({layers * hidden * 4 / 2**30:.1f} GiB per float32 vector) and MLP width {mlp}; "
            f"the store takes at most {MAX_LAYERS} layers, widths up to {MAX_WIDTH} and "
            f"{MAX_VECTOR_VALUES} values per vector. Check the sizes (config.json, --n-layers, "
            "--hidden-size, --mlp-width)"
        )
    return info
