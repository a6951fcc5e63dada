"""Distillation losses (paper §3). Softmax in fp32; masked tokens ignored; an all-masked batch gives 0.

Shapes: B batch, S sequence, V vocabulary, K kept teacher log-probabilities per token, D hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _masked_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Mean of [B, S] values over mask; 0 (with a gradient path) when nothing is unmasked."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) per token, averaged over unmasked tokens, scaled by T^2.

    Args:
        student_logits: [B, S, V].
        teacher_logits: [B, S, V].
        mask: [B, S] bool, True where the token counts.
    """
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(student || teacher), mode-seeking; same shapes as `forward_kl`."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_token = (s.exp() * (s - t)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def topk_forward_kl(student_logits: Tensor, teacher_logprobs: Tensor, teacher_index: Tensor, mask: Tensor,
                    temperature: float = 1.0) -> Tensor:
    """Forward KL against a cached teacher that kept only its top-K log-probabilities per token.

    The vocabulary is folded into K + 1 bins: the teacher's K tokens and "everything else", whose teacher
    mass is 1 - sum(top-K). With K = V the rest bin is empty and this equals `forward_kl`.

    Args:
        student_logits: [B, S, V].
        teacher_logprobs: [B, S, K] teacher log-probabilities at temperature T (any float dtype).
        teacher_index: [B, S, K] their token ids.
        mask: [B, S] bool.
    """
    s_all = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_top = s_all.gather(-1, teacher_index.long())
    t_top = teacher_logprobs.float()
    t_rest = torch.log1p(-t_top.exp().sum(-1).clamp(max=1.0 - 1e-6))
    s_rest = torch.log1p(-s_top.exp().sum(-1).clamp(max=1.0 - 1e-6))
    per_token = (t_top.exp() * (t_top - s_top)).sum(-1) + t_rest.exp() * (t_rest - s_rest)
    return _masked_mean(per_token, mask) * temperature**2


def cross_entropy(student_logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Next-token cross-entropy; logits [B, S, V] already aligned with labels [B, S]."""
    per_token = F.cross_entropy(student_logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return _masked_mean(per_token.view(labels.shape), mask)


def cosine_loss(student_states: list[Tensor], teacher_states: list[Tensor], mask: Tensor,
                projection: torch.nn.Module | None = None) -> Tensor:
    """Mean over pairs of (1 - cosine) between student and teacher states (paper §3, intermediate states).

    Args:
        student_states: list of [B, S, D_student].
        teacher_states: list of [B, S, D_teacher], same length.
        mask: [B, S] bool.
        projection: a shared Linear(D_student -> D_teacher) when widths differ.
    """
    losses = []
    for s, t in zip(student_states, teacher_states, strict=True):
        s = projection(s) if projection is not None else s
        cos = F.cosine_similarity(s.float(), t.float(), dim=-1)
        losses.append(_masked_mean(1 - cos, mask))
    return torch.stack(losses).mean()
