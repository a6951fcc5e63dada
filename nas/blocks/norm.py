"""Norm unit: RMSNorm (w * x / rms), Gemma's and Nemotron's offset scale ((1 + w) * ...), or LayerNorm with bias."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

KINDS = ("rms", "rms_1p", "layernorm_1p")


@dataclass(frozen=True)
class Norm:
    """Attributes:
        kind: "rms" (Llama's RMSNorm), "rms_1p" (Gemma: scales by 1 + w) or "layernorm_1p" (Nemotron's LayerNorm1P:
            mean-centred, 1 + w, with a bias).
    """

    kind: str = "rms"

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind

    @property
    def has_bias(self) -> bool:
        return self.kind == "layernorm_1p"

    def num_parameters(self, width: int) -> int:
        return 2 * width if self.has_bias else width

    slice_axes = {"weight": ("hidden",), "bias": ("hidden",)}

    def rescaled(self, weight: Tensor, factor: float) -> Tensor:
        """A kept RMSNorm weight scaled so that its output over fewer channels keeps the parent's size: the RMS is a
        mean over the width, so channels whose activations were zero shrink it by sqrt(child / parent). A
        LayerNorm is left alone (its mean and variance move with the dropped channels; no factor restores both)."""
        if self.kind == "rms":
            return weight * factor
        if self.kind == "rms_1p":  # in fp32 as the model computes 1 + w: a small w would vanish next to 1 in bf16
            return ((1 + weight.float()) * factor - 1).to(weight.dtype)
        return weight
