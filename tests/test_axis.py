"""The assistant axis: read from role personas toward the neutral ones, stored as a vector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from personachat.activations import CaptureSpec, build_samples, capture
from personachat.model import LoadedModel
from personachat.pipeline import extract_axis
from personachat.prompts import DatasetError, from_json
from personachat.records import QUANTILE_LEVELS
from personachat.store import Store
from tests.scripts import cli_module

DATASET = from_json(
    {
        "name": "axis",
        "personas": [
            {"name": "default", "system_prompt": "", "category": "neutral"},
            {
                "name": "helper",
                "system_prompt": "You are a helpful assistant.",
                "category": "neutral",
            },
            {"name": "pirate", "system_prompt": "You are a pirate.", "category": "role"},
            {"name": "chef", "system_prompt": "You are a chef.", "category": "role"},
        ],
        "questions": ["What is the capital of France?", "Tell me about the ocean.", "Numbers?"],
    }
)


def direct_means(lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """[P, L, D] per-persona means at the question span and [N, L, D] per-sample pools."""
    conversations = [
        (i, p.system_prompt, q, None)
        for i, p in enumerate(DATASET.personas)
        for q in DATASET.questions
    ]
    samples = build_samples(lm.tokenizer, conversations, ("question_span",))
    spec = CaptureSpec(layers=tuple(range(lm.info.n_layers)), positions=("question_span",))
    with capture(lm, samples, spec, 4, progress=False) as cap:
        parts = list(cap.iter_pooled())
        pooled = torch.cat([block for _, block in parts])[:, 0]
        return cap.means()[0], pooled, np.concatenate([who for who, _ in parts])


def test_axis_means_is_neutral_minus_roles_with_its_reference(llama: LoadedModel) -> None:
    vector, role_mean = extract_axis(llama, DATASET, progress=False)
    means, pooled, who = direct_means(llama)
    want = means[:2].mean(0) - means[2:].mean(0)
    assert torch.allclose(vector.vector.double(), want, atol=1e-5)
    assert torch.allclose(role_mean.mean.double(), means[2:].mean(0), atol=1e-5)
    assert (vector.persona, vector.baseline, vector.method) == (
        "assistant_axis",
        "roles",
        "axis_means",
    )
    unit = torch.nn.functional.normalize(want, dim=-1)
    proj = torch.einsum("nld,ld->nl", pooled.double(), unit).numpy()
    neutral = proj[who < 2]
    assert vector.quantiles is not None
    assert np.allclose(
        vector.quantiles.persona.numpy(), np.quantile(neutral, QUANTILE_LEVELS, axis=0).T, atol=1e-5
    )


def test_axis_pc1_points_toward_the_assistant(llama: LoadedModel) -> None:
    vector, _ = extract_axis(llama, DATASET, method="axis_pc1", progress=False)
    means, _, _ = direct_means(llama)
    toward = (means[:2].mean(0) - means[2:].mean(0)).float()
    cos = torch.nn.functional.cosine_similarity(vector.vector, toward, dim=-1)
    assert bool((cos > 0).all())
    centred = (means - means.mean(0, keepdim=True)).float()
    for layer in range(llama.info.n_layers):
        top = torch.linalg.svd(centred[:, layer], full_matrices=False)[2][0]
        got = torch.nn.functional.normalize(vector.vector[layer], dim=-1)
        assert abs(float(got @ top)) == pytest.approx(1.0, abs=1e-4)


def test_a_dataset_without_both_sides_is_refused(llama: LoadedModel) -> None:
    roles_only = DATASET.select(["pirate", "chef"])
    with pytest.raises(DatasetError, match="neutral"):
        extract_axis(llama, roles_only, progress=False)
    with pytest.raises(ValueError, match="prompt positions"):
        extract_axis(llama, DATASET, positions="response_avg", progress=False)


@pytest.mark.slow
def test_the_script_registers_the_axis(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (tmp_path / "axis.json").write_text(__import__("json").dumps(DATASET.to_json()))
    code = cli_module("register_axis").main(
        [
            "--model",
            "store/models/demo",
            "--dataset",
            str(tmp_path / "axis.json"),
            "--store",
            str(store),
            "--quiet",
            "--positions",
            "prompt_last",
        ]
    )
    assert code == 0
    back = Store(store, read_only=True).load_vector("store/models/demo", "assistant_axis")
    assert back.quantiles is not None and back.render and back.baseline_mean is not None
    assert back.positions == "prompt_last"
