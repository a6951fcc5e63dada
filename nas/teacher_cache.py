"""The teacher's top-K log-probabilities on a fixed token set, computed once and reused by every student.

Every candidate of a search is distilled on the same tokens from the same teacher, so the teacher's
forward passes are paid once. K = vocabulary size with fp32 storage is exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from nas.files import atomic_path
from nas.importance import fingerprint_model, fingerprint_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherTopK:
    """Per token of `tokens` [N, S]: `logprobs` [N, S, K] at temperature T and their ids `index` [N, S, K]."""

    logprobs: Tensor
    index: Tensor

    def rows(self, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        return self.logprobs[idx].to(device), self.index[idx].to(device)

    @classmethod
    def load(cls, path: str | Path) -> TeacherTopK:
        data = load_file(str(path))
        return cls(data["logprobs"], data["index"])


@torch.no_grad()
def compute_topk(teacher: nn.Module, tokens: Tensor, k: int, temperature: float = 1.0, batch_size: int = 8,
                 dtype: torch.dtype = torch.float16) -> TeacherTopK:
    device = next(teacher.parameters()).device
    k = min(k, teacher.config.vocab_size)
    values, indices = [], []
    for batch in tokens.split(batch_size):
        logits = teacher(input_ids=batch.to(device), use_cache=False).logits
        logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
        top = logprobs.topk(k, dim=-1)
        values.append(top.values.to(dtype).cpu())
        indices.append(top.indices.to(torch.int32).cpu())
    return TeacherTopK(torch.cat(values), torch.cat(indices))


def cached_topk(teacher: nn.Module, tokens: Tensor, k: int, path: str | Path, temperature: float = 1.0,
                batch_size: int = 8, dtype: torch.dtype = torch.float16) -> TeacherTopK:
    """`compute_topk`, stored at `path` and reused while teacher, tokens, K, T and dtype match."""
    path = Path(path)
    key = {"teacher": fingerprint_model(teacher), "tokens": fingerprint_tokens(tokens), "k": str(k),
           "temperature": repr(temperature), "dtype": str(dtype)}
    if path.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                if f.metadata() == key:
                    return TeacherTopK.load(path)
        except Exception as e:
            log.warning("teacher cache %s is unreadable (%s); recomputing", path, e)
    result = compute_topk(teacher, tokens, k, temperature, batch_size, dtype)
    with atomic_path(path) as tmp:
        save_file({"logprobs": result.logprobs, "index": result.index}, str(tmp), metadata=key)
    return result
