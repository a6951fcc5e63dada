import json

import pandas as pd
import pytest
import torch

from nas.data import load_tokens, pack, read_texts, split
from nas.errors import DataError


def test_jsonl_parquet_and_directory_sources(tmp_path, tiny_tokenizer):
    docs = ["the first document is here", "and a second one follows", "a third to finish"]
    (tmp_path / "d").mkdir()
    with (tmp_path / "d" / "a.jsonl").open("w") as f:
        for doc in docs[:2]:
            f.write(json.dumps({"body": doc}) + "\n")
    pd.DataFrame({"body": docs[2:]}).to_parquet(tmp_path / "d" / "b.parquet")
    assert read_texts(str(tmp_path / "d"), text_field="body") == docs
    with pytest.raises(DataError, match="record has no field 'text'; set --text-field"):
        read_texts(str(tmp_path / "d" / "a.jsonl"))


def test_pack_joins_documents_with_eos_and_drops_the_tail(tiny_tokenizer):
    ids = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("hello world", "good day")]
    flat = ids[0] + [tiny_tokenizer.eos_token_id] + ids[1] + [tiny_tokenizer.eos_token_id]
    packed = pack(["hello world", "good day"], tiny_tokenizer, 3)
    assert packed.tolist() == torch.tensor(flat[: len(flat) // 3 * 3]).view(-1, 3).tolist()


def test_tokens_are_cached_and_split_deterministically(text_file, tiny_tokenizer):
    first = load_tokens(str(text_file), tiny_tokenizer, 32)
    assert torch.equal(load_tokens(str(text_file), tiny_tokenizer, 32), first)
    train, val = split(first, 0.1, seed=3)
    again_train, again_val = split(first, 0.1, seed=3)
    assert torch.equal(val, again_val) and train.shape[0] + val.shape[0] == first.shape[0]
    assert not torch.equal(split(first, 0.1, seed=4)[1], val)


def test_missing_and_unsupported_sources_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        read_texts(str(tmp_path / "nope.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        read_texts(str(tmp_path / "x.csv"))


def test_corrupt_token_cache_is_recomputed_not_trusted(text_file, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NAS_CACHE", str(tmp_path / "cache"))
    first = load_tokens(str(text_file), tiny_tokenizer, 32)
    [cached] = (tmp_path / "cache" / "tokens").iterdir()
    cached.write_bytes(cached.read_bytes()[:50])  # a crash mid-write elsewhere, or a damaged disk
    assert torch.equal(load_tokens(str(text_file), tiny_tokenizer, 32), first)
    assert cached.stat().st_size > 50  # rewritten whole
