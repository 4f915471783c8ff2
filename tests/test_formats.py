"""Import/export of persona vectors (.npz, .pt, .safetensors, GGUF) and neuron index lists."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from personachat.records import LayerMetrics, ModelInfo, PersonaVector
from personachat.store import Store
from personachat.store.formats import FormatError, read_vector, write_vector
from personachat.store.index_lists import (
    LLAMA2_7B,
    SEED_000_LISTS,
    SEED_000_SOURCE,
    neuron_set_from_index_lists,
    parse_index_lists,
    register_index_lists,
    register_seed_000,
)

INFO = ModelInfo("org/tiny-qwen", None, "qwen2", 4, 6, 12)
SEED_000 = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "000_2cfd62f563e92e35.txt"


def sample(seed: int = 0) -> PersonaVector:
    g = torch.Generator().manual_seed(seed)
    return PersonaVector(
        model_id=INFO.model_id,
        persona="pirate",
        vector=torch.randn(4, 6, generator=g),
        metrics=LayerMetrics(
            torch.rand(4, generator=g),
            torch.randn(4, generator=g),
            torch.rand(4, generator=g),
            torch.rand(4, generator=g),
        ),
        dataset="personas",
        dataset_sha256="ef" * 32,
        n_samples=12,
    )


def test_safetensors_export_import_is_bit_exact(tmp_path: Path) -> None:
    v = sample()
    path = write_vector(v, tmp_path / "out" / "pirate.safetensors", info=INFO)
    back = read_vector(path, INFO)
    assert torch.equal(back.vector, v.vector) and back.metrics is not None
    assert torch.equal(back.metrics.separation, v.metrics.separation)  # type: ignore[union-attr]
    assert (back.persona, back.method, back.n_samples, back.dataset) == (
        "pirate",
        "diff_means",
        12,
        "personas",
    )
    assert not list(tmp_path.rglob("*.tmp"))


def test_pt_uses_persona_vectors_layout_and_round_trips(tmp_path: Path) -> None:
    v = sample(1)
    path = write_vector(v, tmp_path / "pirate_response_avg_diff.pt")
    raw = torch.load(path, weights_only=True)
    assert raw.shape == (5, 6) and torch.equal(raw[0], torch.zeros(6))
    back = read_vector(path, INFO, "pirate")
    assert torch.equal(back.vector, v.vector)
    assert (back.method, back.positions) == ("imported", "response_avg")
    assert back.dataset == "imported:pirate_response_avg_diff.pt" and len(back.dataset_sha256) == 64
    torch.save(v.vector.clone(), tmp_path / "rows.pt")  # [n_layers, hidden] is taken as is
    assert torch.equal(read_vector(tmp_path / "rows.pt", INFO, "p").vector, v.vector)


def test_pt_single_layer_needs_a_layer(tmp_path: Path) -> None:
    torch.save(torch.arange(6.0), tmp_path / "one.pt")
    with pytest.raises(FormatError, match=r"single vector of 6 dims; pass the layer"):
        read_vector(tmp_path / "one.pt", INFO, "p")
    got = read_vector(tmp_path / "one.pt", INFO, "p", layer=2).vector
    assert torch.equal(got[2], torch.arange(6.0)) and got[[0, 1, 3]].abs().sum() == 0


class Exploit:
    """Pickles to a call of os.system: loading it with plain pickle would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"vector": Exploit(marker)}, path)
    assert b"system" in path.read_bytes()  # the payload is really in the file
    with pytest.raises(FormatError, match=r"refusing to load .*evil.pt.*weights_only"):
        read_vector(path, INFO, "evil")
    assert not marker.exists()


def test_npz_one_array_per_layer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    np.savez(tmp_path / "openness_vectors.npz", layer_1=rows[1], layer_2=rows[2])
    got = read_vector(tmp_path / "openness_vectors.npz", INFO, "openness").vector
    assert torch.equal(got[1:3], torch.from_numpy(rows[1:3]))
    assert got[0].abs().sum() == 0 and got[3].abs().sum() == 0
    assert "no vector for layers [0, 3]" in caplog.text
    # keys counting hidden_states (embeddings = 0) shift by one
    np.savez(tmp_path / "hs.npz", layer_4=rows[3])
    got = read_vector(tmp_path / "hs.npz", INFO, "x", layer_offset=1).vector
    assert torch.equal(got[3], torch.from_numpy(rows[3]))
    with pytest.raises(FormatError, match=r"layer 4 is outside 0..3"):
        read_vector(tmp_path / "hs.npz", INFO, "x")
    np.savez(tmp_path / "bad.npz", layer_0=np.zeros(7, dtype=np.float32))
    with pytest.raises(FormatError, match=r"layer 0 has 7 dims but 'org/tiny-qwen' has hidden"):
        read_vector(tmp_path / "bad.npz", INFO, "x")


def test_npz_with_object_arrays_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "obj.npz", layer_0=np.array([{"a": 1}], dtype=object))
    with pytest.raises(FormatError, match="needs pickle"):
        read_vector(tmp_path / "obj.npz", INFO, "x")


def test_wrong_shapes_name_both_sizes(tmp_path: Path) -> None:
    torch.save(torch.zeros(4, 5), tmp_path / "a.pt")
    with pytest.raises(
        FormatError, match=r"5 dims per layer but 'org/tiny-qwen' has hidden size 6"
    ):
        read_vector(tmp_path / "a.pt", INFO, "a")
    torch.save(torch.zeros(7, 6), tmp_path / "b.pt")
    with pytest.raises(FormatError, match=r"7 layers but 'org/tiny-qwen' has 4 decoder layers"):
        read_vector(tmp_path / "b.pt", INFO, "b")
    with pytest.raises(FormatError, match="use one of"):
        read_vector(tmp_path / "c.bin", INFO, "c")


def test_gguf_control_vector_is_readable_by_gguf_reader(tmp_path: Path) -> None:
    v = sample(2)
    path = write_vector(v, tmp_path / "pirate.gguf", info=INFO, scale=2.0)
    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    hint = reader.fields["controlvector.model_hint"]
    assert bytes(hint.parts[hint.data[0]]).decode() == "qwen2"
    count = reader.fields["controlvector.layer_count"]
    assert int(count.parts[count.data[0]][0]) == 3
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2", "direction.3"]
    for layer in (1, 2, 3):
        assert np.array_equal(tensors[f"direction.{layer}"], (v.vector[layer] * 2.0).numpy())
    back = read_vector(path, INFO, "pirate").vector
    assert torch.equal(back[1:], v.vector[1:] * 2.0) and back[0].abs().sum() == 0
    with pytest.raises(FormatError, match=r"llama.cpp rejects direction.0"):
        write_vector(v, tmp_path / "zero.gguf", layers=[0, 1])


def test_parse_index_lists_formats() -> None:
    assert parse_index_lists("[3, 1, 2]") == {"indices": [3, 1, 2]}
    assert parse_index_lists('{"Teacher vs Student": [5, 6]}') == {"teacher_vs_student": [5, 6]}
    text = "- **Identified Indices:** `[8372, 725]`\n| a man vs a woman | [6953, 8595] |\nnothing"
    assert parse_index_lists(text) == {
        "identified_indices": [8372, 725],
        "a_man_vs_a_woman": [6953, 8595],
    }
    with pytest.raises(FormatError, match="no index list"):
        parse_index_lists("no numbers here")


@pytest.mark.skipif(not SEED_000.exists(), reason="seed 000 not present")
def test_seed_000_lists_match_the_seed_text() -> None:
    lists = parse_index_lists(SEED_000.read_text())
    assert (
        lists["identified_indices"]
        == SEED_000_LISTS["seed000_teacher_vs_student"]["teacher_vs_student"]
    )
    assert {k: v for k, v in lists.items() if k != "identified_indices"} == (
        SEED_000_LISTS["seed000_gender"]
    )


def test_neuron_set_from_lists_orders_by_stability() -> None:
    s = neuron_set_from_index_lists(
        LLAMA2_7B, "gender", 15, SEED_000_LISTS["seed000_gender"], source="seed"
    )
    assert s.indices[:2] == [6953, 8595]  # in 3 pairs, then in 2 pairs (mean rank 1)
    assert s.stability is not None
    assert s.stability[:2] == [1.0, pytest.approx(2 / 3)] and s.stability[-1] == pytest.approx(
        1 / 3
    )
    assert s.ranks["a_son_vs_a_daughter"][:2] == [0, 3]
    assert s.ranks["a_male_doctor_vs_a_female_doctor"][1] == -1
    assert len(s) == 12 and set(s.layers) == {15} and s.method == "imported" and s.scores == []
    with pytest.raises(FormatError, match=r"indices \[11008\] are outside the MLP width 11008"):
        neuron_set_from_index_lists(LLAMA2_7B, "x", 15, {"p": [1, 11008]})


def test_register_seed_000_without_weights(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    sets = register_seed_000(store)
    assert store.model(LLAMA2_7B.model_id) == LLAMA2_7B
    back = store.load_neurons(LLAMA2_7B.model_id, "seed000_teacher_vs_student")
    assert back.indices == [8372, 725, 6718, 3575, 4536] and back.layers == [15] * 5
    assert back.site == "gate" and back.source == SEED_000_SOURCE and back.scores == []
    gender = store.load_neurons(LLAMA2_7B.model_id, "seed000_gender")
    assert gender.indices == sets[1].indices and gender.ranks == sets[1].ranks
    rows = store.sql(
        "SELECT n.idx, n.stability FROM neurons n JOIN neuron_sets s USING (set_id) "
        "WHERE s.label = ? AND n.stability = 1.0",
        ["seed000_gender"],
    )
    assert rows == [(6953, 1.0)]
    register_index_lists(store, LLAMA2_7B, "seed000_gender", 15, {"p": [1]}, source="again")
    assert store.load_neurons(LLAMA2_7B.model_id, "seed000_gender").indices == [1]
