"""A long-lived reader sees each write batch whole or not at all: the races between a reader's
lookup and its file read, a refresh that fails half way, a change marker whose stat repeats,
and personas registered apart from their vectors, each forced deterministically in one process
(tests/test_store_processes.py runs a real writer against a real reader)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from personachat.records import ModelInfo, Persona, PersonaMeans, PersonaVector
from personachat.store import Store, StoreError, UnknownError
from personachat.store.catalog import Catalog, Index

INFO = ModelInfo("org/readers", None, "llama", 3, 8, 16)


def value(seed: int) -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))


def vector(persona: str, seed: int, **kw: Any) -> PersonaVector:
    return PersonaVector(INFO.model_id, persona, value(seed), n_samples=seed, **kw)


def means(persona: str, seed: int) -> PersonaMeans:
    return PersonaMeans(INFO.model_id, persona, "response_avg", value(1000 + seed), seed)


@pytest.fixture
def writer(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store")
    store.register_model(INFO)
    store.register_vectors([vector("pirate", 1, baseline="base")], [means("base", 1)])
    return store


def interleave(monkeypatch: pytest.MonkeyPatch, reader: Store, times: int, write: Any) -> list[int]:
    """Run ``write(n)`` between the reader's lookup and its file read, ``times`` times."""
    original = reader._files.read_checked
    calls: list[int] = []

    def read_checked(*args: Any, **kw: Any) -> Any:
        if len(calls) < times:
            calls.append(len(calls) + 2)
            write(calls[-1])
        return original(*args, **kw)

    monkeypatch.setattr(reader._files, "read_checked", read_checked)
    return calls


def test_a_vector_replaced_between_lookup_and_read_is_read_again(
    writer: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = Store(writer.root, read_only=True)
    assert reader.vectors()[0].n_samples == 1

    def replace(n: int) -> None:  # deletes the file the reader has just looked up
        writer.register_vectors([vector("pirate", n, baseline="base")])

    calls = interleave(monkeypatch, reader, 3, replace)
    got = reader.load_vector(INFO.model_id, "pirate")
    assert calls == [2, 3, 4]
    assert got.n_samples == 4 and torch.equal(got.vector, value(4))


def test_means_replaced_between_lookup_and_read_are_read_again(
    writer: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = Store(writer.root, read_only=True)
    assert reader.means()[0].n_samples == 1
    interleave(monkeypatch, reader, 2, lambda n: writer.register_vectors([], [means("base", n)]))
    got = reader.load_means(INFO.model_id, "base")
    assert got.n_samples == 3 and torch.equal(got.mean, value(1003))


def test_a_refresh_that_fails_half_way_leaves_the_old_snapshot_whole(
    writer: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = Store(writer.root, read_only=True)
    assert [p.name for p in reader.personas(INFO.model_id)] == ["base", "pirate"]
    writer.register_vectors([vector("ninja", 2)])

    def interrupted(cls: type[Index], snap: Any) -> Index:
        raise KeyboardInterrupt  # e.g. the app's thread stopped while building the lookups

    with monkeypatch.context() as patch:
        patch.setattr(Index, "of", classmethod(interrupted))
        with pytest.raises(KeyboardInterrupt):
            reader.vectors()
    listed = [p.name for p in reader.personas(INFO.model_id)]
    with_vectors = sorted({e.persona for e in reader.vectors(INFO.model_id)})
    assert listed == ["base", "ninja", "pirate"] and with_vectors == ["ninja", "pirate"]
    assert reader.load_vector(INFO.model_id, "ninja").n_samples == 2


def test_the_change_marker_moves_even_when_its_files_stat_repeats(writer: Store) -> None:
    """Two writes within one tick of a coarse file system clock, the second marker file reusing
    the inode the first freed: inode, size and mtime are as a reader saw them before."""
    catalog = Catalog(writer.root, read_only=True, lock_timeout=1.0)
    marker_file = writer.root / "generation"
    before, st = catalog.marker(), os.stat(marker_file)
    with open(marker_file, "r+b") as f:  # same inode, same size
        f.write(os.urandom(st.st_size).hex().encode()[: st.st_size])
    os.utime(marker_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = os.stat(marker_file)
    assert (again.st_ino, again.st_size, again.st_mtime_ns) == (
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
    )
    assert catalog.marker() != before
    writer.register_personas([Persona("pirate", "Arr.")])  # every write writes a new content
    first = marker_file.read_bytes()
    writer.register_personas([Persona("pirate", "Yo ho.")])
    assert marker_file.read_bytes() != first


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_writable_open_or_a_refused_write_leaves_every_file_as_it_was(writer: Store) -> None:
    """The change marker moves only when a write commits: a writable open with nothing to
    migrate or recover, and writes refused before or inside their transaction, change no file
    (a long-lived reader keeps its snapshot)."""
    reader = Store(writer.root, read_only=True)
    reader.vectors()
    before = files_of(writer.root)
    Store(writer.root).close()
    with pytest.raises(StoreError, match="refusing to change"):
        writer.register_model(ModelInfo(INFO.model_id, None, "llama", 4, 8, 16))
    with pytest.raises(UnknownError):
        writer.remove_persona("nobody")
    with pytest.raises(ValueError, match="not allowed"):
        writer.register_personas([Persona("bad name", "x")])
    assert files_of(writer.root) == before
    assert not reader._catalog.changed()
    writer.register_personas([Persona("pirate", "Arr.")])
    assert reader._catalog.changed() and files_of(writer.root)["generation"] != before["generation"]


def test_personas_vectors_and_means_in_one_transaction(writer: Store) -> None:
    reader = Store(writer.root, read_only=True)
    bad = PersonaVector(INFO.model_id, "robot", torch.randn(2, 8))
    with pytest.raises(ValueError, match="2 layers"):
        writer.register_vectors([vector("ninja", 2), bad], personas=[Persona("ninja", "Hiya.")])
    assert "ninja" not in {p.name for p in reader.personas()}  # nothing of the batch landed
    writer.register_vectors(
        [vector("ninja", 2)],
        [means("ninja", 2)],
        personas=[Persona("ninja", "Hiya.", category="fiction")],
    )
    assert reader.persona("ninja") == Persona("ninja", "Hiya.", category="fiction")
    assert reader.load_vector(INFO.model_id, "ninja").n_samples == 2
    writer.register_vectors([], personas=[Persona("monk", "Om.")])  # personas alone still work
    assert reader.persona("monk").system_prompt == "Om."
