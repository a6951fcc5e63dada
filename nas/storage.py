"""The run folder every node shares: a local path (one machine, or an NFS mount on every node) or a URI that
pyarrow understands (`s3://bucket/runs`, `gs://…`, `hdfs://…`, `file:///mnt/shared/runs`).

A plain path is read and written in place. For a URI, writers work in a local scratch folder and copy it up
through pyarrow; readers copy down what they need into the local cache. Every write is whole-file: a reader
sees the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nas.errors import ConfigError
from nas.files import atomic_dir, atomic_path, cache_dir


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
        if not self.exists(rel):
            return None
        with self.fs.open_input_stream(self._remote(rel)) as f:
            return f.read().decode()

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
        import pyarrow.fs

        if local.is_dir():
            # Objects are written one by one; `result.json`-style markers are uploaded last by the callers.
            self.fs.create_dir(self._remote(rel), recursive=True)
            pyarrow.fs.copy_files(str(local), self._remote(rel), destination_filesystem=self.fs)
        else:
            parent = self._remote(rel).rsplit("/", 1)[0]
            self.fs.create_dir(parent, recursive=True)
            tmp = f"{self._remote(rel)}.{uuid.uuid4().hex[:8]}.tmp"
            pyarrow.fs.copy_files(str(local), tmp, destination_filesystem=self.fs)
            self.fs.move(tmp, self._remote(rel))

    def write_json(self, rel: str, data: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(rel).name
            path.write_text(json.dumps(data, indent=2) + "\n")
            self.upload(path, rel)

    def fetch(self, rel: str) -> Path:
        """A local path holding `rel`: the file itself, or a copy in the local cache (re-copied when it changed)."""
        if not self.remote:
            return Path(self.base) / rel
        import pyarrow.fs

        info = self.fs.get_file_info(self._remote(rel))
        key = hashlib.sha256(f"{self.uri}/{rel}{info.size}{info.mtime_ns}".encode()).hexdigest()[:16]
        target = cache_dir() / "storage" / key / Path(rel).name
        if not target.exists():
            # atomic_dir makes the folder pyarrow copies a folder's files into; atomic_path the file it overwrites.
            atomic = atomic_dir if info.type == pyarrow.fs.FileType.Directory else atomic_path
            with atomic(target) as tmp:
                pyarrow.fs.copy_files(self._remote(rel), str(tmp), source_filesystem=self.fs)
        return target

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

