import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from nas.data import TEXT_BLOCK, iter_texts, load_tokens, split, tokenize
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
    with pytest.raises(DataError, match=r"a.jsonl:1: record has no field 'text' \(fields: body\); set --text-field"):
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

        def __call__(self, batch, **options):
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


def _one_line_error(source: str, text_field: str = "text") -> str:
    with pytest.raises(DataError) as error:
        list(iter_texts(source, text_field))
    assert "\n" not in str(error.value)
    return str(error.value)


def test_text_that_is_not_utf8_names_the_byte_line_and_fix(tmp_path):
    head = "ligne accentuée numéro un\n".encode() * 12_000  # past the first block, with bytes != characters
    assert len(head) > TEXT_BLOCK
    path = tmp_path / "latin1.txt"
    path.write_bytes(head + "un café\n".encode("latin1"))
    assert _one_line_error(str(path)) == (
        f"{path}: not UTF-8 text (byte offset {len(head) + 6}, line 12001: b'\\xe9\\n'); re-encode it as UTF-8, "
        f"e.g. iconv -f latin1 -t utf-8 {path} > {tmp_path / 'latin1.utf8.txt'}")
    path.write_bytes(b"windows\r\nline  \r\nends\rhere\n")  # still read as text mode reads it
    assert list(iter_texts(str(path))) == ["windows\nline  \nends\nhere\n"]


def test_bad_jsonl_parquet_and_dataset_records_name_the_file_place_and_fix(tmp_path, monkeypatch):
    good, path = '{"text": "a"}\n\n{"text": null}\n', tmp_path / "d.jsonl"
    for bad, error in {
        '{"text": "b"': "not a JSON record (Expecting ',' delimiter at column 13); each line must be one JSON object",
        '["text"]': "a JSON list, not an object; each line must be one JSON object",
        '{"text": 7}': "field 'text' holds int, not text; set --text-field to a text field",
        '{"body": "c"}': "record has no field 'text' (fields: body); set --text-field",
    }.items():
        path.write_text(f"{good}{bad}\n")
        assert _one_line_error(str(path)) == f"{path}:4: {error}"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    assert _one_line_error(str(path)) == (f"{path}:2: not UTF-8 (byte offset 13 in the line: b'\\xe9\"}}\\n'); "
                                          f"re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > "
                                          f"{tmp_path / 'd.utf8.jsonl'}")
    path.write_text(good)
    assert list(iter_texts(str(path))) == ["a"]  # a null text is no document (not the text "None")
    table = tmp_path / "t.parquet"
    pd.DataFrame({"body": ["a", None, "c"]}).to_parquet(table)
    assert list(iter_texts(str(table), "body")) == ["a", "c"]
    assert _one_line_error(str(table)) == f"{table}: no column 'text' (columns: ['body']); set --text-field"
    pd.DataFrame({"body": ["a", "b"], "n": [1, 2]}).to_parquet(table)
    assert _one_line_error(str(table), "n") == f"{table} row 0: field 'n' holds int, not text; set --text-field to a " \
                                               f"text field"
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, split, streaming: iter([{"content": "a"}]))
    assert _one_line_error("org/corpus") == "--data org/corpus record 1: record has no field 'text' (fields: content); " \
                                            "set --text-field"


def test_cli_reports_text_that_is_not_utf8_in_one_line(tmp_path, tiny_parent_dir):
    path = tmp_path / "latin1.txt"
    path.write_bytes("un café\n".encode("latin1"))
    command = [sys.executable, "-m", "nas.cli", "tokenize", "--parent", str(tiny_parent_dir), "--data", str(path),
               "--seq-len", "8", "--out", str(tmp_path / "shards")]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 2 and [line for line in run.stderr.splitlines() if line.strip()] == [
        f"nas tokenize: error: {path}: not UTF-8 text (byte offset 6, line 1: b'\\xe9\\n'); re-encode it as UTF-8, "
        f"e.g. iconv -f latin1 -t utf-8 {path} > {tmp_path / 'latin1.utf8.txt'}"]
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_shuffled_rows_is_a_seeded_permutation_whose_prefixes_do_not_depend_on_the_count(n):
    """The order the search draws calibration, validation and training rows from: every row once, each window of
    it the same whether drawn alone or as part of the whole, another order for another seed."""
    from nas.data import shuffled_rows

    whole = shuffled_rows(n, 0, n, seed=3)
    assert sorted(whole.tolist()) == list(range(n))
    for start, count in ((0, min(n, 5)), (n // 3, n - n // 3), (n - 1, 1)):
        assert shuffled_rows(n, start, count, seed=3).tolist() == whole[start:start + count].tolist()
    if n >= 7:
        assert shuffled_rows(n, 0, n, seed=4).tolist() != whole.tolist()
