"""Attention unit: grouped-query attention with `q_proj`, `k_proj`, `v_proj` (or Phi-3's fused `qkv_proj`) and
`o_proj`, optional biases, optional q/k norms, optional per-head attention sinks (gpt-oss) and an optional output gate
per query head (Qwen3-Next, Qwen3.5). Its prunable widths are `num_attention_heads` and
`num_key_value_heads` (whole heads; `head_dim` stays the parent's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Attention:
    """Attributes:
        fused_qkv: one `qkv_proj` whose rows are all query heads, then the key heads, then the value heads.
        qk_norm: None; "head" for a norm of size `head_dim` shared by every head (Qwen3, Gemma 3); "all" for one
            over all heads at once (OLMo 2: sizes H * head_dim and KV * head_dim, sliced with the heads).
        bias_key: the config key that turns on q/k/v/o biases, or None when the family has none.
        qkv_bias_always: q/k/v always carry a bias (Qwen2), whatever the config says.
        o_bias: `o_proj` carries a bias when q/k/v do by `bias_key` (False: Qwen2-MoE's `qkv_bias` is q/k/v only).
        sinks: one learned attention-sink logit per query head (`self_attn.sinks`, gpt-oss).
        q_norm_is_hidden: the "all" q norm is sized `hidden_size` rather than heads x head_dim (OLMoE), so a child
            must keep hidden_size = num_attention_heads x head_dim.
        gated_query: `q_proj` gives each query head its query and then an output gate of the same width
            (2 x head_dim rows a head; the output is multiplied by sigmoid(gate) before `o_proj`).
    """

    fused_qkv: bool = False
    qk_norm: str | None = None
    bias_key: str | None = "attention_bias"
    qkv_bias_always: bool = False
    o_bias: bool = True
    sinks: bool = False
    q_norm_is_hidden: bool = False
    gated_query: bool = False

    def biases(self, config: Any) -> tuple[bool, bool]:
        """(q/k/v bias, o bias) for a config of this family."""
        on = bool(self.bias_key and getattr(config, self.bias_key, False))
        return on or self.qkv_bias_always, on and self.o_bias

    def num_parameters(self, config: Any, arch: Any) -> int:
        qkv_bias, o_bias = self.biases(config)
        h, d = arch.hidden_size, arch.head_dim
        q, kv = arch.num_attention_heads * d, arch.num_key_value_heads * d
        norms = {None: 0, "head": 2 * d, "all": q + kv}[self.qk_norm]
        sinks = arch.num_attention_heads if self.sinks else 0
        q_rows = 2 * q if self.gated_query else q
        return (h + qkv_bias) * (q_rows + 2 * kv) + q * h + o_bias * h + norms + sinks

    def axes(self, prefix: str) -> dict[str, tuple[str | None, ...]]:
        """The slice rules of the attention module at `prefix` inside a layer."""
        if self.fused_qkv:
            out = {f"{prefix}.qkv_proj.weight": ("qkv", "hidden"), f"{prefix}.qkv_proj.bias": ("qkv",)}
        else:
            q_rows = "q_gate" if self.gated_query else "q"
            out = {f"{prefix}.{p}_proj.{kind}": (rows, "hidden") if kind == "weight" else (rows,)
                   for p, rows in (("q", q_rows), ("k", "kv"), ("v", "kv")) for kind in ("weight", "bias")}
        out.update({f"{prefix}.o_proj.weight": ("hidden", "q"), f"{prefix}.o_proj.bias": ("hidden",)})
        per_head = self.qk_norm == "head"
        out.update({f"{prefix}.q_norm.weight": (None,) if per_head else ("q",),
                    f"{prefix}.k_norm.weight": (None,) if per_head else ("kv",),
                    f"{prefix}.sinks": ("heads",)})
        return out

    def indices(self, q_heads: Tensor, kv_heads: Tensor, head_dim: int, parent: Any) -> dict[str, Tensor]:
        """Rows of the kept query and KV heads, and, fused, of `qkv_proj`; "heads": the kept query heads."""
        q, kv = head_rows(q_heads, head_dim), head_rows(kv_heads, head_dim)
        out = {"q": q, "kv": kv, "heads": q_heads}
        if self.gated_query:  # head h's query and gate rows are h * 2 head_dim + [0, 2 head_dim)
            out["q_gate"] = head_rows(q_heads, 2 * head_dim)
        if self.fused_qkv:
            q_width, kv_width = parent.num_attention_heads * head_dim, parent.num_key_value_heads * head_dim
            out["qkv"] = torch.cat([q, q_width + kv, q_width + kv_width + kv])
        return out

    @staticmethod
    def hooks(attention: nn.Module, record: Callable[[nn.Module, Tensor], None]) -> list:
        """Heads are scored at the output projection's input: the heads' outputs side by side."""
        return [attention.o_proj.register_forward_pre_hook(lambda o_proj, args: record(o_proj, args[0]))]


def head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """The rows (or channels) of the kept `heads` in a head-major projection of `head_dim` rows a head."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
