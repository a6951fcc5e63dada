"""The run folder: a plain path and a pyarrow URI (file://, the same code path as s3:// or gs://) behave alike."""

import os
import pickle
import threading
from pathlib import Path

import fsspec
import pyarrow.fs
import pytest

import nas.files
from nas.errors import ConfigError
from nas.files import atomic_dir
from nas.storage import RunStorage


@pytest.mark.parametrize("uri", [False, True])
def test_run_folder_reads_writes_uploads_and_fetches(tmp_path, monkeypatch, uri):
    monkeypatch.setenv("NAS_CACHE", str(tmp_path / "cache"))
    root = f"file://{tmp_path / 'runs'}" if uri else str(tmp_path / "runs")
    storage = pickle.loads(pickle.dumps(RunStorage(root, "study")))  # as a Ray task receives it
    assert storage.remote == uri and storage.read_json("a/result.json") is None and not storage.exists("a")
    storage.write_json("a/result.json", {"val_loss": 1.5})
    assert storage.read_json("a/result.json") == {"val_loss": 1.5}
    with storage.workdir("b") as work:
        (work / "model").mkdir()
        (work / "model" / "weights.bin").write_bytes(b"\0" * 10)
        storage.upload(work / "model", "b/model")
    assert (tmp_path / "runs" / "study" / "b" / "model" / "weights.bin").read_bytes() == b"\0" * 10
    fetched = storage.fetch("b/model")
    assert (fetched / "weights.bin").read_bytes() == b"\0" * 10
    assert (fetched.parent != tmp_path / "runs" / "study" / "b") == uri  # a URI's files are copied into the cache
    assert not list((tmp_path / "runs" / "study").rglob("*.tmp"))  # no half-written file left behind


def test_unknown_storage_scheme_is_one_clear_error():
    with pytest.raises(ConfigError, match="--root nope://x: not a storage URI pyarrow can open"):
        RunStorage("nope://x", "study")


def test_a_folder_replaced_by_atomic_dir_is_never_missing(tmp_path):
    path = tmp_path / "shards"
    with atomic_dir(path) as tmp:
        (tmp / "data").write_text("0")
    seen, done = [], threading.Event()

    def read():  # what a reader of the folder finds, over and over, while it is replaced
        while not done.is_set():
            try:
                seen.append(int((path / "data").read_text()) if path.exists() else "missing")
            except OSError as e:  # the folder there, but emptied
                seen.append(e.strerror)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(1, 300):
            with atomic_dir(path) as tmp:
                (tmp / "data").write_text(str(n))
    finally:
        done.set()
        reader.join()
    assert all(isinstance(s, int) for s in seen), {s for s in seen if not isinstance(s, int)}
    assert len(set(seen)) > 10 and seen == sorted(seen)  # read while it was replaced; the old folder or the new one
    assert (path / "data").read_text() == "299" and [p.name for p in tmp_path.iterdir()] == ["shards"]


def test_atomic_dir_replaces_a_folder_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(nas.files, "_renameat2", lambda: None)  # not Linux, or a glibc before 2.28
    for n in range(2):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / f"weights-{n}").write_text(str(n))
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and os.listdir(tmp_path / "model") == ["weights-1"]


class _Flaky(pyarrow.fs.FSSpecHandler):
    """The local disk through pyarrow's Python filesystem: records where files land, and fails writes of one name."""

    def __init__(self, fail: str | None = None):
        super().__init__(fsspec.filesystem("file"))
        self.fail, self.landed = fail, []

    def open_output_stream(self, path, metadata):
        if Path(path).name == self.fail:
            raise OSError("connection reset")
        if not path.endswith(".tmp"):
            self.landed.append(path)
        return super().open_output_stream(path, metadata)

    def move(self, src, dest):
        super().move(src, dest)
        self.landed.append(dest)


def test_a_folder_upload_writes_its_markers_last_so_a_cut_one_looks_unfinished(tmp_path):
    folder = tmp_path / "tokens"
    names = ["a.bin", "index.json", "shard-00000.bin", "shard-00001.bin", "step-1/state.json", "step-1/x.pt", "zz.bin"]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    storage = RunStorage(f"file://{tmp_path / 'runs'}", "study")
    storage.fs = pyarrow.fs.PyFileSystem(flaky := _Flaky(fail="shard-00001.bin"))
    remote = tmp_path / "runs" / "study" / "tokens"
    with pytest.raises(OSError, match="connection reset"):
        storage.upload(folder, "tokens")
    assert not (remote / "index.json").exists()  # no index over a missing shard
    flaky.fail = None
    flaky.landed.clear()
    storage.upload(folder, "tokens")
    order = [Path(p).relative_to(remote).as_posix() for p in flaky.landed]
    assert sorted(order) == names and order[-2:] == ["step-1/state.json", "index.json"]
    assert (remote / "shard-00001.bin").read_text() == "shard-00001.bin"
    (folder / "shard-00001.bin").write_text("changed")
    flaky.fail = "shard-00001.bin"
    with pytest.raises(OSError, match="connection reset"):
        storage.upload(folder, "tokens")
    assert not (remote / "index.json").exists()  # nor an old index over a half-replaced folder


def _rewrite(path: Path, data: bytes) -> None:
    """New content of the same size under the old mtime, as an object store may report a rewritten object."""
    before = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_fetch_names_its_copy_by_content_not_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("NAS_CACHE", str(tmp_path / "cache"))
    storage = RunStorage(f"file://{tmp_path / 'runs'}", "study")
    remote = tmp_path / "runs" / "study"
    for name in ("importance.safetensors", "model/weights.bin", "tokens/shard-00000.bin"):
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        (remote / name).write_bytes(b"old!")
    (remote / "tokens" / "index.json").write_text('{"sha256": "0ld"}')
    assert storage.fetch("importance.safetensors").read_bytes() == b"old!"
    assert (storage.fetch("model") / "weights.bin").read_bytes() == b"old!"
    tokens = storage.fetch("tokens")
    assert (tokens / "shard-00000.bin").read_bytes() == b"old!"
    for name in ("importance.safetensors", "model/weights.bin", "tokens/shard-00000.bin"):
        _rewrite(remote / name, b"new!")
    _rewrite(remote / "tokens" / "index.json", b'{"sha256": "n3w"}')
    assert storage.fetch("importance.safetensors").read_bytes() == b"new!"
    assert (storage.fetch("model") / "weights.bin").read_bytes() == b"new!"
    assert (storage.fetch("tokens") / "shard-00000.bin").read_bytes() == b"new!"
    assert (tokens / "shard-00000.bin").read_bytes() == b"old!"  # a copy in use is never overwritten
    (remote / "tokens" / "shard-00000.bin").unlink()  # an index already cached is not copied again
    assert (storage.fetch("tokens") / "shard-00000.bin").read_bytes() == b"new!"


@pytest.mark.parametrize("uri", [False, True])
def test_listdir_and_remove(tmp_path, uri):
    root = f"file://{tmp_path}/runs" if uri else tmp_path / "runs"
    storage = RunStorage(root, "study")
    assert storage.listdir("run/checkpoint") == []
    for step in ("step-000010", "step-000005"):
        storage.write_json(f"run/checkpoint/{step}/state.json", {"step": int(step[5:])})
    storage.write_json("run/metrics.json", {})
    assert storage.listdir("run/checkpoint") == ["step-000005", "step-000010"]
    storage.remove("run/checkpoint/step-000005")
    storage.remove("run/metrics.json")
    storage.remove("run/nothing-here")
    assert storage.listdir("run/checkpoint") == ["step-000010"] and storage.listdir("run") == ["checkpoint"]
    assert (tmp_path / "runs" / "study" / "run" / "checkpoint" / "step-000010" / "state.json").exists()


def test_two_processes_converting_a_named_parent_at_once_both_succeed(tmp_path, monkeypatch, tiny_tokenizer):
    """Two tasks on a fresh node convert the same named parent at once: both reach the final rename together
    (held at a barrier), one copy is kept whole, and neither fails (ENOTEMPTY) nor leaves a scratch folder."""
    import multiprocessing

    from transformers import AutoModelForCausalLM

    import nas.parents
    from conftest import ALL_CONFIGS

    monkeypatch.setenv("NAS_CACHE", str(tmp_path))
    target = tmp_path / "parents" / "tiny"

    class GGUFLoader:  # the package's GGUF, dequantised: a tiny llama (transformers' GGUF reader is not the point)
        @staticmethod
        def from_pretrained(*_args, **_kwargs):
            model = AutoModelForCausalLM.from_config(ALL_CONFIGS["llama"]())
            model.config.quantization_config = {}
            return model

        from_config = staticmethod(AutoModelForCausalLM.from_config)

    monkeypatch.setattr(nas.parents, "AutoModelForCausalLM", GGUFLoader)
    tokenizer = type("Tokenizer", (), {"from_pretrained": lambda *_a, **_k: tiny_tokenizer})
    monkeypatch.setattr(nas.parents, "AutoTokenizer", tokenizer)
    monkeypatch.setitem(nas.parents.NAMED_PARENTS, "tiny",
                        nas.parents.NamedParent("nas", "-", lambda _package, scratch: scratch / "tiny.gguf"))
    context = multiprocessing.get_context("fork")
    barrier, rename = context.Barrier(2), os.rename

    def rename_together(src, dst, *args, **kwargs):
        if Path(dst) == target:
            barrier.wait(timeout=60)
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename_together)

    def convert():
        try:
            nas.parents.resolve_parent("tiny")
        except BaseException as e:  # noqa: BLE001 (reported by the exit code)
            print(f"conversion failed: {e!r}", flush=True)
            os._exit(1)
        os._exit(0)

    tasks = [context.Process(target=convert) for _ in range(2)]
    for task in tasks:
        task.start()
    for task in tasks:
        task.join(120)
    assert [task.exitcode for task in tasks] == [0, 0]
    assert AutoModelForCausalLM.from_pretrained(target).num_parameters() == \
        AutoModelForCausalLM.from_config(ALL_CONFIGS["llama"]()).num_parameters()
    assert sorted(p.name for p in (tmp_path / "parents").iterdir()) == ["tiny"]
