"""The run folder: a plain path and a pyarrow URI (file://, the same code path as s3:// or gs://) behave alike."""

import pickle

import pytest

from nas.errors import ConfigError
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
