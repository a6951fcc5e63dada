"""Token shards: a corpus tokenised once into fixed-size files of token ids, read by sequence index.

A shard folder holds `shard-00000.bin`, ... (raw little-endian uint16, or uint32 when the vocabulary needs it;
`rows_per_shard` sequences of `seq_len` tokens each) and `index.json` (written last: dtype, seq_len, rows per
shard, totals). Writing keeps one batch of documents and one shard in memory; reading maps the shard files
(`numpy.memmap`) and copies out only the sequences asked for. So neither depends on the corpus size, and a
`TokenSet` pickles as a folder name and a row selection: trials and training workers open the files themselves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nas.errors import DataError
from nas.files import atomic_dir

INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def write_shards(texts: Iterable[str], tokenizer, seq_len: int, out: str | Path, rows_per_shard: int = 16_384,
                 docs_per_batch: int = 512, meta: dict[str, Any] | None = None) -> Path:
    """Tokenise documents (a batch of up to `docs_per_batch` documents or 256K characters at a time, through the fast
    tokenizer's parallel batch encoder), join them with
    EOS, cut them into sequences of `seq_len` and write them as shards; the tail shorter than one sequence is
    dropped. The folder appears only when complete."""
    dtype = token_dtype(len(tokenizer))
    eos = tokenizer.eos_token_id
    try:
        out = Path(out)
        with atomic_dir(out) as tmp:
            shards: list[int] = []
            digest = hashlib.sha256()  # of every token written: the content's name for caches keyed on it
            pending = np.empty(0, dtype=dtype)  # tokens not yet in a written shard
            for batch in _batched(texts, docs_per_batch):
                ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False,
                                return_token_type_ids=False)["input_ids"]
                joined = [np.asarray(doc + ([eos] if eos is not None else []), dtype=dtype) for doc in ids]
                pending = np.concatenate([pending, *joined])
                while pending.size >= rows_per_shard * seq_len:
                    pending = _write_shard(tmp, shards, digest, pending, rows_per_shard * seq_len, seq_len)
            rows = pending.size // seq_len
            if rows:
                _write_shard(tmp, shards, digest, pending, rows * seq_len, seq_len)
            index = {"seq_len": seq_len, "dtype": dtype.str, "rows_per_shard": rows_per_shard, "shard_rows": shards,
                     "rows": sum(shards), "tokens": sum(shards) * seq_len, "vocab_size": len(tokenizer),
                     "sha256": digest.hexdigest(), **(meta or {})}
            (tmp / INDEX).write_text(json.dumps(index, indent=1))
    except OSError as e:
        raise DataError(f"token shards {out}: cannot write ({e.strerror}); set NAS_CACHE to a writable folder") from None
    return out


def _batched(texts: Iterable[str], n: int, max_chars: int = 2**18) -> Iterator[list[str]]:
    """Lists of up to `n` documents and about `max_chars` characters (what one tokenizer call holds at once: its
    encodings take about 100 bytes a character, and a larger batch is no faster)."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) == n or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_shard(folder: Path, shards: list[int], digest, pending: np.ndarray, count: int, seq_len: int) -> np.ndarray:
    pending[:count].tofile(folder / f"shard-{len(shards):05d}.bin")
    digest.update(pending[:count].tobytes())
    shards.append(count // seq_len)
    return pending[count:].copy()


class TokenSet:
    """Sequences [N, seq_len] stored in a shard folder, or a selection of them (`select`).

    `tokens[rows]` (a tensor, list or array of row numbers, or a slice) returns an int64 tensor of those rows;
    `len`, `shape` and `split` behave as on a [N, seq_len] tensor."""

    def __init__(self, folder: str | Path, rows: np.ndarray | None = None):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / INDEX).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"token shards {self.folder}: no readable {INDEX} ({e}); re-run `nas tokenize`") from None
        self.seq_len = int(self.index["seq_len"])
        self.dtype = np.dtype(self.index["dtype"])
        self.starts = np.cumsum([0, *self.index["shard_rows"]])
        # Row numbers in the shards; None for all of them (kept as no array: it would grow with the corpus).
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._maps: dict[int, np.memmap] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "rows": self.rows}  # the maps are reopened where it is unpickled

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["rows"])

    def __len__(self) -> int:
        return int(self.starts[-1]) if self.rows is None else len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.seq_len

    def select(self, rows: np.ndarray | Tensor | slice) -> TokenSet:
        """A view of some of these sequences (row numbers relative to this set)."""
        return TokenSet(self.folder, self._in_shards(rows))

    def __getitem__(self, rows: np.ndarray | Tensor | list[int] | slice) -> Tensor:
        chosen = np.atleast_1d(self._in_shards(rows))
        out = np.empty((len(chosen), self.seq_len), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, chosen, side="right") - 1
        for n, (shard, row) in enumerate(zip(shard_of.tolist(), chosen.tolist())):
            out[n] = self._map(shard)[row - self.starts[shard]]
        return torch.from_numpy(out)

    def split(self, batch_size: int) -> Iterator[Tensor]:
        for start in range(0, len(self), batch_size):
            yield self[start:start + batch_size]

    def fingerprint(self) -> str:
        """Which tokens these are: the shards' content hash and the selected rows (no shard is read)."""
        rows = b"all" if self.rows is None else self.rows.tobytes()
        return hashlib.sha256(self.index["sha256"].encode() + rows).hexdigest()[:16]

    def _in_shards(self, rows: np.ndarray | Tensor | list[int] | slice) -> np.ndarray:
        """The shard row numbers of `rows` (numbered within this set), indexed as numpy indexes."""
        rows = _as_rows(rows)
        if self.rows is not None:
            return self.rows[rows]
        n = len(self)
        if isinstance(rows, slice):
            return np.arange(*rows.indices(n))
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"rows {rows.min()}..{rows.max()} are out of range for {n} sequences")
        return np.where(rows < 0, rows + n, rows)

    def _map(self, shard: int) -> np.memmap:
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.folder / f"shard-{shard:05d}.bin", dtype=self.dtype, mode="r",
                                          shape=(int(self.starts[shard + 1] - self.starts[shard]), self.seq_len))
        return self._maps[shard]


def _as_rows(rows: np.ndarray | Tensor | list[int] | slice) -> np.ndarray | slice:
    if isinstance(rows, Tensor):
        return rows.cpu().numpy().astype(np.int64)
    return rows if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
