import json

import numpy as np
import pandas as pd
import pytest
import torch

from nas.data import iter_texts, load_tokens, split, tokenize
from nas.errors import DataError
from nas.tokens import TokenSet, token_dtype, write_shards


def _reference(texts, tokenizer, seq_len):
    """The packing rule written out: documents joined with EOS, cut into rows, the tail dropped."""
    flat = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    return torch.tensor(flat[: len(flat) // seq_len * seq_len]).view(-1, seq_len)


def test_jsonl_parquet_and_directory_sources(tmp_path, tiny_tokenizer):
    docs = ["the first document is here", "and a second one follows", "a third to finish"]
    (tmp_path / "d").mkdir()
    with (tmp_path / "d" / "a.jsonl").open("w") as f:
        for doc in docs[:2]:
            f.write(json.dumps({"body": doc}) + "\n")
    pd.DataFrame({"body": docs[2:]}).to_parquet(tmp_path / "d" / "b.parquet")
    assert list(iter_texts(str(tmp_path / "d"), text_field="body")) == docs
    with pytest.raises(DataError, match="record has no field 'text'; set --text-field"):
        list(iter_texts(str(tmp_path / "d" / "a.jsonl")))


def test_shards_hold_the_packed_documents_across_shard_boundaries(tmp_path, tiny_tokenizer):
    texts = [f"document number {n} says hello to the world" for n in range(50)]
    write_shards(iter(texts), tiny_tokenizer, 5, tmp_path / "s", rows_per_shard=7, docs_per_batch=3)
    tokens = TokenSet(tmp_path / "s")
    expected = _reference(texts, tiny_tokenizer, 5)
    assert len(tokens) == expected.shape[0] > 7 * 3 and len(tokens.index["shard_rows"]) > 3
    assert torch.equal(tokens[:], expected)
    rows = torch.tensor([0, 6, 7, 8, len(tokens) - 1, 3])  # within and across shards, out of order
    assert torch.equal(tokens[rows], expected[rows])
    assert tokens.dtype == np.uint16 and (tmp_path / "s" / "shard-00000.bin").stat().st_size == 7 * 5 * 2
    view = tokens.select(np.array([5, 2, 9]))
    assert torch.equal(view[[1, 2]], expected[[2, 9]]) and view.shape == (3, 5)
    assert torch.equal(torch.cat(list(tokens.split(4))), expected)
    import pickle

    again = pickle.loads(pickle.dumps(view))
    assert torch.equal(again[:], view[:]) and len(pickle.dumps(view)) < 2000


def test_a_vocabulary_beyond_uint16_is_stored_as_uint32(tmp_path):
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32

    class Big:  # a tokenizer whose ids exceed 65535
        eos_token_id = 70_000

        def __len__(self):
            return 70_001

        def __call__(self, batch, add_special_tokens=False):
            return {"input_ids": [[65_536 + len(t), 69_999] for t in batch]}

    write_shards(["ab", "abc"], Big(), 3, tmp_path / "s")
    tokens = TokenSet(tmp_path / "s")
    assert tokens.dtype == np.uint32 and tokens[:].tolist() == [[65_538, 69_999, 70_000], [65_539, 69_999, 70_000]]


def test_tokens_are_cached_and_split_deterministically(text_file, tiny_tokenizer):
    first = load_tokens(str(text_file), tiny_tokenizer, 32)
    assert first.folder == load_tokens(str(text_file), tiny_tokenizer, 32).folder
    assert torch.equal(first[:], _reference([text_file.read_text()], tiny_tokenizer, 32))
    train, val = split(first, 0.1, seed=3)
    again_train, again_val = split(first, 0.1, seed=3)
    assert torch.equal(val[:], again_val[:]) and len(train) + len(val) == len(first)
    assert not torch.equal(split(first, 0.1, seed=4)[1][:], val[:])
    assert sorted(np.concatenate([train.rows, val.rows]).tolist()) == list(range(len(first)))


def test_a_shard_folder_is_a_data_source(tmp_path, text_file, tiny_tokenizer):
    made = tokenize(str(text_file), tiny_tokenizer, 32, tmp_path / "shards")
    assert torch.equal(load_tokens(str(tmp_path / "shards"), tiny_tokenizer, 32)[:], made[:])
    with pytest.raises(DataError, match="sequences of 32 tokens, not 16; set --seq-len 32"):
        load_tokens(str(tmp_path / "shards"), tiny_tokenizer, 16)


def test_bad_inputs_name_the_fix(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="no such file or directory"):
        list(iter_texts(str(tmp_path / "nope.txt")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        list(iter_texts(str(tmp_path / "x.csv")))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(DataError, match="0 sequences of 64 tokens, need at least 1; give more text or a shorter"):
        load_tokens(str(tmp_path / "short.txt"), tiny_tokenizer, 64)
    (tmp_path / "a-file").write_text("")  # not a folder: nothing can be written under it (even as root)
    with pytest.raises(DataError, match="cannot write"):
        tokenize(str(tmp_path / "short.txt"), tiny_tokenizer, 4, tmp_path / "a-file" / "shards")


def test_corrupt_token_cache_is_recomputed_not_trusted(text_file, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NAS_CACHE", str(tmp_path / "cache"))
    first = load_tokens(str(text_file), tiny_tokenizer, 32)[:]
    [folder] = (tmp_path / "cache" / "tokens").iterdir()
    shard = folder / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:50])  # a damaged disk, or a copy cut short
    assert torch.equal(load_tokens(str(text_file), tiny_tokenizer, 32)[:], first)
    assert shard.stat().st_size > 50  # rewritten whole
