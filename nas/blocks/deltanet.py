"""Gated DeltaNet unit (Qwen3-Next, Qwen3.5): linear attention with `nk` key heads of width dk and `nv` value heads
of width dv, value head j reading key head j // (nv / nk); a depthwise `conv1d` over the flat channels
q (nk x dk) | k (nk x dk) | v (nv x dv); `A_log` and `dt_bias` per value head; a gated RMSNorm over each value head
(one weight [dv] shared by all heads); `out_proj` [hidden, nv x dv].

Its projections come in two layouts (docs/hybrid-parents.md, section 3):
- "interleaved" (Qwen3-Next): `in_proj_qkvz` [2 nk dk + 2 nv dv, hidden] in nk blocks, block g holding
  q_g | k_g | its r value heads' v | their z (r = nv / nk); `in_proj_ba` [2 nv, hidden] in nk blocks of b | a.
- "split" (Qwen3.5): `in_proj_qkv` in the conv's flat order, `in_proj_z` [nv dv], `in_proj_b` and `in_proj_a` [nv].

Its prunable widths are the value heads and the key heads: every kept key head keeps the same number of its own
value heads, so the grouping stays uniform. Removing whole heads is exact (each value head is normalised alone; the
head widths dk and dv stay the parent's). Value heads are scored by the size of what each writes through its slice
of `out_proj`, a key head by its value heads' summed scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nas.blocks.attention import head_rows

VALUE_HEADS, KEY_HEADS = "linear_num_value_heads", "linear_num_key_heads"


@dataclass(frozen=True)
class GatedDeltaNet:
    """Attributes:
        layout: "interleaved" or "split" (see the module's docstring).
    """

    layout: str = "interleaved"

    def __post_init__(self) -> None:
        assert self.layout in ("interleaved", "split"), self.layout

    keys = (VALUE_HEADS, KEY_HEADS)

    @staticmethod
    def shape(config: Any, arch: Any) -> tuple[int, int, int, int]:
        """(nk, nv, dk, dv) of the child `arch`."""
        return arch.get(KEY_HEADS), arch.get(VALUE_HEADS), config.linear_key_head_dim, config.linear_value_head_dim

    def num_parameters(self, config: Any, arch: Any) -> int:
        nk, nv, dk, dv = self.shape(config, arch)
        conv = 2 * nk * dk + nv * dv
        # q, k, v and z rows, b and a rows, the conv, A_log and dt_bias, the shared norm, out_proj
        return (conv + nv * dv) * arch.hidden_size + 2 * nv * arch.hidden_size + conv * config.linear_conv_kernel_dim \
            + 2 * nv + dv + arch.hidden_size * nv * dv

    @staticmethod
    def cache_bytes(config: Any, arch: Any, nbytes: int) -> int:
        """One sequence's state in one layer: the conv window over q, k, v (in the activation dtype) and the
        recurrent state [nv, dk, dv] in fp32."""
        nk, nv, dk, dv = GatedDeltaNet.shape(config, arch)
        return (2 * nk * dk + nv * dv) * config.linear_conv_kernel_dim * nbytes + nv * dk * dv * 4

    @staticmethod
    def check(config: Any, arch: Any, parent: Any) -> str | None:
        """Why `arch`'s DeltaNet heads cannot be cut from the parent's, or None (beside the family's own check that
        no width grows)."""
        if arch.get(VALUE_HEADS) % arch.get(KEY_HEADS):
            return f"{VALUE_HEADS}={arch.get(VALUE_HEADS)} must be a multiple of {KEY_HEADS}={arch.get(KEY_HEADS)}"
        if arch.get(VALUE_HEADS) // arch.get(KEY_HEADS) > parent.get(VALUE_HEADS) // parent.get(KEY_HEADS):
            return f"{VALUE_HEADS}/{KEY_HEADS}={arch.get(VALUE_HEADS) // arch.get(KEY_HEADS)} exceeds the parent's " \
                   f"{parent.get(VALUE_HEADS) // parent.get(KEY_HEADS)} value heads per key head"
        return None

    def axes(self, prefix: str) -> dict[str, tuple[str | None, ...]]:
        """"gdn_conv": conv channels (and `in_proj_qkv`'s rows); "gdn_v": the kept value heads' channels (z rows,
        `out_proj` columns); "gdn_heads": the kept value heads; interleaved, "gdn_qkvz" / "gdn_ba": rows of the
        per-key-head blocks."""
        out = {f"{prefix}.conv1d.weight": ("gdn_conv", None, None), f"{prefix}.A_log": ("gdn_heads",),
               f"{prefix}.dt_bias": ("gdn_heads",), f"{prefix}.norm.weight": (None,),
               f"{prefix}.out_proj.weight": ("hidden", "gdn_v")}
        if self.layout == "interleaved":
            out.update({f"{prefix}.in_proj_qkvz.weight": ("gdn_qkvz", "hidden"),
                        f"{prefix}.in_proj_ba.weight": ("gdn_ba", "hidden")})
        else:
            out.update({f"{prefix}.in_proj_qkv.weight": ("gdn_conv", "hidden"),
                        f"{prefix}.in_proj_z.weight": ("gdn_v", "hidden"),
                        f"{prefix}.in_proj_b.weight": ("gdn_heads", "hidden"),
                        f"{prefix}.in_proj_a.weight": ("gdn_heads", "hidden")})
        return out

    @staticmethod
    def select(value_scores: Tensor, arch: Any, parent: Any) -> tuple[Tensor, Tensor]:
        """(kept value heads [nv'], kept key heads [nk']), ascending: the key heads whose value heads score most in
        sum, and in each its best nv' / nk' value heads."""
        per_key = parent.get(VALUE_HEADS) // parent.get(KEY_HEADS)
        grouped = value_scores.float().view(parent.get(KEY_HEADS), per_key)
        keys = grouped.sum(1).topk(arch.get(KEY_HEADS)).indices.sort().values
        keep = arch.get(VALUE_HEADS) // arch.get(KEY_HEADS)
        values = [g * per_key + grouped[g].topk(keep).indices.sort().values for g in keys.tolist()]
        return torch.cat(values), keys

    def indices(self, values: Tensor, keys: Tensor, config: Any, parent: Any) -> dict[str, Tensor]:
        """The index sets of the kept value and key heads, as rows of the parent's fused tensors."""
        nk, nv, dk, dv = self.shape(config, parent)
        k_rows, v_rows = head_rows(keys, dk), head_rows(values, dv)
        out = {"gdn_heads": values, "gdn_v": v_rows,
               "gdn_conv": torch.cat([k_rows, nk * dk + k_rows, 2 * nk * dk + v_rows])}
        if self.layout == "interleaved":
            r = nv // nk
            block = 2 * dk + 2 * r * dv
            qkvz, ba = [], []
            for g in keys.tolist():
                local = values[values // r == g] - g * r  # its kept value heads, 0..r-1
                v = head_rows(local, dv)
                qkvz += [g * block + torch.arange(2 * dk), g * block + 2 * dk + v, g * block + 2 * dk + r * dv + v]
                ba += [g * 2 * r + local, g * 2 * r + r + local]
            out.update(gdn_qkvz=torch.cat(qkvz), gdn_ba=torch.cat(ba))
        return out

    @staticmethod
    def hooks(mixer: nn.Module, record: Callable[[nn.Module, Tensor], None]) -> list:
        """Value heads are scored at the output projection's input: the gated, normalised heads side by side."""
        return [mixer.out_proj.register_forward_pre_hook(lambda out_proj, args: record(out_proj, args[0]))]
