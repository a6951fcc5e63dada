"""The `Architecture` value: one candidate child, in the parent family's own config vocabulary."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from nas.errors import ArchitectureError

#: The HF config keys an Architecture sets; its JSON form uses exactly these plus "layers".
CONFIG_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
)


@dataclass(frozen=True)
class Architecture:
    """A child model: uniform widths across layers plus the parent layers it keeps.

    Attributes mirror the HF config keys so the JSON form reads like a `config.json` excerpt.
    `layers` holds the kept parent layer indices in ascending order.
    """

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        for key in CONFIG_KEYS:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ArchitectureError(f"{key}={value!r}: must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ArchitectureError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (GQA groups must be equal)"
            )
        if len(self.layers) != self.num_hidden_layers:
            raise ArchitectureError(
                f"layers has {len(self.layers)} entries but num_hidden_layers={self.num_hidden_layers}"
            )
        if list(self.layers) != sorted(set(self.layers)) or (self.layers and self.layers[0] < 0):
            raise ArchitectureError(f"layers={list(self.layers)}: must be distinct, ascending, >= 0")

    @property
    def mlp_expansion(self) -> float:
        return self.intermediate_size / self.hidden_size

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def of_config(cls, config: Any) -> Architecture:
        """The architecture of a stock HF config (every layer kept)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            num_hidden_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            layers=tuple(range(config.num_hidden_layers)),
        )

    def replace(self, **changes: Any) -> Architecture:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: getattr(self, key) for key in CONFIG_KEYS}
        out["layers"] = list(self.layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        missing = [k for k in (*CONFIG_KEYS, "layers") if k not in data]
        if missing:
            raise ArchitectureError(f"architecture JSON lacks {missing}; expected keys {[*CONFIG_KEYS, 'layers']}")
        return cls(**{k: data[k] for k in CONFIG_KEYS}, layers=tuple(data["layers"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def load(cls, path: str) -> Architecture:
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError:
            raise ArchitectureError(f"--arch {path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ArchitectureError(f"--arch {path}: not valid JSON ({e})") from None

    def short(self) -> str:
        """A compact label: layers/heads/kv/mlp/hidden."""
        return short_label(self.to_dict())


def short_label(axes: dict[str, Any]) -> str:
    """The compact label of a candidate's axes (e.g. "L30-H6-KV3-M768-E576"), as `Architecture.short()` gives it."""
    a = {k: int(axes[k]) for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                   "intermediate_size", "hidden_size")}
    return (f"L{a['num_hidden_layers']}-H{a['num_attention_heads']}-KV{a['num_key_value_heads']}"
            f"-M{a['intermediate_size']}-E{a['hidden_size']}")
