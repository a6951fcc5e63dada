"""The `Architecture` value: one candidate child, in the parent family's own config vocabulary."""

from __future__ import annotations

import dataclasses
import hashlib
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

#: What a candidate records beside its axes, where it applies (`architecture.json`, a trial's user attributes, the
#: summary, best.json): its counts, its serving memory at the budget's context and batch, and its measured speed
#: (`nas.latency`).
FIGURES = ("params", "active_params", "memory_bytes", "latency_ms", "prefill_ms", "throughput", "device_name")


#: The config keys a layer of a per-layer child may set for itself (transformers' `per_layer_config` names), and
#: the blocks its "skip" list may name.
LAYER_KEYS = ("num_key_value_heads", "intermediate_size")
SKIPPABLE = ("attention", "mlp")
PER_LAYER = "per_layer_config"


@dataclass(frozen=True)
class LayerShape:
    """One child layer's own widths: its KV heads (0: the layer has no attention) and its MLP width (0: no MLP).
    Its query heads, head width and hidden size are the architecture's, as in vLLM's and llama.cpp's per-layer
    formats."""

    num_key_value_heads: int
    intermediate_size: int

    @property
    def attention(self) -> bool:
        return self.num_key_value_heads > 0

    @property
    def mlp(self) -> bool:
        return self.intermediate_size > 0

    def overrides(self, uniform: LayerShape) -> dict[str, Any]:
        """This layer's `per_layer_config` entry against the architecture's global widths `uniform` (empty: it
        takes them)."""
        out: dict[str, Any] = {}
        for key, block in zip(LAYER_KEYS, SKIPPABLE):
            value = getattr(self, key)
            if value and value != getattr(uniform, key):
                out[key] = value
        if skip := [block for key, block in zip(LAYER_KEYS, SKIPPABLE) if not getattr(self, key)]:
            out["skip"] = skip
        return out


@dataclass(frozen=True)
class Architecture:
    """A child model: global widths plus the parent layers it keeps, and optionally each kept layer's own shape.

    Attributes mirror the HF config keys so the JSON form reads like a `config.json` excerpt.
    `layers` holds the kept parent layer indices in ascending order. `unit_axes` holds the widths of a family's
    own block units beyond the dense ones (a mixture of experts' expert count, top-k and expert width), as
    (config key, value) pairs under the family's own key names; `get` and `replace` take those keys like the others.
    `per_layer` is empty for a uniform child (every layer takes the global widths); otherwise it holds one
    `LayerShape` per kept layer (child order), and the JSON form adds transformers' own `per_layer_config` entry:
    the child layers whose KV heads or MLP width differ from the global ones, or that skip a block.
    """

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    layers: tuple[int, ...]
    unit_axes: tuple[tuple[str, int], ...] = ()
    per_layer: tuple[LayerShape, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "unit_axes", tuple((str(k), v) for k, v in self.unit_axes))
        # A per-layer table whose every layer takes the global widths is the uniform child: one value, one label.
        shapes = tuple(self.per_layer)
        object.__setattr__(self, "per_layer", () if all(s == self.uniform_shape for s in shapes) else shapes)
        for key in (*CONFIG_KEYS, *dict(self.unit_axes)):
            value = self.get(key)
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
        if self.per_layer:
            self._check_per_layer()

    def _check_per_layer(self) -> None:
        if len(self.per_layer) != self.num_hidden_layers:
            raise ArchitectureError(f"{PER_LAYER} describes {len(self.per_layer)} layers but num_hidden_layers="
                                    f"{self.num_hidden_layers}")
        for j, shape in enumerate(self.per_layer):
            for key in LAYER_KEYS:
                value = getattr(shape, key)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ArchitectureError(f"{PER_LAYER}.{j}.{key}={value!r}: must be a positive integer (or the "
                                            f"block skipped)")
            if shape.attention and self.num_attention_heads % shape.num_key_value_heads:
                raise ArchitectureError(
                    f"{PER_LAYER}.{j}.num_key_value_heads={shape.num_key_value_heads} must divide "
                    f"num_attention_heads={self.num_attention_heads} (a layer's query heads are the global ones)")

    def get(self, key: str) -> int:
        """The value of a config key, dense or a unit's."""
        return getattr(self, key) if key in CONFIG_KEYS else dict(self.unit_axes)[key]

    @property
    def keys(self) -> tuple[str, ...]:
        """The config keys this architecture sets (not "layers")."""
        return (*CONFIG_KEYS, *dict(self.unit_axes))

    @property
    def uniform_shape(self) -> LayerShape:
        """The global widths, which every layer of a uniform child takes."""
        return LayerShape(self.num_key_value_heads, self.intermediate_size)

    @property
    def is_uniform(self) -> bool:
        return not self.per_layer

    def layer_shape(self, j: int) -> LayerShape:
        """The shape of child layer `j` (0-based among the kept layers)."""
        return self.per_layer[j] if self.per_layer else self.uniform_shape

    @property
    def layer_shapes(self) -> tuple[LayerShape, ...]:
        """Each kept layer's shape, in child order."""
        return self.per_layer or (self.uniform_shape,) * self.num_hidden_layers

    def per_layer_config(self) -> dict[str, dict[str, Any]]:
        """transformers' `per_layer_config` form: child layer index (a string, as config.json writes it) -> that
        layer's overrides (`num_key_value_heads`, `intermediate_size`, `skip`); layers that take the global widths
        are not listed. Empty for a uniform child."""
        uniform = self.uniform_shape
        return {str(j): o for j, shape in enumerate(self.per_layer) if (o := shape.overrides(uniform))}

    @property
    def mlp_expansion(self) -> float:
        return self.intermediate_size / self.hidden_size

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def of_config(cls, config: Any, unit_keys: tuple[str, ...] = ()) -> Architecture:
        """The architecture of a stock HF config (every layer kept), with the family's `unit_keys` read from it; a
        per-layer config's (transformers' `per_layer_config`) with its layer table."""
        # A per-layer config refuses to give a per-layer key's global value as an attribute (transformers'
        # AmbiguousGlobalPerLayerAttributeError); its dict holds them beside the per-layer entry.
        data = config.to_dict() if getattr(config, "is_heterogeneous", False) else {}
        def value(key: str) -> Any:
            return data[key] if key in data else getattr(config, key)

        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        arch = cls(
            num_hidden_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=value("num_key_value_heads") or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=value("intermediate_size"),
            layers=tuple(range(config.num_hidden_layers)),
            unit_axes=tuple((key, getattr(config, key)) for key in unit_keys),
        )
        return arch.replace(per_layer=_layer_shapes(data[PER_LAYER], arch)) if data.get(PER_LAYER) else arch

    def replace(self, **changes: Any) -> Architecture:
        units = dict(self.unit_axes)
        for key in [k for k in changes if k in units]:
            units[key] = changes.pop(key)
        if unknown := [k for k in changes if k not in (*CONFIG_KEYS, "layers", "per_layer")]:
            raise ArchitectureError(f"{unknown}: not axes of this architecture; its axes: {list(self.keys)}")
        return dataclasses.replace(self, **changes, unit_axes=tuple(units.items()))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: self.get(key) for key in self.keys}
        out["layers"] = list(self.layers)
        if self.per_layer:
            out[PER_LAYER] = self.per_layer_config()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        """Its JSON form: the dense keys and "layers", plus any unit keys (every other integer entry but the counts
        `FIGURES`; an exported best.json's losses, stage and label are not axes)."""
        missing = [k for k in (*CONFIG_KEYS, "layers") if k not in data]
        if missing:
            raise ArchitectureError(f"architecture JSON lacks {missing}; expected keys {[*CONFIG_KEYS, 'layers']}")
        units = tuple((k, v) for k, v in data.items() if k not in (*CONFIG_KEYS, "layers", *FIGURES)
                      and isinstance(v, int) and not isinstance(v, bool))
        arch = cls(**{k: data[k] for k in CONFIG_KEYS}, layers=tuple(data["layers"]), unit_axes=units)
        if data.get(PER_LAYER):
            arch = arch.replace(per_layer=_layer_shapes(data[PER_LAYER], arch))
        return arch

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
        """A compact label: layers/heads/kv/mlp/hidden, then the unit axes; a per-layer child's ends in "-P" and a
        digest of its layer table (the table itself is in its `architecture.json`)."""
        label = short_label(self.to_dict())
        if self.per_layer:
            table = json.dumps([[s.num_key_value_heads, s.intermediate_size] for s in self.per_layer])
            label += "-P" + hashlib.sha1(table.encode()).hexdigest()[:6]
        return label


def _layer_shapes(entries: Any, arch: Architecture) -> tuple[LayerShape, ...]:
    """The layer table of a `per_layer_config` JSON entry over `arch`'s global widths."""
    if not isinstance(entries, dict):
        raise ArchitectureError(f"{PER_LAYER} must map child layer indices to overrides, e.g. "
                                f'{{"3": {{"skip": ["attention"]}}}}; got {type(entries).__name__}')
    shapes = [arch.uniform_shape] * arch.num_hidden_layers
    for key, overrides in entries.items():
        if not str(key).isdigit() or not int(key) < arch.num_hidden_layers:
            raise ArchitectureError(f"{PER_LAYER}.{key}: not a child layer index (0 to {arch.num_hidden_layers - 1})")
        if not isinstance(overrides, dict) or (odd := sorted(set(overrides) - {*LAYER_KEYS, "skip"})):
            raise ArchitectureError(f"{PER_LAYER}.{key}: a layer sets only {[*LAYER_KEYS, 'skip']}; got "
                                    f"{overrides if not isinstance(overrides, dict) else odd}")
        skip = overrides.get("skip", [])
        if isinstance(skip, str) or not isinstance(skip, list) or (odd := sorted(set(skip) - set(SKIPPABLE))):
            raise ArchitectureError(f"{PER_LAYER}.{key}.skip={skip!r}: a list of blocks among {list(SKIPPABLE)}")
        values = {k: 0 if block in skip else overrides.get(k, getattr(arch, k))
                  for k, block in zip(LAYER_KEYS, SKIPPABLE)}
        shapes[int(key)] = LayerShape(**values)
    return tuple(shapes)


#: Label prefixes, in label order: the dense axes, then the units' (experts, experts a token, expert and shared
#: widths; recurrent heads and head width), then the layers kept of each kind. Keys absent from a candidate are
#: left out of its label.
LABEL_PARTS = {"num_hidden_layers": "L", "num_attention_heads": "H", "num_key_value_heads": "KV",
               "intermediate_size": "M", "hidden_size": "E", "num_experts": "X", "num_local_experts": "X",
               "num_experts_per_tok": "K", "moe_intermediate_size": "XM", "shared_expert_intermediate_size": "S",
               "mamba_num_heads": "MH", "mamba_head_dim": "MD", "mamba_n_heads": "MH", "mamba_d_head": "MD",
               "linear_num_value_heads": "LV",
               "linear_num_key_heads": "LK"}
#: The layers kept of each kind, where a parent's kinds differ in size, are axes `layers.<kind>` (a hybrid's
#: pattern kind, and ":dense"/":sparse" where it mixes both MLPs): labelled L + the kind's letters, e.g. "LR3" for
#: three linear-attention layers, "LRS2" for two sparse ones.
KIND_AXIS = "layers."
KIND_LETTERS = {"full_attention": "A", "linear_attention": "R", "mlp": "F", "dense": "D", "sparse": "S"}


def axis_keys(axes: dict[str, Any]) -> list[str]:
    """The axis keys among `axes`, in label order."""
    return [k for k in LABEL_PARTS if k in axes] + sorted(k for k in axes if k.startswith(KIND_AXIS))


def short_label(axes: dict[str, Any]) -> str:
    """The compact label of a candidate's axes (e.g. "L30-H6-KV3-M768-E576", "L4-H4-KV2-M64-E64-X4-K2-XM32"), as
    `Architecture.short()` gives it."""
    def prefix(key: str) -> str:
        if key in LABEL_PARTS:
            return LABEL_PARTS[key]
        return "L" + "".join(KIND_LETTERS.get(part, part) for part in key[len(KIND_AXIS):].split(":"))

    return "-".join(f"{prefix(key)}{int(axes[key])}" for key in axis_keys(axes))
