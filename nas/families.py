"""Model-family adapters: where each family keeps its heads, neurons, channels, norms and layers.

Every supported family shares HF's Llama layout (`model.embed_tokens`, `model.layers[i].self_attn.{q,k,v,o}_proj`,
`.mlp.{gate,up,down}_proj`, `.input_layernorm`, `.post_attention_layernorm`, `model.norm`, `lm_head`), so an
adapter only states what differs: gating, biases, norm type and per-head q/k norms. Importance and pruning are
written once against these facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nas.architecture import Architecture
from nas.errors import ArchitectureError, UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """What one HF model family looks like to the pruner.

    Attributes:
        model_type: HF `config.model_type`.
        gated_mlp: SwiGLU-style `gate_proj`; False for Nemotron's squared-ReLU `up_proj -> down_proj`.
        layernorm: LayerNorm with bias (Nemotron's LayerNorm1P) rather than RMSNorm.
        qk_norm: per-head RMSNorm on queries and keys (Qwen3), of size `head_dim`.
        qkv_bias_always: q/k/v projections always carry a bias (Qwen2), whatever the config says.
        bias_key: config key that switches q/k/v/o biases on, or None when the family has none.
    """

    model_type: str
    gated_mlp: bool = True
    layernorm: bool = False
    qk_norm: bool = False
    qkv_bias_always: bool = False
    bias_key: str | None = "attention_bias"

    @property
    def neuron_module(self) -> str:
        """The MLP projection whose output is the paper's pre-activation `X W1^T` (§2.2)."""
        return "gate_proj" if self.gated_mlp else "up_proj"

    def biases(self, config: Any) -> tuple[bool, bool, bool]:
        """(q/k/v bias, o bias, MLP bias) for a config of this family."""
        attn = bool(self.bias_key and getattr(config, self.bias_key, False))
        mlp = bool(getattr(config, "mlp_bias", False))
        return attn or self.qkv_bias_always, attn, mlp

    def num_parameters(self, config: Any, arch: Architecture) -> int:
        """Exact parameter count of the child `arch` of a parent with `config` (no weights needed)."""
        qkv_bias, o_bias, mlp_bias = self.biases(config)
        h, d, i = arch.hidden_size, arch.head_dim, arch.intermediate_size
        q, kv = arch.num_attention_heads * d, arch.num_key_value_heads * d
        norm = 2 * h if self.layernorm else h
        attention = h * (q + 2 * kv) + q * h + qkv_bias * (q + 2 * kv) + o_bias * h
        attention += 2 * d if self.qk_norm else 0
        mlp_mats = 3 if self.gated_mlp else 2
        mlp = mlp_mats * h * i + mlp_bias * ((mlp_mats - 1) * i + h)
        per_layer = attention + mlp + 2 * norm
        vocab = config.vocab_size * h
        lm_head = 0 if getattr(config, "tie_word_embeddings", False) else vocab
        return arch.num_hidden_layers * per_layer + vocab + lm_head + norm

    def check_child(self, config: Any, arch: Architecture) -> None:
        """Raise if `arch` is not a sub-architecture of the parent `config`."""
        parent = Architecture.of_config(config)
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if getattr(arch, key) > getattr(parent, key):
                raise ArchitectureError(
                    f"{key}={getattr(arch, key)} is larger than the parent's {getattr(parent, key)}; "
                    f"pruning can only shrink it"
                )
        if arch.head_dim != parent.head_dim:
            raise ArchitectureError(f"head_dim={arch.head_dim} must equal the parent's {parent.head_dim}")
        if arch.layers and arch.layers[-1] >= parent.num_hidden_layers:
            raise ArchitectureError(
                f"layers={list(arch.layers)} names a layer >= the parent's {parent.num_hidden_layers} layers"
            )
        if arch.queries_per_group > parent.queries_per_group:
            raise ArchitectureError(
                f"num_attention_heads/num_key_value_heads={arch.queries_per_group} exceeds the parent's "
                f"{parent.queries_per_group} query heads per KV group"
            )

    def child_config(self, config: Any, arch: Architecture) -> Any:
        """A stock config of the parent's class describing `arch`, with per-layer lists sliced."""
        self.check_child(config, arch)
        data = config.to_dict()
        parent_layers = config.num_hidden_layers
        for key, value in data.items():
            # Per-layer lists (e.g. Qwen2's `layer_types`) must follow the kept layers.
            if isinstance(value, list) and len(value) == parent_layers and key != "architectures":
                data[key] = [value[i] for i in arch.layers]
        data.update({k: v for k, v in arch.to_dict().items() if k != "layers"})
        data.pop("transformers_version", None)
        try:
            return type(config).from_dict(data)
        except Exception as e:  # the stock config's own validators (huggingface_hub strict dataclasses)
            reason = str(e).strip().splitlines()[-1].strip()
            raise ArchitectureError(f"{arch.short()}: {type(config).__name__} rejects it: {reason}") from None


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama"),
        Family("mistral", bias_key=None),
        Family("qwen2", qkv_bias_always=True, bias_key=None),
        Family("qwen3", qk_norm=True),
        Family("nemotron", gated_mlp=False, layernorm=True),
    )
}


def family_of(config: Any) -> Family:
    """The adapter for a config, or one clear error listing the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not supported; supported families: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
