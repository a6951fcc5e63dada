"""Mamba2 unit (Nemotron-H, Bamba, Falcon-H1): `in_proj` packs, row by row, z (I) | x (I) | B (G*N) | C (G*N) |
dt (H), with I = heads x head_dim; a depthwise `conv1d` runs over x, B, C; `A_log`, `D` and `dt_bias` hold one
value per head; a gated RMSNorm over each of the G groups of I / G channels; `out_proj` [hidden, I].

Its prunable widths are the heads (group-aware: head h belongs to group h // (H / G), and every group keeps the same
number, so B and C, which each group shares, are kept whole) and the head dimension (the same channels of every
head). x, z, the norm and `out_proj`'s columns are head-major (channel h * P + p). Heads are scored, like attention
heads, by the size of what each writes through its slice of `out_proj` (docs/hybrid-parents.md has the layouts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Mamba2:
    """Attributes: the config keys of its sizes, as the family names them.
        heads_key, head_dim_key: the prunable axes (H and P).
        groups_key, state_key, conv_key: G, N and the conv kernel K (kept as the parent's).
        bias_key, conv_bias_key: the config switches of `in_proj`'s (and `out_proj`'s) bias and of the conv bias.
        out_bias_key: the switch of `out_proj`'s bias where it has its own (Falcon-H1's `projectors_bias`).
        inner_key: a config key that must be written as the child's I = H x P (Falcon-H1's `mamba_d_ssm`), or None.
        expand_key: a config key that sets I as an integer multiple of hidden_size instead (Bamba's
            `mamba_expand`): a child's H x P must then be a multiple of its hidden_size.
        norm_key: the config switch of the gated norm when it is optional (Falcon-H1's `mamba_rms_norm`), or None
            when it is always there.
    """

    heads_key: str = "mamba_num_heads"
    head_dim_key: str = "mamba_head_dim"
    groups_key: str = "n_groups"
    state_key: str = "ssm_state_size"
    conv_key: str = "conv_kernel"
    bias_key: str = "use_bias"
    conv_bias_key: str = "use_conv_bias"
    out_bias_key: str | None = None
    inner_key: str | None = None
    expand_key: str | None = None
    norm_key: str | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return self.heads_key, self.head_dim_key

    def has_norm(self, config: Any) -> bool:
        return self.norm_key is None or bool(getattr(config, self.norm_key))

    def shape(self, config: Any, arch: Any) -> tuple[int, int, int, int]:
        """(H, P, G, N) of the child `arch`."""
        return arch.get(self.heads_key), arch.get(self.head_dim_key), getattr(config, self.groups_key), \
            getattr(config, self.state_key)

    def num_parameters(self, config: Any, arch: Any) -> int:
        heads, head_dim, groups, state = self.shape(config, arch)
        d, inner, bc = arch.hidden_size, heads * head_dim, 2 * groups * state
        bias, conv_bias = bool(getattr(config, self.bias_key)), bool(getattr(config, self.conv_bias_key))
        out_bias = bool(getattr(config, self.out_bias_key or self.bias_key))
        in_rows, conv = 2 * inner + bc + heads, inner + bc
        return in_rows * d + bias * in_rows + conv * getattr(config, self.conv_key) + conv_bias * conv + \
            3 * heads + self.has_norm(config) * inner + d * inner + out_bias * d

    def cache_bytes(self, config: Any, arch: Any, nbytes: int) -> int:
        """One sequence's state in one layer: the conv window over x, B, C (K values a channel, in the activation
        dtype) and the SSM state [H, P, N], which the scan keeps in fp32 whatever the model's dtype."""
        heads, head_dim, groups, state = self.shape(config, arch)
        conv = heads * head_dim + 2 * groups * state
        return conv * getattr(config, self.conv_key) * nbytes + heads * head_dim * state * 4

    def check(self, config: Any, arch: Any, parent: Any) -> str | None:
        """Why `arch`'s Mamba widths cannot be cut from the parent's, or None (beside the family's own check that no
        width grows)."""
        groups = getattr(config, self.groups_key)
        if arch.get(self.heads_key) % groups:
            return f"{self.heads_key}={arch.get(self.heads_key)} must be a multiple of {self.groups_key}={groups}: " \
                   f"each group keeps the same number of heads"
        inner = arch.get(self.heads_key) * arch.get(self.head_dim_key)
        if self.expand_key and inner % arch.hidden_size:
            return f"{self.heads_key} x {self.head_dim_key} = {inner} must be a multiple of hidden_size=" \
                   f"{arch.hidden_size}: this family sets the Mamba width as an integer {self.expand_key} x hidden_size"
        return None

    def child_entries(self, arch: Any) -> dict[str, int]:
        """The config entries that size a child's Mamba width beside its heads and head width."""
        inner = arch.get(self.heads_key) * arch.get(self.head_dim_key)
        out = {self.inner_key: inner} if self.inner_key else {}
        if self.expand_key:
            out[self.expand_key] = inner // arch.hidden_size
        return out

    def axes(self, prefix: str) -> dict[str, tuple[str | None, ...]]:
        """"ssm_in": `in_proj` rows; "ssm_conv": conv channels; "ssm_inner": the kept heads' kept channels
        (z, x, the norm, `out_proj`'s columns); "ssm_heads": the kept heads."""
        return {f"{prefix}.in_proj.weight": ("ssm_in", "hidden"), f"{prefix}.in_proj.bias": ("ssm_in",),
                f"{prefix}.conv1d.weight": ("ssm_conv", None, None), f"{prefix}.conv1d.bias": ("ssm_conv",),
                **{f"{prefix}.{name}": ("ssm_heads",) for name in ("A_log", "D", "dt_bias")},
                f"{prefix}.norm.weight": ("ssm_inner",),
                f"{prefix}.out_proj.weight": ("hidden", "ssm_inner"), f"{prefix}.out_proj.bias": ("hidden",)}

    def select(self, head_scores: Tensor, channel_scores: Tensor, config: Any, arch: Any) -> tuple[Tensor, Tensor]:
        """(kept heads [H'], kept head channels [P']), ascending: in every group its best H' / G heads, and the P'
        channels with the highest score summed over heads."""
        groups = getattr(config, self.groups_key)
        per_group = head_scores.numel() // groups
        keep = arch.get(self.heads_key) // groups
        grouped = head_scores.float().view(groups, per_group)
        heads = torch.cat([g * per_group + grouped[g].topk(keep).indices.sort().values for g in range(groups)])
        channels = channel_scores.float().topk(arch.get(self.head_dim_key)).indices.sort().values
        return heads, channels

    def indices(self, heads: Tensor, channels: Tensor, config: Any, parent: Any) -> dict[str, Tensor]:
        """The index sets of the kept heads and head channels, as rows of the parent's fused tensors."""
        num_heads, head_dim, groups, state = self.shape(config, parent)
        inner_width, bc = num_heads * head_dim, 2 * groups * state
        inner = (heads[:, None] * head_dim + channels[None, :]).flatten()
        b_and_c = torch.arange(bc)  # every group is kept
        return {"ssm_heads": heads, "ssm_inner": inner,
                "ssm_in": torch.cat([inner, inner_width + inner, 2 * inner_width + b_and_c,
                                     2 * inner_width + bc + heads]),
                "ssm_conv": torch.cat([inner, inner_width + b_and_c])}

    def norm_factor(self, arch: Any, parent: Any) -> float:
        """The gated norm's RMS is a mean over a group's H / G x P channels: kept channels' weights are scaled by
        sqrt(parent group width / child group width), so that removed channels whose gated outputs were zero leave
        the kept ones' normalised outputs unchanged (as the hidden channels' norms are rescaled)."""
        child = arch.get(self.heads_key) * arch.get(self.head_dim_key)
        return (parent.get(self.heads_key) * parent.get(self.head_dim_key) / child) ** 0.5

    def hooks(self, mixer: nn.Module, record: Callable[[nn.Module, Tensor], None]) -> list:
        """Heads are scored at the output projection's input: the gated, normalised heads' outputs side by side."""
        return [mixer.out_proj.register_forward_pre_hook(lambda out_proj, args: record(out_proj, args[0]))]
