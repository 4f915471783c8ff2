"""Tensor files: where they live, crash-safe batches, checked reads, leftover recovery.

A batch's files are staged under ``.staging`` before the catalog lock is taken, journaled and
renamed into place under it, just before the commit of the rows naming them, and the files of
replaced rows are deleted after it (``staging.py``). So a crash leaves at worst files no row
names, each of them under ``.staging`` or listed in the dead writer's journal there; never a row
without its file. ``leftovers`` lists them (``verify`` does not count them as problems) and
``recover`` deletes them, with any other file no row names, when a writable ``Store`` opens;
every write of tensors first deletes what dead writers left. ``read_checked`` re-hashes a file
and checks its shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from personachat.store.errors import IntegrityError, MissingFileError
from personachat.store.staging import (
    STAGING,
    Batch,
    Pending,
    interrupted,
    is_dead,
    read_journal,
    recover_interrupted,
)
from personachat.store.tensorfile import parse_safetensors

log = logging.getLogger(__name__)

TENSOR_DIRS = ("vectors", "means")


def default_store_root() -> Path:
    """``$PERSONACHAT_STORE`` if set, else ``store/`` at the repository root."""
    env = os.environ.get("PERSONACHAT_STORE")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "store"


def model_slug(model_id: str) -> str:
    """A directory name for a model id: 'org/name' -> 'org--name', other unsafe chars -> '-'."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "-", model_id.replace("/", "--")).lstrip(".-")[:100]
    return slug or "model"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TensorFiles:
    """The tensor files under a store root: ``vectors/`` and ``means/``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def pending(self, rel: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Pending:
        """The bytes of a safetensors file to be written at ``rel``, with their sha256."""
        data = st_save(tensors, metadata=meta)
        final = self.root / rel
        return Pending(rel, final, data, hashlib.sha256(data).hexdigest())

    @contextlib.contextmanager
    def batch(self, pending: list[Pending]) -> Iterator[Batch]:
        """A write's files: staged when the block starts, to be published under the lock
        (``Batch.publish``, then set ``committed``); finished when the block ends."""
        batch = Batch(self.root, pending)
        try:
            batch.stage()
            yield batch
        finally:
            batch.finish()

    def clean(self, referenced: Callable[[], set[str]]) -> None:
        """Delete what dead writers left (under the catalog lock, before every write)."""
        recover_interrupted(self.root, referenced)

    def _candidates(self) -> list[Path]:
        found: list[Path] = list(self.root.glob("*.tmp"))
        for sub in TENSOR_DIRS:
            if (self.root / sub).is_dir():
                found.extend(p for p in (self.root / sub).rglob("*") if p.is_file())
        return found

    def recover(self, referenced: set[str]) -> None:
        """Delete what interrupted writes left and every tensor file no row references (run
        under the catalog lock, when a writable Store opens)."""
        recover_interrupted(self.root, lambda: referenced)
        now = time.time()
        for path in self._candidates():
            if path.name.endswith(".tmp"):
                if is_dead(path, now):
                    log.warning("store: removing temporary file of an interrupted write: %s", path)
                    path.unlink(missing_ok=True)
            elif path.suffix == ".safetensors":
                rel = path.relative_to(self.root).as_posix()
                if rel not in referenced:
                    log.warning("store: removing file no catalog row references: %s", path)
                    path.unlink(missing_ok=True)

    def leftovers(self, referenced: set[str]) -> list[str]:
        """What dead writers left (relative paths): staged files and journals under
        ``.staging``, and the files their journals list that no row references."""
        found = interrupted(self.root, lambda: referenced)
        return sorted(p.relative_to(self.root).as_posix() for p in found)

    def read_checked(
        self, rel: str, sha256: str, shape: tuple[int, int], hidden_size: int | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and metadata of a file, after checking its sha256 and shape."""
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise IntegrityError(f"catalog row points outside the store: {rel!r}")
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise MissingFileError(
                f"{path} is missing but the catalog lists it (sha256 {sha256}); remove the row "
                "(scripts/store.py remove) and register the vector again"
            ) from err
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise IntegrityError(
                f"{path}: sha256 is {actual} but the catalog expects {sha256}; the file was "
                "changed or damaged. Re-register or remove it"
            )
        tensors, meta = parse_safetensors(data, str(path), IntegrityError)
        key = "vector" if "vector" in tensors else "mean"
        if key not in tensors:
            raise IntegrityError(
                f"{path} has no 'vector' or 'mean' tensor (it holds {sorted(tensors)}); the "
                "file was replaced. Re-register or remove it"
            )
        actual_shape = tuple(tensors[key].shape)
        if actual_shape != shape:
            raise IntegrityError(f"{path}: shape is {actual_shape} but the catalog expects {shape}")
        if hidden_size is not None and shape[1] != hidden_size:
            raise IntegrityError(
                f"{path}: vector has {shape[1]} dims per layer but the model in use has hidden "
                f"size {hidden_size}; it was extracted from another model"
            )
        return tensors, meta

    def intact(self, rel: str, sha: str) -> bool:
        """Whether the file ``rel`` exists and still has the checksum ``sha``."""
        path = self.root / rel
        return path.is_file() and sha256_file(path) == sha

    def verify(self, rows: list[tuple[str, str]]) -> list[str]:
        """Problems found: (file, sha256) rows whose file is missing or altered, and files no
        row references that no journal lists (a write's journal lists the files it is
        publishing or deleting: in flight, or left by an interrupted write)."""
        problems: list[str] = []
        referenced: set[str] = set()
        for rel, sha in rows:
            referenced.add(rel)
            path = self.root / rel
            if not path.is_file():
                problems.append(f"missing file {path}")
            elif sha256_file(path) != sha:
                problems.append(f"{path}: sha256 {sha256_file(path)} != catalog {sha}")
        journals = (self.root / STAGING).glob("*.journal")
        journaled = {rel for journal in journals for rel in read_journal(journal)}
        for sub in TENSOR_DIRS:
            for path in sorted((self.root / sub).rglob("*")) if (self.root / sub).is_dir() else []:
                rel = path.relative_to(self.root).as_posix()
                if path.is_file() and rel not in referenced and rel not in journaled:
                    problems.append(f"unreferenced file {path}")
        return problems
