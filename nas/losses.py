"""Distillation losses (paper §3). Softmax in fp32; masked tokens ignored; an all-masked batch gives 0.

Shapes: B batch, S sequence, V vocabulary, K kept teacher log-probabilities per token, D hidden width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _masked_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Mean of [B, S] values over mask; 0 (with a gradient path) when nothing is unmasked."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _log_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:
    logits = logits.float()
    return F.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)


# Per-token losses from student log-probabilities `s` (with a gradient) and teacher ones `t` (none). They are
# written so that autograd keeps as few [tokens, V] tensors as it can: the chunked loss's memory is a few of them.

def _forward_kl_tokens(s: Tensor, t: Tensor) -> Tensor:
    """sum_v p_t (log p_t - log p_s); overwrites `t` with p_t."""
    with torch.no_grad():
        entropy_term = torch.linalg.vecdot(t.exp(), t)
        p = t.exp_()
    return entropy_term - torch.linalg.vecdot(p, s)


def _reverse_kl_tokens(s: Tensor, t: Tensor) -> Tensor:
    """sum_v p_s (log p_s - log p_t); overwrites `t`."""
    return torch.linalg.vecdot(s.exp(), s - t)


def _topk_forward_kl_tokens(s: Tensor, teacher_logprobs: Tensor, teacher_index: Tensor) -> Tensor:
    s_top = s.gather(-1, teacher_index.long())
    t_top = teacher_logprobs.float()
    t_rest = torch.log1p(-t_top.exp().sum(-1).clamp(max=1.0 - 1e-6))
    s_rest = torch.log1p(-s_top.exp().sum(-1).clamp(max=1.0 - 1e-6))
    return (t_top.exp() * (t_top - s_top)).sum(-1) + t_rest.exp() * (t_rest - s_rest)


def _teacher_log_softmax(teacher_logits: Tensor, temperature: float) -> Tensor:
    with torch.no_grad():
        return _log_softmax(teacher_logits, temperature)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) per token, averaged over unmasked tokens, scaled by T^2.

    Args:
        student_logits: [B, S, V].
        teacher_logits: [B, S, V].
        mask: [B, S] bool, True where the token counts.
    """
    per_token = _forward_kl_tokens(_log_softmax(student_logits, temperature),
                                   _teacher_log_softmax(teacher_logits, temperature))
    return _masked_mean(per_token, mask) * temperature**2


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(student || teacher), mode-seeking; same shapes as `forward_kl`."""
    per_token = _reverse_kl_tokens(_log_softmax(student_logits, temperature),
                                   _teacher_log_softmax(teacher_logits, temperature))
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
    per_token = _topk_forward_kl_tokens(_log_softmax(student_logits, temperature), teacher_logprobs, teacher_index)
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


@dataclass(frozen=True)
class LogitTargets:
    """What the student's logits are compared with, per token of a [B, S] batch: the teacher's final hidden
    states and LM-head weight (online KD), or its cached top-K log-probabilities and ids; and the next tokens
    for cross-entropy (`labels` [B, S], token i + 1 at position i; the last position has none and is left out)."""

    kd: str = "forward"  # "forward", "reverse" or "none"
    temperature: float = 1.0
    teacher_hidden: Tensor | None = None  # [B, S, D_teacher]
    teacher_head: Tensor | None = None  # [V, D_teacher]
    topk_logprobs: Tensor | None = None  # [B, S, K]
    topk_index: Tensor | None = None  # [B, S, K]
    labels: Tensor | None = None
    ce_weight: float = 0.0
    # (scale, softcap) the student's and the teacher's families apply to `hidden @ head.T` (`nas.families`).
    logit_map: tuple[float, float | None] = (1.0, None)
    teacher_logit_map: tuple[float, float | None] = (1.0, None)


def mapped_logits(logits: Tensor, logit_map: tuple[float, float | None]) -> Tensor:
    """`logits` as the family's forward leaves them: multiplied by the scale, then capped at +-softcap by tanh."""
    scale, softcap = logit_map
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def logit_losses(hidden: Tensor, head: Tensor, mask: Tensor, targets: LogitTargets,
                 chunk_tokens: int = 1024) -> dict[str, Tensor]:
    """KD (+ weighted CE) from the student's final hidden states [B, S, D] and LM-head weight [V, D], computed
    `chunk_tokens` tokens at a time, so that no [B, S, V] logits exist at once (the Liger-Kernel idea, in torch).

    Each chunk's logits, loss and gradients (to `hidden` and `head`) are computed in the forward pass and the
    chunk's logits freed; backward only scales the stored gradients. Returns {"loss", "kd"?, "ce"?}: `loss` has a
    gradient, the parts are detached. Equal to the unchunked `forward_kl` / `reverse_kl` / `topk_forward_kl` +
    `ce_weight * cross_entropy` within float tolerance.
    """
    flat = hidden.flatten(0, 1)
    weights = _token_weights(mask, targets)
    parts: dict[str, Tensor] = {}

    def chunk_loss(logits: Callable[[], Tensor], rows: slice) -> Tensor:
        # `logits()` makes the chunk's logits; they live only inside log_softmax's argument.
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        log_probs = _log_softmax(logits(), targets.temperature)
        if targets.kd != "none":
            kd = (_kd_tokens(log_probs, rows, targets) * weights["kd"][rows]).sum()
            parts["kd"] = parts.get("kd", 0) + kd.detach()
            total = total + kd
        if targets.ce_weight > 0:
            if targets.temperature != 1:
                log_probs = _log_softmax(logits())
            ce = (F.nll_loss(log_probs, targets.labels.flatten()[rows], reduction="none") * weights["ce"][rows]).sum()
            parts["ce"] = parts.get("ce", 0) + ce.detach()
            total = total + targets.ce_weight * ce
        return total

    if not torch.is_grad_enabled():
        # Evaluation: a Function sees its inputs' requires_grad even under no_grad, and would build the gradients
        # (an fp32 [V, D] for the head) that nothing reads.
        flat, head = flat.detach(), head.detach()
    loss = _ChunkedHeadLoss.apply(flat, head, chunk_loss, max(1, chunk_tokens), targets.logit_map)
    return {"loss": loss, **parts}


def _token_weights(mask: Tensor, targets: LogitTargets) -> dict[str, Tensor]:
    """Per-token factors that turn chunk sums into the unchunked masked means (T^2 included for KD)."""
    m = mask.flatten().float()
    out = {"kd": m / m.sum().clamp_min(1.0) * targets.temperature**2}
    if targets.ce_weight > 0:
        ce_mask = torch.zeros_like(mask)
        ce_mask[:, :-1] = mask[:, 1:]  # position i predicts token i + 1, which must count
        c = ce_mask.flatten().float()
        out["ce"] = c / c.sum().clamp_min(1.0)
    return out


def _kd_tokens(log_probs: Tensor, rows: slice, targets: LogitTargets) -> Tensor:
    if targets.topk_logprobs is not None:
        return _topk_forward_kl_tokens(log_probs, targets.topk_logprobs.flatten(0, 1)[rows],
                                       targets.topk_index.flatten(0, 1)[rows])
    teacher = _teacher_log_softmax(mapped_logits(F.linear(targets.teacher_hidden.flatten(0, 1)[rows],
                                                          targets.teacher_head), targets.teacher_logit_map),
                                   targets.temperature)
    return (_forward_kl_tokens if targets.kd == "forward" else _reverse_kl_tokens)(log_probs, teacher)


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over chunks of chunk_loss(hidden[chunk] @ head.T), with gradients taken chunk by chunk in the forward
    pass: each chunk's logits are freed once log-softmaxed, their gradient is folded into the head's gradient in
    place as it appears (no [V, D] temporary per chunk), and backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden: Tensor, head: Tensor, chunk_loss, chunk_tokens: int,
                logit_map: tuple[float, float | None]) -> Tensor:
        want_hidden, want_head = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if want_hidden else None
        grad_head = torch.zeros_like(head, dtype=torch.float32) if want_head else None
        weight = head.detach()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h = hidden[rows].detach().requires_grad_()

            def fold(grad_logits: Tensor, h: Tensor = h) -> None:
                grad_head.addmm_(grad_logits.t().to(grad_head.dtype), h.detach().to(grad_head.dtype))

            def logits(h: Tensor = h) -> Tensor:
                out = F.linear(h, weight)
                if want_head:
                    out.register_hook(fold)  # the gradient of the head's own output, before the family's map
                return mapped_logits(out, logit_map)

            with torch.enable_grad():
                loss = chunk_loss(logits, rows)
                total += loss.detach().float()
                if loss.requires_grad and (want_hidden or want_head):
                    (grad,) = torch.autograd.grad(loss, h)
                    if grad_hidden is not None:
                        grad_hidden[rows] = grad
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_head) if g is not None))
        ctx.dtypes = (hidden.dtype, head.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        saved = iter(ctx.saved_tensors)  # ours alone, and backward runs once: scaled in place
        out = [next(saved).mul_(grad_output) if needed else None for needed in ctx.needs_input_grad[:2]]
        return tuple(g.to(d) if g is not None else None for g, d in zip(out, ctx.dtypes)) + (None, None, None)


def final_hidden(model: nn.Module, tokens: Tensor, router_logits: list | None = None) -> Tensor:
    """The decoder's output after its final norm [B, S, D], from a forward through the whole model (so that a
    sharded model gathers its root unit: embeddings and LM head) that computes logits for one position only.
    With `router_logits`, a mixture of experts whose config sets `output_router_logits` appends its routers'
    logits (one [tokens, experts] tensor per sparse layer) to it."""
    kept: list[Tensor] = []
    handle = model.model.register_forward_hook(lambda _m, _a, out: kept.append(out.last_hidden_state))
    try:
        out = model(input_ids=tokens, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if router_logits is not None and getattr(out, "router_logits", None):
        router_logits.extend(out.router_logits)
    return kept[0]


def router_balance_loss(router_logits: list[Tensor], top_k: int, num_experts: int) -> Tensor:
    """The routers' load-balancing loss as HF's MoE models compute it (Switch Transformer's: num_experts x the sum
    over experts of the share of top-k slots routed to each, times its mean router probability, over every sparse
    layer's tokens), written so that N data-parallel workers reproduce one process: the routed shares (not
    differentiated) are counted over all workers' tokens, and each worker's probability term is its tokens' sum
    over the global count, times N, so that the workers' mean (what FSDP averages, and what is logged) is the
    whole batch's loss and gradient."""
    from nas import sharding

    probs = torch.cat([logits.float() for logits in router_logits]).softmax(-1)  # [layers x tokens, experts]
    slots = nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum((0, 1)).float()
    tokens = torch.tensor(float(probs.shape[0]), device=probs.device)
    slots, tokens = sharding.sum_across_workers(slots), sharding.sum_across_workers(tokens)
    world = sharding.rank_and_world()[1]
    return num_experts * (slots / tokens * probs.sum(0)).sum() / tokens * world
