"""MLP unit: gated (SwiGLU: `gate_proj`, `up_proj`, `down_proj`; Phi-3 fuses gate and up into `gate_up_proj`) or
plain (Nemotron's squared ReLU: `up_proj`, `down_proj`). Its prunable width is `intermediate_size` (neurons)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class MLP:
    """Attributes:
        gated: a gate projection multiplies the activation; False for `up_proj -> act -> down_proj`.
        fused: gate and up projections are one `gate_up_proj` (gate rows first, then up rows).
    """

    gated: bool = True
    fused: bool = False

    def num_parameters(self, config: Any, arch: Any) -> int:
        h, i = arch.hidden_size, arch.intermediate_size
        mats = 3 if self.gated else 2
        bias = (mats - 1) * i + h if getattr(config, "mlp_bias", False) else 0
        return mats * h * i + bias

    def axes(self, prefix: str, axis: str = "mlp") -> dict[str, tuple[str | None, ...]]:
        """The slice rules of an MLP module at `prefix` whose neurons are the index set `axis` (a shared expert
        is one at "mlp.shared_expert")."""
        first = {"gate_up_proj": "gate_up"} if self.fused else \
            {"gate_proj": axis, "up_proj": axis} if self.gated else {"up_proj": axis}
        out = {f"{prefix}.{name}.weight": (rows, "hidden") for name, rows in first.items()}
        out.update({f"{prefix}.{name}.bias": (rows,) for name, rows in first.items()})
        out.update({f"{prefix}.down_proj.weight": ("hidden", axis), f"{prefix}.down_proj.bias": ("hidden",)})
        return out

    def indices(self, neurons: Tensor, parent_width: int) -> dict[str, Tensor]:
        """{"mlp": kept neurons} and, fused, the rows of both halves of `gate_up_proj`."""
        out = {"mlp": neurons}
        if self.fused:
            out["gate_up"] = torch.cat([neurons, parent_width + neurons])
        return out

    def hooks(self, mlp: nn.Module, pre: bool, record: Callable[[Tensor], None]) -> list:
        """Score the neurons of the MLP module `mlp` by the paper's pre-activation `X W1^T` (the gate, or the up
        projection when there is no gate) when `pre`, else by the down projection's input."""
        if not pre:
            return [mlp.down_proj.register_forward_pre_hook(lambda _m, args: record(args[0]))]
        if self.fused:  # the gate is the first half of the fused output
            return [mlp.gate_up_proj.register_forward_hook(lambda _m, _a, out: record(out.chunk(2, dim=-1)[0]))]
        first = mlp.gate_proj if self.gated else mlp.up_proj
        return [first.register_forward_hook(lambda _m, _a, out: record(out))]
