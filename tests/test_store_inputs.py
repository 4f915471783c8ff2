"""Bad files and values end in one clear line, never a traceback or a silent success: forged
and truncated tensor files (in the store and on import), malformed neuron lists, absurd model
sizes, names with a trailing newline, a store that does not exist, GGUF's direction.0."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import duckdb
import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from safetensors.torch import save as st_save

from personachat.prompts.datasets import DatasetError, load_dataset_file
from personachat.records import ModelInfo, Persona, PersonaMeans, PersonaVector
from personachat.store import IntegrityError, Store
from personachat.store.formats import FormatError, read_vector, write_vector
from personachat.store.index_lists import LLAMA2_7B, parse_index_lists

REPO = Path(__file__).resolve().parent.parent
INFO = ModelInfo("org/inputs", None, "llama", 3, 8, 16)
HUGE = ModelInfo("org/huge", None, "llama", 60000, 60000, 1)


def cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location("store_cli", REPO / "scripts" / "store.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def without_progress(err: str) -> str:
    return re.sub(r"\r?\n?reading:[^\]]*\]\n?", "", err)


def one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = without_progress(capsys.readouterr().err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def good_file() -> tuple[dict, bytes]:
    data = st_save({"vector": torch.randn(3, 8)}, metadata={"persona": "pirate"})
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def forge(kind: str) -> bytes:
    header, body = good_file()
    good = with_header(header, body)
    if kind == "empty":
        return b""
    if kind == "four_bytes":
        return b"\x01\x02\x03\x04"
    if kind == "truncated":
        return good[: len(good) - 40]
    if kind == "offsets_past_end":
        header["vector"]["data_offsets"] = [0, len(body) + 4096]
    elif kind == "backwards_offsets":
        header["vector"]["data_offsets"] = [len(body), 0]
    elif kind == "huge_shape":
        header["vector"]["shape"] = [60000, 60000]
    elif kind == "header_past_end":
        return (10**9).to_bytes(8, "little") + good[8:]
    elif kind == "header_not_json":
        raw = b"{this is not json" + b" " * 40
        return len(raw).to_bytes(8, "little") + raw + body
    elif kind == "no_vector_tensor":
        return st_save({"something": torch.randn(5)})
    elif kind == "bad_metadata":
        return st_save(
            {"vector": torch.randn(3, 8)},
            metadata={"format": "personachat.persona_vector/1", "n_samples": "many"},
        )
    return with_header(header, body)


FORGED = [
    "empty",
    "four_bytes",
    "truncated",
    "offsets_past_end",
    "backwards_offsets",
    "huge_shape",
    "header_past_end",
    "header_not_json",
    "no_vector_tensor",
    "bad_metadata",
]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    with Store(root) as store:
        store.register_model(INFO)
        store.register_vectors([PersonaVector(INFO.model_id, "pirate", torch.randn(3, 8))])
    return root


@pytest.mark.parametrize("kind", FORGED)
def test_forged_file_in_the_store_is_an_integrity_error(
    kind: str, root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = Store(root, read_only=True).vectors()[0]
    path = root / entry.file
    data = forge(kind)
    path.write_bytes(data)  # forged so that its checksum matches the catalog
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("UPDATE vectors SET sha256 = ?", [hashlib.sha256(data).hexdigest()])
    con.close()
    with pytest.raises(IntegrityError) as err:
        Store(root, read_only=True).load_vector(INFO.model_id, "pirate")
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    out = tmp_path / "out.safetensors"
    args = ["export", "pirate", "--model", INFO.model_id, "--out", str(out), "--store", str(root)]
    assert cli().main(args) == 2
    one_line_error(capsys, str(path))
    assert not out.exists()


@pytest.mark.parametrize("kind", FORGED)
def test_forged_safetensors_import_is_a_format_error(
    kind: str, root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"{kind}.safetensors"
    path.write_bytes(forge(kind))
    with pytest.raises(FormatError) as err:
        read_vector(path, INFO)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    before = Store(root, read_only=True).vectors()
    assert cli().main(["import", str(path), "--model", INFO.model_id, "--store", str(root)]) == 2
    one_line_error(capsys, str(path))
    assert Store(root, read_only=True).vectors() == before


def garbage_npz(path: Path) -> None:
    path.write_bytes(b"PK\x03\x04" + os.urandom(64))


def truncated_npz(path: Path) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, layer_0=np.zeros(8, np.float32))
    path.write_bytes(buffer.getvalue()[:-30])


def garbage_gguf(path: Path) -> None:
    path.write_bytes(b"GGUF" + os.urandom(100))


def truncated_pt(path: Path) -> None:
    torch.save(torch.zeros(3, 8), path)
    path.write_bytes(path.read_bytes()[:-50])


def multi_disk_pt(path: Path) -> None:
    """A torch file whose zip64 end locator says the archive spans two disks."""
    torch.save(torch.zeros(3, 8), path)
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x06\x07") + 4
    data[at : at + 4] = (1).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def pickle_bytes(data: bytes) -> Callable[[Path], None]:
    """A .pt file of a few pickle opcodes that stop torch's weights-only unpickler half way
    (an unknown memo key, an empty stack, a short integer)."""

    def make(path: Path) -> None:
        path.write_bytes(data)

    return make


def npz_header(value: int, *fields: tuple[bytes, int]) -> Callable[[Path], None]:
    """An .npz with ``value`` in the given two-byte fields (zip header signature, offset): a
    compression method or a zip version this Python cannot read."""

    def make(path: Path) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, layer_1=np.zeros(8, np.float32))
        data = bytearray(buffer.getvalue())
        for signature, offset in fields:
            at = data.find(signature) + offset
            data[at : at + 2] = value.to_bytes(2, "little")
        path.write_bytes(bytes(data))

    return make


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("bad.npz", garbage_npz),
        ("cut.npz", truncated_npz),
        ("bad.gguf", garbage_gguf),
        ("cut.pt", truncated_pt),
        ("disks.pt", multi_disk_pt),
        ("text.pt", pickle_bytes(b"junk\n")),
        ("memo.pt", pickle_bytes(b"\x80\x02]q\x00h\x01.")),
        ("empty_stack.pt", pickle_bytes(b"a")),
        ("short_int.pt", pickle_bytes(b"\x80\x02J\x01")),
        ("method.npz", npz_header(99, (b"PK\x03\x04", 8), (b"PK\x01\x02", 10))),
        ("version.npz", npz_header(149, (b"PK\x01\x02", 6))),
    ],
)
def test_other_damaged_imports_are_format_errors(
    name: str,
    make: Callable[[Path], None],
    root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / name
    make(path)
    with pytest.raises(FormatError, match=re.escape(str(path))):
        read_vector(path, INFO, layer=1)
    before = Store(root, read_only=True).vectors()
    args = ["import", str(path), "--layer", "1", "--model", INFO.model_id, "--store", str(root)]
    assert cli().main(args) == 2
    one_line_error(capsys, str(path))
    assert Store(root, read_only=True).vectors() == before


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("5", "no index list"),
        ('{"pair": 5}', r"'pair' is 5, not a list of unit indices"),
        ("[[1, 2]]", r"\[1, 2\].*not a unit index"),
        ('{"a": ["x"]}', r"'x'.*not a unit index"),
        ("[1.5]", r"1.5.*not a unit index"),
        ("[1e400]", r"inf.*not a unit index"),
        ("[true]", r"True.*not a unit index"),
        ("[]", "no index list"),
        ("{}", "no index list"),
        ('"text"', "no index list"),
        pytest.param("[" * 100_000 + "]" * 100_000, "nested too deeply", id="deep-list"),
        pytest.param('{"a": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply", id="deep-dict"),
    ],
)
def test_malformed_neuron_lists(
    text: str, match: str, root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(FormatError, match=match):
        parse_index_lists(text)
    lists = tmp_path / "lists.json"
    lists.write_text(text)
    args = ["import", str(lists), "--neurons", "--label", "x", "--layer", "1"]
    assert cli().main([*args, "--model", INFO.model_id, "--store", str(root)]) == 2
    one_line_error(capsys, str(lists))


def test_absurd_model_sizes_are_refused_when_declared(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'org/huge'.*60000 x 60000.*at most"):
        Store(root).register_model(HUGE)
    with pytest.raises(ValueError, match=r"n_layers 0"):
        Store(root).register_model(ModelInfo("org/zero", None, "llama", 0, 8, 16))
    assert [m.model_id for m in Store(root, read_only=True).models()] == [INFO.model_id]
    dummy = tmp_path / "dummy.pt"
    dummy.write_bytes(b"")
    with pytest.raises(FormatError, match=r"60000 x 60000"):
        read_vector(dummy, HUGE)  # refused before the file is opened


def npy_bomb(path: Path) -> None:
    """An .npz whose one array's header declares 60000 x 60000 floats (14 GB)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (60000, 60000)}
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("layer_3.npy", header.getvalue() + b"\0" * 64)


def run_capped(args: list[str]) -> subprocess.CompletedProcess[str]:
    """The CLI in a process that may not map more than 6 GB: a 14 GB allocation fails loudly."""
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
        "from personachat.cli.store import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.slow
def test_absurd_sizes_on_import_allocate_nothing(root: Path, tmp_path: Path) -> None:
    one = tmp_path / "one.npz"
    np.savez(one, layer_3=np.zeros(60000, np.float32))
    sizes = ["--n-layers", "60000", "--hidden-size", "60000", "--mlp-width", "1"]
    proc = run_capped(["import", str(one), "--model", "org/huge", *sizes, "--store", str(root)])
    assert proc.returncode == 2 and "60000 x 60000" in proc.stderr, proc.stderr[-2000:]
    assert without_progress(proc.stderr).count("\n") == 1 and "Traceback" not in proc.stderr
    bomb = tmp_path / "bomb.npz"
    npy_bomb(bomb)
    proc = run_capped(["import", str(bomb), "--model", INFO.model_id, "--store", str(root)])
    assert proc.returncode == 2 and "(60000, 60000)" in proc.stderr, proc.stderr[-2000:]
    assert without_progress(proc.stderr).count("\n") == 1 and "Traceback" not in proc.stderr
    assert [m.model_id for m in Store(root, read_only=True).models()] == [INFO.model_id]


def test_names_with_a_trailing_newline_are_refused(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store(root)
    bad = "evil\n"
    with pytest.raises(ValueError, match=r"'evil\\n' is not allowed"):
        store.register_vectors([PersonaVector(INFO.model_id, bad, torch.randn(3, 8))])
    with pytest.raises(ValueError, match=r"'evil\\n' is not allowed"):
        store.register_vectors(
            [], [PersonaMeans(INFO.model_id, bad, "response_avg", torch.randn(3, 8), 1)]
        )
    with pytest.raises(ValueError, match=r"'evil\\n' is not allowed"):
        store.register_personas([Persona(bad, "You are evil.")])
    dataset = tmp_path / "evil.json"
    dataset.write_text(
        json.dumps({"personas": [{"name": bad, "system_prompt": "x"}], "questions": ["q?"]})
    )
    with pytest.raises(DatasetError, match=r"'evil\\n' is not allowed"):
        load_dataset_file(dataset)
    vector = tmp_path / "v.pt"
    torch.save(torch.zeros(3, 8), vector)
    args = ["import", str(vector), "--model", INFO.model_id, "--store", str(root)]
    assert cli().main([*args, "--persona", bad]) == 2
    one_line_error(capsys, "'evil\\n' is not allowed")
    assert "evil" not in {p.name.strip() for p in Store(root, read_only=True).personas()}


@pytest.mark.parametrize("command", ["list", "show pirate", "export pirate", "sql SELECT 1"])
def test_read_only_commands_refuse_a_missing_store(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no" / "such" / "store"
    args = command.split(maxsplit=1 if command.startswith("sql") else -1)
    extra = ["--model", INFO.model_id, "--out", str(tmp_path / "x.gguf")]
    argv = [*args, *(extra if command.startswith("export") else []), "--store", str(missing)]
    assert cli().main(argv) == 2
    one_line_error(capsys, str(missing), "does not exist")
    assert not missing.exists() and not (tmp_path / "no").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli().main([*argv[:-1], str(empty)]) == 2
    one_line_error(capsys, str(empty), "no catalog.duckdb")
    assert list(empty.iterdir()) == []


def test_writes_may_create_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = tmp_path / "new-store"
    vector = tmp_path / "pirate.pt"
    torch.save(torch.zeros(3, 8), vector)
    sizes = ["--n-layers", "3", "--hidden-size", "8", "--mlp-width", "16"]
    assert (
        cli().main(["import", str(vector), "--model", "org/new", *sizes, "--store", str(new)]) == 0
    )
    assert [e.persona for e in Store(new, read_only=True).vectors()] == ["pirate"]


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


NEW_MODEL = ["--model", "org/new", "--n-layers", "3", "--hidden-size", "8", "--mlp-width", "16"]
REFUSED_IMPORTS = {
    "damaged file": (["junk.pt", *NEW_MODEL], "junk.pt"),
    "NaN values": (["nan.pt", *NEW_MODEL], "NaN"),
    "bad baseline": (["zero.pt", "--baseline", "no good", *NEW_MODEL], "'no good'"),
    "two files, one persona": (["zero.pt", "zero.pt", *NEW_MODEL], "same key"),
    "neurons, bad label": (
        ["lists.txt", "--neurons", "--label", "no good", "--layer", "1", *NEW_MODEL],
        "'no good'",
    ),
    "neurons, layer out of range": (
        ["lists.txt", "--neurons", "--label", "fine", "--layer", "3", *NEW_MODEL],
        "layer 3",
    ),
    "neurons, built-in model": (
        ["lists.txt", "--neurons", "--label", "x", "--layer", "99", "--model", LLAMA2_7B.model_id],
        "layer 99",
    ),
}


@pytest.mark.parametrize("case", REFUSED_IMPORTS)
def test_a_refused_import_for_a_new_model_registers_nothing(
    case: str, root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model the store does not know yet is registered in the transaction of what is imported
    for it, so a refused import leaves every file of the store as it was."""
    torch.save(torch.zeros(3, 8), tmp_path / "zero.pt")
    torch.save(torch.full((3, 8), float("nan")), tmp_path / "nan.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk\n")
    (tmp_path / "lists.txt").write_text("a: [1, 2]")
    args, needle = REFUSED_IMPORTS[case]
    argv = ["import", *(str(tmp_path / a) if a.endswith((".pt", ".txt")) else a for a in args)]
    before = files_of(root)
    assert cli().main([*argv, "--store", str(root)]) == 2
    one_line_error(capsys, needle)
    assert files_of(root) == before
    assert [m.model_id for m in Store(root, read_only=True).models()] == [INFO.model_id]


def test_remove_refuses_filters_without_a_model(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--method/--positions/--baseline select vectors of one model: without --model they are
    refused (they were ignored, and the persona went everywhere)."""
    before = files_of(root)
    for option, value in (
        ("--method", "imported"),
        ("--baseline", "base"),
        ("--positions", "prompt_last"),
    ):
        assert cli().main(["remove", "pirate", option, value, "--store", str(root)]) == 2
        one_line_error(capsys, f"{option} {value}", "--model")
    assert cli().main(["remove", "pirate", "--neurons", "--store", str(root)]) == 2
    one_line_error(capsys, "--neurons", "--model")
    assert files_of(root) == before
    assert [e.persona for e in Store(root, read_only=True).vectors()] == ["pirate"]


def test_an_import_names_the_file_and_what_is_wrong_with_it(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "vectors.safetensors"
    folder.mkdir()
    lists = tmp_path / "lists.txt"
    lists.write_bytes(b"\xff\xfe teacher: [1, 2]")
    negative, wide = tmp_path / "negative.txt", tmp_path / "wide.txt"
    negative.write_text("teacher: [-1, 2]")
    wide.write_text(f"teacher: [1, {INFO.mlp_width}]")
    neurons = ["--neurons", "--label", "x", "--layer", "1"]
    before = files_of(root)
    for args, needle in (
        ([str(folder)], "it is a folder"),
        ([str(tmp_path / "gone.pt")], "no such file"),
        ([str(lists), *neurons], "not UTF-8 text"),
        ([str(negative), *neurons], "'[-1, 2]' is not one"),
        ([str(wide), *neurons], f"[{INFO.mlp_width}] are outside the MLP width"),
    ):
        assert cli().main(["import", *args, "--model", INFO.model_id, "--store", str(root)]) == 2
        one_line_error(capsys, args[0], needle)
    assert files_of(root) == before


def gguf_with(path: Path, layers: list[int]) -> None:
    writer = GGUFWriter(path, "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(layers))
    for layer in layers:
        writer.add_tensor(f"direction.{layer}", np.ones(8, np.float32) * layer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_direction_0_is_refused_with_a_reason(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "zero.gguf"
    gguf_with(path, [0, 1, 2])
    with pytest.raises(FormatError, match=r"direction\.0.*llama\.cpp.*start at 1"):
        read_vector(path, INFO, "zero")
    assert cli().main(["import", str(path), "--model", INFO.model_id, "--store", str(root)]) == 2
    one_line_error(capsys, "direction.0")
    fine = tmp_path / "fine.gguf"
    gguf_with(fine, [1, 2])
    assert torch.equal(
        read_vector(fine, INFO, "fine").vector[1:], torch.ones(2, 8) * torch.tensor([[1.0], [2.0]])
    )
    exported = write_vector(read_vector(fine, INFO, "fine"), tmp_path / "again.gguf", info=INFO)
    assert torch.equal(
        read_vector(exported, INFO, "again").vector, read_vector(fine, INFO, "f").vector
    )
