"""The teacher's top-K log-probabilities on a fixed token set, computed once and reused by every student.

Every candidate of a search is distilled on the same tokens from the same teacher, so the teacher's
forward passes are paid once. K = vocabulary size with fp32 storage is exact.

On disk the cache is a folder of shards, each a safetensors file of `rows_per_shard` sequences
(`logprobs` [R, S, K] in fp16/bf16/fp32, `index` [R, S, K] int32), plus `index.json` written last. A shard's
name carries the hash of its key (teacher, tokens, K, temperature, dtype, shard size), and it appears only
whole (written beside and renamed, or moved into place on a URI store), so a shard that exists is complete and
matches; a crash loses at most the shards being written, and the next run computes only those. Several
processes (Ray tasks, each with its own copy of the teacher) fill one cache by taking every n-th shard. Readers
open the shards lazily and read only the rows of one micro-batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from nas.files import atomic_path
from nas.families import logit_map as family_logit_map
from nas.losses import final_hidden, mapped_logits
from nas.importance import fingerprint_model, fingerprint_tokens, input_device
from nas.storage import RunStorage

log = logging.getLogger(__name__)

INDEX = "index.json"


@dataclass(frozen=True)
class TeacherTopK:
    """Per token of `tokens` [N, S]: `logprobs` [N, S, K] at temperature T and their ids `index` [N, S, K]."""

    logprobs: Tensor
    index: Tensor

    def rows(self, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        return self.logprobs[idx].to(device), self.index[idx].to(device)


@torch.no_grad()
def compute_topk(teacher: nn.Module, tokens: Tensor, k: int, temperature: float = 1.0, batch_size: int = 8,
                 dtype: torch.dtype = torch.float16, chunk_tokens: int = 1024) -> TeacherTopK:
    """The top-K, from the teacher's final hidden states `chunk_tokens` tokens at a time (no [batch, seq, vocab]
    logits at once)."""
    device = input_device(teacher)
    k = min(k, teacher.config.vocab_size)
    head = teacher.get_output_embeddings()
    logit_map = family_logit_map(teacher.config)
    values, indices = [], []
    for batch in tokens.split(batch_size):
        hidden = final_hidden(teacher, batch.to(device)).flatten(0, 1)
        for chunk in hidden.split(chunk_tokens):
            logprobs = F.log_softmax(mapped_logits(head(chunk).float(), logit_map) / temperature, dim=-1)
            top = logprobs.topk(k, dim=-1)
            values.append(top.values.to(dtype).cpu())
            indices.append(top.indices.to(torch.int32).cpu())
    shape = (len(tokens), tokens.shape[1], k)
    return TeacherTopK(torch.cat(values).view(shape), torch.cat(indices).view(shape))


class TopKShards:
    """A complete shard folder, read by row: `rows(idx, device)` as `TeacherTopK.rows`. Pickles as its folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / INDEX).read_text())
        self.rows_per_shard = int(self.index["rows_per_shard"])
        self._files: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"])

    def __len__(self) -> int:
        return int(self.index["rows"])

    def rows(self, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        values, ids = [], []
        for row in idx.tolist():
            f = self._file(row // self.rows_per_shard)
            r = row % self.rows_per_shard
            values.append(f.get_slice("logprobs")[r:r + 1])
            ids.append(f.get_slice("index")[r:r + 1])
        return torch.cat(values).to(device), torch.cat(ids).to(device)

    def read_all(self) -> TeacherTopK:
        everything = torch.arange(len(self))
        return TeacherTopK(*self.rows(everything, torch.device("cpu")))

    def _file(self, shard: int):
        if shard not in self._files:
            self._files[shard] = safe_open(str(self.folder / self.index["shards"][shard]), framework="pt")
        return self._files[shard]


@dataclass(frozen=True)
class ShardPlan:
    """What one cache is: its key and how its rows are cut into shard files."""

    key: dict[str, str]
    rows: int
    rows_per_shard: int
    k: int
    temperature: float
    batch_size: int
    dtype: torch.dtype

    @property
    def tag(self) -> str:
        return hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]

    def name(self, shard: int) -> str:
        return f"shard-{shard:05d}-{self.tag}.safetensors"

    @property
    def shards(self) -> int:
        return -(-self.rows // self.rows_per_shard)

    def span(self, shard: int) -> slice:
        return slice(shard * self.rows_per_shard, min(self.rows, (shard + 1) * self.rows_per_shard))


def topk_plan(teacher: nn.Module, tokens, k: int, temperature: float = 1.0, batch_size: int = 8,
              dtype: torch.dtype = torch.float16, rows_per_shard: int = 256) -> ShardPlan:
    """The cache of this teacher's top-K on `tokens`: its key and shards."""
    k = min(k, teacher.config.vocab_size)
    key = {"teacher": fingerprint_model(teacher), "tokens": fingerprint_tokens(tokens), "k": str(k),
           "temperature": repr(temperature), "dtype": str(dtype), "rows_per_shard": str(rows_per_shard),
           "logit_map": repr(family_logit_map(teacher.config))}  # (scale, softcap): caches made before it differ
    return ShardPlan(key, len(tokens), rows_per_shard, k, temperature, batch_size, dtype)


def write_part(teacher: nn.Module, tokens, storage: RunStorage, rel: str, plan: ShardPlan, part: int = 0,
               parts: int = 1) -> None:
    """Write the shards numbered `part` modulo `parts` that are not there yet: `parts` processes, each with its
    own teacher, fill a cache together without coordinating."""
    todo = [s for s in range(part, plan.shards, parts) if not _complete(storage, f"{rel}/{plan.name(s)}")]
    if todo:
        log.info("teacher cache: computing %d shards (part %d of %d)", len(todo), part + 1, parts)
    _write_shards(teacher, tokens, storage, rel, plan, todo)


def publish(storage: RunStorage, rel: str, plan: ShardPlan) -> None:
    """Write the index of a filled cache (last, so that a reader never sees an index of missing shards)."""
    if storage.read_json(f"{rel}/{INDEX}") != _index(plan):
        storage.write_json(f"{rel}/{INDEX}", _index(plan))


def cached_topk(teacher: nn.Module, tokens, k: int, folder: RunStorage | str | Path, rel: str = "teacher_topk",
                temperature: float = 1.0, batch_size: int = 8, dtype: torch.dtype = torch.float16,
                rows_per_shard: int = 256) -> TopKShards:
    """The shard folder `folder/rel` for this teacher, tokens, K, T and dtype, computing only the missing shards
    here (the search splits them among Ray tasks with `write_part`)."""
    storage = folder if isinstance(folder, RunStorage) else RunStorage(Path(folder), "")
    plan = topk_plan(teacher, tokens, k, temperature, batch_size, dtype, rows_per_shard)
    write_part(teacher, tokens, storage, rel, plan)
    publish(storage, rel, plan)
    return TopKShards(storage.fetch(rel))


def _index(plan: ShardPlan) -> dict[str, Any]:
    return {"key": plan.key, "rows": plan.rows, "rows_per_shard": plan.rows_per_shard, "k": plan.k,
            "shards": [plan.name(s) for s in range(plan.shards)]}


def _complete(storage: RunStorage, rel: str) -> bool:
    """A shard that exists is whole (it appears in one rename); a local one is also checked for damage."""
    if storage.local is None:
        return storage.exists(rel)
    try:
        with safe_open(str(storage.local / rel), framework="pt") as f:
            return set(f.keys()) == {"logprobs", "index"}
    except Exception:
        return False


def _write_shards(teacher: nn.Module, tokens, storage: RunStorage, rel: str, plan: ShardPlan,
                 shards: Sequence[int]) -> None:
    """Compute and write some shards of a cache, each whole or not at all."""
    for shard in shards:
        top = compute_topk(teacher, tokens[plan.span(shard)], plan.k, plan.temperature, plan.batch_size, plan.dtype)
        tensors = {"logprobs": top.logprobs.contiguous(), "index": top.index.contiguous()}
        target = f"{rel}/{plan.name(shard)}"
        if storage.local is not None:
            with atomic_path(storage.local / target) as tmp:
                save_file(tensors, str(tmp), metadata=plan.key)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            save_file(tensors, str(Path(tmp) / plan.name(shard)), metadata=plan.key)
            storage.upload(Path(tmp) / plan.name(shard), target)
