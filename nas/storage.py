"""The run folder every node shares: a local path (one machine, or an NFS mount on every node) or a URI that
pyarrow understands (`s3://bucket/runs`, `gs://…`, `hdfs://…`, `file:///mnt/shared/runs`).

A plain path is read and written in place. For a URI, writers work in a local scratch folder and copy it up
through pyarrow; readers copy down what they need into the local cache. Every write is whole-file: a reader
sees the old file or the new one, never a half-written one. A folder is uploaded file by file, its markers
(`MARKERS`: the files that say the folder around them is complete) last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any

from nas.errors import ConfigError
from nas.files import atomic_dir, atomic_path, cache_dir


# Written last by their folders' writers (token shards and teacher caches, trials, checkpoints): present means complete.
MARKERS = ("index.json", "result.json", "state.json")
INDEX = "index.json"  # a folder's content name where it has one (see `fetch`)


def is_uri(location: str) -> bool:
    return "://" in str(location)


class RunStorage:
    """One run folder (`root/<study>`); paths below are relative to it, '/'-separated."""

    def __init__(self, root: str | Path, study: str):
        root = str(root)
        self.uri = f"{root.rstrip('/')}/{study}" if is_uri(root) else str(Path(root).resolve() / study)
        self.remote = is_uri(root)
        if self.remote:
            import pyarrow.fs

            try:
                self.fs, self.base = pyarrow.fs.FileSystem.from_uri(self.uri)
            except Exception as e:  # unknown scheme, missing credentials or bucket
                raise ConfigError(f"--root {root}: not a storage URI pyarrow can open ({e})") from None
        else:
            self.fs, self.base = None, self.uri

    def __reduce__(self):  # pyarrow filesystems are rebuilt on each node, not pickled
        root, _, study = self.uri.rpartition("/")
        return RunStorage, (root, study)

    @property
    def local(self) -> Path | None:
        """The folder itself when it is a plain path, else None."""
        return None if self.remote else Path(self.base)

    def _remote(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    # -- files ---------------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        if not self.remote:
            return (Path(self.base) / rel).exists()
        import pyarrow.fs

        return self.fs.get_file_info(self._remote(rel)).type != pyarrow.fs.FileType.NotFound

    def read_text(self, rel: str) -> str | None:
        if not self.remote:
            path = Path(self.base) / rel
            return path.read_text() if path.exists() else None
        data = self._read_bytes(rel)
        return None if data is None else data.decode()

    def _read_bytes(self, rel: str) -> bytes | None:
        if not self.exists(rel):
            return None
        with self.fs.open_input_stream(self._remote(rel)) as f:
            return f.read()

    def read_json(self, rel: str) -> Any:
        text = self.read_text(rel)
        return None if text is None else json.loads(text)

    def upload(self, local: str | Path, rel: str) -> None:
        """Copy a local file or folder to `rel` (a no-op when the storage is that local folder)."""
        local = Path(local)
        if not self.remote:
            target = Path(self.base) / rel
            if local.resolve() == target.resolve():
                return
            if local.is_dir():
                with atomic_dir(target) as tmp:
                    shutil.copytree(local, tmp, dirs_exist_ok=True)
            else:
                with atomic_path(target) as tmp:
                    shutil.copyfile(local, tmp)
            return
        if local.is_dir():
            self._upload_dir(local, self._remote(rel))
        else:
            self.fs.create_dir(self._remote(rel).rsplit("/", 1)[0], recursive=True)
            self._upload_file(local, self._remote(rel))

    def _upload_dir(self, local: Path, remote: str) -> None:
        """An object store has no folder rename, so a folder goes up file by file. Its markers are removed first and
        written last, so that an upload cut short (or one over an older copy) never shows a marker beside missing or
        stale files."""
        import pyarrow.fs

        files = sorted((p.relative_to(local) for p in local.rglob("*") if p.is_file()), key=_upload_order)
        targets = [f"{remote}/{f.as_posix()}" for f in files]
        for info in self.fs.get_file_info([t for f, t in zip(files, targets) if f.name in MARKERS]):
            if info.type != pyarrow.fs.FileType.NotFound:
                self.fs.delete_file(info.path)
        for folder in sorted({t.rsplit("/", 1)[0] for t in targets} | {remote}):
            self.fs.create_dir(folder, recursive=True)
        for f, target in zip(files, targets):
            self._upload_file(local / f, target, whole=f.name in MARKERS)

    def _upload_file(self, local: Path, remote: str, whole: bool = True) -> None:
        """One file; when `whole`, written beside `remote` and moved into place, so no reader sees part of it (a
        folder's other files need not be: its marker, written last, says when they are complete)."""
        import pyarrow.fs

        if not whole:
            pyarrow.fs.copy_files(str(local), remote, destination_filesystem=self.fs)
            return
        tmp = f"{remote}.{uuid.uuid4().hex[:8]}.tmp"
        pyarrow.fs.copy_files(str(local), tmp, destination_filesystem=self.fs)
        self.fs.move(tmp, remote)

    def download(self, rel: str, local: str | Path) -> None:
        """Copy file or folder `rel` to the local path `local` (for what is read once, such as a checkpoint to
        resume from: no copy is kept in the cache)."""
        local = Path(local)
        if not self.remote:
            source = Path(self.base) / rel
            shutil.copytree(source, local) if source.is_dir() else shutil.copyfile(source, local)
            return
        import pyarrow.fs

        if self.fs.get_file_info(self._remote(rel)).type == pyarrow.fs.FileType.Directory:
            local.mkdir(parents=True)  # copy_files makes the folders inside, not the one it is given
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(self._remote(rel), str(local), source_filesystem=self.fs)

    def listdir(self, rel: str) -> list[str]:
        """The names in folder `rel` (none when it does not exist)."""
        if not self.remote:
            path = Path(self.base) / rel
            return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        import pyarrow.fs

        if self.fs.get_file_info(self._remote(rel)).type != pyarrow.fs.FileType.Directory:
            return []
        found = self.fs.get_file_info(pyarrow.fs.FileSelector(self._remote(rel)))
        return sorted(info.base_name for info in found)

    def remove(self, rel: str) -> None:
        """Delete file or folder `rel`, if it exists."""
        if not self.remote:
            path = Path(self.base) / rel
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            return
        import pyarrow.fs

        kind = self.fs.get_file_info(self._remote(rel)).type
        if kind == pyarrow.fs.FileType.Directory:
            self.fs.delete_dir(self._remote(rel))
        elif kind == pyarrow.fs.FileType.File:
            self.fs.delete_file(self._remote(rel))

    def write_json(self, rel: str, data: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(rel).name
            path.write_text(json.dumps(data, indent=2) + "\n")
            self.upload(path, rel)

    def fetch(self, rel: str) -> Path:
        """A local path holding `rel`: the file itself, or a copy in the local cache named by its content.

        Object stores keep no reliable modification time (a copy or restore resets it, and a rewrite may keep the
        same size), so a copy is named by the sha256 of what was copied, never by size and mtime: `rel` is copied
        down and hashed on every call (one read, the one a changed object needs anyway), and a copy already in the
        cache under that name is reused. A folder with an `index.json` is named by that file alone: its writers
        (token shards, teacher caches) put the content's hash or key in it and upload it last, so a cached copy is
        found without reading the rest."""
        if not self.remote:
            return Path(self.base) / rel
        cache = cache_dir() / "storage"
        index = self._read_bytes(f"{rel}/{INDEX}")
        if index is not None and (cached := cache / _sha256(index) / Path(rel).name).exists():
            return cached
        import pyarrow.fs

        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
            copy = Path(tmp) / Path(rel).name
            if self.fs.get_file_info(self._remote(rel)).type == pyarrow.fs.FileType.Directory:
                copy.mkdir()  # copy_files makes the folders inside, not the one it is given
            pyarrow.fs.copy_files(self._remote(rel), str(copy), source_filesystem=self.fs)
            return _keep(copy, cache / _content_name(copy) / copy.name)

    @contextlib.contextmanager
    def workdir(self, rel: str) -> Iterator[Path]:
        """A local folder to write `rel` in: the folder itself for a plain path, else a scratch folder that the
        caller syncs with `upload` (and that is removed afterwards)."""
        if not self.remote:
            path = Path(self.base) / rel
            path.mkdir(parents=True, exist_ok=True)
            yield path
            return
        scratch = Path(tempfile.mkdtemp(prefix="nas-"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _upload_order(rel: PurePath) -> tuple:
    """Other files first (sorted), then markers deepest first: each marker follows everything under its folder."""
    marker = rel.name in MARKERS
    return marker, -len(rel.parts) if marker else 0, rel.as_posix()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _content_name(path: Path) -> str:
    """The sha256 of a file's bytes; of a folder's `index.json` where it has one, else of its files' names and
    hashes."""
    if (path / INDEX).is_file():
        return _sha256((path / INDEX).read_bytes())
    if path.is_file():
        return _file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return _sha256(json.dumps([(p.relative_to(path).as_posix(), _file_sha256(p)) for p in files]).encode())


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def _keep(copy: Path, target: Path) -> Path:
    """Move a fetched copy to its content-named place in the cache, unless the same content is there already."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(copy, target)
        except OSError:
            if not target.exists():  # not another process's copy of the same content, which got there first
                raise
    return target
