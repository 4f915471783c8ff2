"""Random and adversarial inputs through the HTTP API and the store's CLI, seeded and bounded.

The page and the API are served in this process on a free localhost port (a copy of the app's
store); 60 requests with random values in the page's ``/chat`` and the API's chat completions,
and 12 runs of ``scripts/store.py``'s reading commands with junk arguments, each with a timeout.
Every answer must be a reply or a clear message (no traceback text), the server must keep
answering, and the store's files must be byte for byte what they were (none of these calls
writes). Then 16 runs of its writing commands (export, import of vectors and neuron lists,
remove, migrate) with junk mixed into real names and files, on a store copy of their own: a
refused write, and any export, must leave every file of the store as it was.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from personachat.app import main as app
from personachat.app.api.server import build_app, serve
from personachat.app.backend import Backend
from personachat.app.page import CSS, build_ui
from personachat.store import Store
from personachat.store.formats import write_vector
from tests.test_client import CONFIG, QUESTION, free_port, store_copy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(app.missing(CONFIG)), reason="the app's model or store is missing"),
]
__all__ = ["store_copy"]  # a fixture, used by name
ROOT = Path(__file__).resolve().parent.parent
JUNK: list[Any] = [
    "",
    " ",
    "\x00",
    "💥" * 50,
    "x" * 20_000,
    "-1",
    "1e308",
    "nan",
    "inf",
    "0:1e308",
    "1-999:2",
    "'; DROP TABLE vectors; --",
    "../../etc/passwd",
    -1,
    0,
    1.5,
    10**12,
    float("1e300"),
    None,
    True,
    [],
    {},
    [42],
    {"role": "system"},
]
FIELDS = ["message", "system_prompt", "layer_spec", "weights", "neurons", "max_new_tokens", "seed"]


def digest(folder: Path) -> str:
    """A hash of every file in the store (names and bytes)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def served(store_copy: Path) -> Iterator[tuple[str, Path]]:
    backend = Backend(CONFIG.model, store_copy)
    demo = build_ui(backend)
    demo.queue()
    server = serve(build_app(demo, backend, css=CSS), "127.0.0.1", free_port())
    try:
        yield server.url, store_copy
    finally:
        server.close()
        backend.close()


def test_random_requests_get_replies_or_clear_messages_and_change_nothing(
    served: tuple[str, Path],
) -> None:
    from gradio_client import Client

    url, store = served
    before = digest(store)
    rng = random.Random(20)
    page = Client(url + "/", verbose=False, download_files=False)
    api = url + "/v1/chat/completions"
    for i in range(60):
        junk = rng.choice(JUNK)
        if i % 2 == 0:
            settings: dict[str, Any] = {"message": QUESTION, "history": [], "max_new_tokens": 4}
            settings[rng.choice([*FIELDS, "history", "personas"])] = junk
            try:
                out = page.predict(**settings, model_id=CONFIG.model, api_name="/chat")
                said = str(out[3])
                assert said.startswith(("Done", "⚠")), said
            except Exception as err:  # Gradio's own check of a value's type, said in words
                said = str(err)
        else:
            body: dict[str, Any] = {"model": CONFIG.model, "max_tokens": 4}
            body["messages"] = [{"role": "user", "content": QUESTION}]
            key = rng.choice(["messages", "max_tokens", "temperature", "seed", "steering", "stop"])
            body[key] = junk if key != "messages" else [{"role": "user", "content": junk}]
            response = httpx.post(api, json=body, timeout=60)
            assert response.status_code in (200, 400), response.text[:300]
            said = response.text
        assert "Traceback" not in said and "upstream app has raised" not in said, said[:300]
    assert digest(store) == before
    alive = httpx.post(
        api,
        json={
            "model": CONFIG.model,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": QUESTION}],
        },
        timeout=60,
    )
    assert alive.status_code == 200


def test_junk_arguments_to_the_store_cli_give_messages_not_tracebacks(
    served: tuple[str, Path],
) -> None:
    store = served[1]
    before = digest(store)
    rng = random.Random(21)
    commands = ["list", "show", "sql", "verify"]
    for _ in range(12):
        args = [rng.choice(commands), *(cli_text(rng.choice(JUNK)) for _ in range(2))]
        run = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "store.py"), "--store", str(store), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert "Traceback" not in run.stderr + run.stdout, (args, run.stderr[-500:])
    assert digest(store) == before


def cli_text(value: Any) -> str:
    """A junk value as one command-line argument (at most 200 characters, no NUL byte)."""
    return str(value).replace("\x00", "\\0")[:200]


def vector_files(folder: Path, rng: random.Random, real: Path) -> list[Path]:
    """Files to import, damaged each its own way, and ``real`` (a good exported vector)."""
    folder.mkdir()
    data = real.read_bytes()
    pt = folder / "good.pt"
    torch.save(torch.zeros(2, 3), pt)
    zipped = bytearray(pt.read_bytes())
    at = zipped.rfind(b"PK\x06\x07") + 4
    zipped[at : at + 4] = (1).to_bytes(4, "little")  # a zip64 archive "on two disks"
    files: dict[str, bytes] = {
        "empty.safetensors": b"",
        "noise.safetensors": rng.randbytes(300),
        "noise.gguf": b"GGUF" + rng.randbytes(200),
        "noise.npz": b"PK\x03\x04" + rng.randbytes(200),
        "noise.pt": rng.randbytes(200),
        "text.pt": b"junk\n",
        "disks.pt": bytes(zipped),
        "noise.json": rng.randbytes(100),
        "noise.txt": "💥".encode() * 10,
        "truncated.safetensors": data[: len(data) // 2],
        "header_only.safetensors": data[:8],
        "pirate.safetensors": data,
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    (folder / "a_folder.safetensors").mkdir()
    return [folder / name for name in ["a_folder.safetensors", "gone.pt", "good.pt", *files]]


def list_files(folder: Path, rng: random.Random, n_units: int) -> list[Path]:
    """Neuron index lists to import: junk JSON, text and bytes, and one good list."""
    folder.mkdir()
    files = {
        "number.json": b"42",
        "deep.json": b"[" * 50_000 + b"]" * 50_000,
        "deep_dict.json": b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
        "floats.json": b"[1.5, 1e400]",
        "negative.txt": b"teacher: [-1, 2]",
        "too_large.txt": f"teacher: [1, {n_units}, {10**30}]".encode(),
        "empty.txt": b"",
        "bytes.txt": b"\xff\xfe" + rng.randbytes(120),
        "good.txt": b"a man vs a woman: [1, 2, 3]\na son vs a daughter: [3, 4]",
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return [folder / name for name in files]


class Arguments:
    """Command lines mixing junk with the store's real model, personas and neuron sets."""

    def __init__(self, rng: random.Random, personas: list[str], labels: list[str]) -> None:
        self.rng, self.personas, self.labels = rng, personas, labels

    def junk(self) -> str:
        return cli_text(self.rng.choice(JUNK))

    def real_or_junk(self, names: list[str], real: float = 0.6) -> str:
        return self.rng.choice(names) if self.rng.random() < real else self.junk()

    def maybe(self, *options: str, chance: float = 0.4) -> list[str]:
        return list(options) if self.rng.random() < chance else []

    def model(self) -> list[str]:
        """The real model, a junk one, or a new one with sizes (registered only with what an
        import brings for it)."""
        pick = self.rng.random()
        if pick < 0.7:
            return ["--model", CONFIG.model]
        if pick < 0.85:
            return ["--model", self.junk()]
        return ["--model", "fuzz/new", "--n-layers", "2", "--hidden-size", "3", "--mlp-width", "8"]

    def export(self) -> list[str]:
        name = self.junk().replace("/", "_") or "out"
        suffix = self.rng.choice([".gguf", ".gguf", ".pt", ".safetensors", ".txt", ""])
        out = Path("out", "a", "b", name + suffix)  # "../.." stays inside the test's folder
        persona = self.real_or_junk(self.personas, 0.8)
        args = ["export", persona, *self.model()[:2], "--out", str(out)]
        layers = (str(self.rng.choice([0, 1, 2, -1, 10**6])) for _ in range(2))
        args += self.maybe("--layers", *layers)
        args += self.maybe("--scale", self.rng.choice(["nan", "inf", "-1e308", "0", "2.5"]))
        return args + self.maybe("--method", self.junk(), chance=0.2)

    def import_vectors(self, files: list[Path]) -> list[str]:
        """A junk file, or (one time in three) the good ones: a real vector, a new model's."""
        good = [f for f in files if f.stem in ("pirate", "good")]
        file = self.rng.choice(good if self.rng.random() < 0.35 else files)
        args = ["import", str(file), *self.model()]
        args += self.maybe("--persona", self.real_or_junk(self.personas, 0.3))
        args += self.maybe("--layer", str(self.rng.choice([0, 2, -1, 10**12])))
        return args + self.maybe("--baseline", self.junk(), chance=0.2)

    def import_neurons(self, files: list[Path]) -> list[str]:
        args = ["import", str(self.rng.choice(files)), "--neurons", *self.model()]
        args += ["--label", self.real_or_junk([*self.labels, "fuzz"], 0.7)]
        return [*args, "--layer", str(self.rng.choice([0, 1, -1, 4, 10**12]))]

    def remove(self) -> list[str]:
        args = ["remove", self.real_or_junk(self.personas)]
        args += self.maybe("--model", CONFIG.model, chance=0.6)
        return args + self.maybe("--method", self.junk(), chance=0.3)

    def remove_neurons(self) -> list[str]:
        args = ["remove", self.real_or_junk(self.labels), "--neurons"]
        return args + self.maybe("--model", self.real_or_junk([CONFIG.model], 0.8), chance=0.8)


def store_cli(store: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "store.py"), "--store", str(store), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_junk_writes_to_the_store_cli_are_refused_cleanly_and_change_nothing(
    tmp_path: Path,
) -> None:
    """16 runs of export, import (vectors and neuron lists), remove and migrate with junk mixed
    into the store's real model, personas, neuron sets and files, on a copy of the store of this
    test's own. Each ends with exit 0 or one clear error line (never a traceback); a refused
    write, and any export, leaves every file of the store byte for byte as it was; afterwards
    every row's file is there and intact, and the catalog opens."""
    store = tmp_path / "store"
    shutil.copytree(ROOT / CONFIG.store, store, ignore=shutil.ignore_patterns("models"))
    with Store(store, read_only=True) as opened:
        personas = sorted({e.persona for e in opened.vectors(CONFIG.model)})
        labels = [e.label for e in opened.neuron_sets(CONFIG.model)]
        info = opened.model(CONFIG.model)
        real = opened.load_vector(CONFIG.model, personas[0])
    assert personas and labels
    rng = random.Random(22)
    make = Arguments(rng, personas, labels)
    exported = write_vector(real, tmp_path / "real.safetensors")
    vectors = vector_files(tmp_path / "vectors", rng, exported)
    lists = list_files(tmp_path / "lists", rng, info.mlp_width)
    kinds = ["export"] * 4 + ["import"] * 5 + ["neurons"] * 3 + ["remove"] * 2
    kinds += ["remove neurons", "migrate"]
    rng.shuffle(kinds)
    outcomes: list[tuple[str, str]] = []
    for kind in kinds:
        args = {
            "export": make.export,
            "import": lambda: make.import_vectors(vectors),
            "neurons": lambda: make.import_neurons(lists),
            "remove": make.remove,
            "remove neurons": make.remove_neurons,
            "migrate": lambda: ["migrate"],
        }[kind]()
        before = digest(store)
        run = store_cli(store, args, tmp_path)
        said = run.stderr + run.stdout
        assert "Traceback" not in said, (args, said[-800:])
        assert run.returncode in (0, 1, 2), (args, run.returncode, said[-800:])
        outcome = "done"
        if run.returncode != 0:
            errors = [line for line in run.stderr.splitlines() if "error: " in line]
            assert len(errors) == 1 and errors[0].split("error: ", 1)[1].strip(), (args, said)
            outcome = "refused" if errors[0].startswith("error: ") else "usage"  # argparse's
        if run.returncode != 0 or kind == "export":
            assert digest(store) == before, (args, run.returncode, said[-800:])
        outcomes.append((kind, outcome))
    assert sum(o != "usage" for _, o in outcomes) >= 12, outcomes  # most reached the store
    assert {k for k, o in outcomes if o == "done"} >= {"export", "import", "migrate"}, outcomes
    check = store_cli(store, ["verify"], tmp_path)
    assert check.returncode == 0, check.stdout[-800:] + check.stderr[-800:]
    with Store(store, read_only=True) as opened:
        assert opened.model(CONFIG.model) == info
