"""Tensor files: crash-safe writes, checked reads, leftover recovery.

A file on its way in is written to ``<final>.<pid>.tmp`` and fsynced *before* the catalog lock is
taken (``staged``: threads writing in parallel share the file system's journal commits); under
the lock it is renamed to its final name and the directory fsynced (``published``), and the
catalog rows are committed. A failure before the commit deletes the renamed files again; files a
replaced or removed row pointed to are deleted after the commit. So a crash leaves at worst
unreferenced files, never a row without its file, and ``recover`` (run when a writable ``Store``
opens, under the lock) deletes them. ``read_checked`` re-hashes a file and checks its shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from personachat.store.errors import IntegrityError
from personachat.store.tensorfile import parse_safetensors

log = logging.getLogger(__name__)

STALE_TMP_SECONDS = 24 * 3600
WRITE_THREADS = 16
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


def tmp_path(final: Path) -> Path:
    return final.with_name(f"{final.name}.{os.getpid()}.tmp")


def write_tmp(final: Path, data: bytes) -> Path:
    """Write ``data`` next to ``final`` as ``<name>.<pid>.tmp`` and fsync it."""
    tmp = tmp_path(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Pending:
    """A tensor file on its way in: bytes, checksum, final and temporary paths."""

    rel: str
    final: Path
    data: bytes
    sha256: str
    tmp: Path | None = None


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
    def staged(self, pending: list[Pending]) -> Iterator[None]:
        """Write every file to its fsynced ``.tmp`` file; the block's end deletes what is left."""
        try:
            for folder in {item.final.parent for item in pending}:
                folder.mkdir(parents=True, exist_ok=True)
            for item in pending:
                item.tmp = tmp_path(item.final)
            with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
                list(pool.map(lambda item: write_tmp(item.final, item.data), pending))
            yield
        finally:
            for item in pending:
                if item.tmp is not None:
                    item.tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def published(self, pending: list[Pending]) -> Iterator[None]:
        """Rename staged files to their final names (directories fsynced); if the block raises,
        delete them again. Run under the catalog lock, around the transaction naming them."""
        renamed: list[Path] = []
        try:
            for item in pending:
                assert item.tmp is not None
                os.replace(item.tmp, item.final)
                renamed.append(item.final)
            for folder in {item.final.parent for item in pending}:
                fsync_dir(folder)
            yield
        except BaseException:
            for path in renamed:
                path.unlink(missing_ok=True)
            raise

    def remove(self, rels: Iterable[str]) -> None:
        """Delete files (relative to the root) that no row references any more."""
        for rel in rels:
            (self.root / rel).unlink(missing_ok=True)

    def _candidates(self) -> list[Path]:
        found: list[Path] = list(self.root.glob("*.tmp"))
        for sub in TENSOR_DIRS:
            if (self.root / sub).is_dir():
                found.extend(p for p in (self.root / sub).rglob("*") if p.is_file())
        return found

    def recover(self, referenced: set[str]) -> None:
        """Delete temporary files of dead writers and tensor files no row references."""
        now = time.time()
        for path in self._candidates():
            if path.name.endswith(".tmp"):
                pid_text = path.name.rsplit(".", 2)[-2]
                pid = int(pid_text) if pid_text.isdigit() else -1
                age = now - path.stat().st_mtime
                if pid < 0 or not pid_alive(pid) or age > STALE_TMP_SECONDS:
                    log.warning("store: removing temporary file of an interrupted write: %s", path)
                    path.unlink(missing_ok=True)
            elif path.suffix == ".safetensors":
                rel = path.relative_to(self.root).as_posix()
                if rel not in referenced:
                    log.warning("store: removing file no catalog row references: %s", path)
                    path.unlink(missing_ok=True)

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
            raise IntegrityError(
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

    def verify(self, rows: list[tuple[str, str]]) -> list[str]:
        """Problems found: (file, sha256) rows whose file is missing or altered, and files no
        row references."""
        problems: list[str] = []
        referenced: set[str] = set()
        for rel, sha in rows:
            referenced.add(rel)
            path = self.root / rel
            if not path.is_file():
                problems.append(f"missing file {path}")
            elif sha256_file(path) != sha:
                problems.append(f"{path}: sha256 {sha256_file(path)} != catalog {sha}")
        for sub in TENSOR_DIRS:
            for path in sorted((self.root / sub).rglob("*")) if (self.root / sub).is_dir() else []:
                if path.is_file() and path.relative_to(self.root).as_posix() not in referenced:
                    problems.append(f"unreferenced file {path}")
        return problems
