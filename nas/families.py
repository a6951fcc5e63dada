"""Model families as data over block units (`nas.blocks`): which units a decoder layer holds, which norms sit
where, and the quirks of the embeddings and logits. Importance, pruning and parameter counts read these entries;
adding a family is one entry in `FAMILIES` plus its tiny config in the tests.

A layer is a list of slots, each a module path inside the layer and the unit there. HF's usual decoder layer holds
its mixer at `self_attn` and its MLP (a dense one, or a router over experts) at `mlp`; a hybrid's layers differ by
kind, as its config's layer pattern says (`Family.pattern_key`): a Mamba2 or Gated DeltaNet mixer in some layers,
attention in others (Nemotron-H keeps one `mixer` a layer, of any kind, and no separate MLP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nas.architecture import KIND_AXIS, LAYER_KEYS, PER_LAYER, Architecture, LayerShape
from nas.blocks.moe import TOP_K
from nas.blocks import MLP, Attention, GatedDeltaNet, Mamba2, MoE, Norm
from nas.errors import ArchitectureError, UnsupportedModelError

PRE_NORMS = ("input_layernorm", "post_attention_layernorm")  # Llama: before attention, before the MLP
SANDWICH_NORMS = (*PRE_NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm")  # Gemma 2/3: around both
POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")  # OLMo 2/3: on each block's output


@dataclass(frozen=True)
class BlockNorms:
    """The norms of one block a per-layer child may skip, by module name inside the layer: `pre` on the block's
    input, `post` on its output (None where there is none). The layer computes x + post(block(pre(x))), and a child
    that skips the block has neither norm."""

    pre: str | None
    post: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.pre, self.post) if n)


#: Llama's pre-norm layer: x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x)).
PRE_NORM_BLOCKS = (("attention", BlockNorms("input_layernorm")), ("mlp", BlockNorms("post_attention_layernorm")))
#: Gemma 2/3's sandwich: x + post_attention_layernorm(attn(input_layernorm(x))), then
#: x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))).
SANDWICH_BLOCKS = (("attention", BlockNorms("input_layernorm", "post_attention_layernorm")),
                   ("mlp", BlockNorms("pre_feedforward_layernorm", "post_feedforward_layernorm")))

#: The mixer of every layer of a family without a layer pattern: attention at `self_attn`.
ATTENTION_ONLY = (("*", (("attention", "self_attn"),)),)


@dataclass(frozen=True)
class Family:
    """What one HF model family looks like to the pruner.

    Attributes:
        model_type: HF `config.model_type`.
        attention, mlp, norm: the block units of its decoder layers (`norm` is the kind of every norm).
        moe: the mixture-of-experts unit of its sparse layers (None: every layer's MLP is dense); a family with
            one may still keep dense MLPs in some layers (`MoE.is_sparse`).
        mamba, deltanet: the recurrent mixer units of a hybrid's linear-attention layers.
        mixers: (layer kind, ((unit attribute, module path), ...)) for each kind of layer the pattern names; "*"
            when the family has no pattern. A kind may hold two mixers side by side (Falcon-H1's attention and
            Mamba2 in every layer).
        ffn: the module path of the MLP (or experts) every layer holds after its mixer; None when the MLP is a
            mixer kind of its own (Nemotron-H).
        pattern_key: the config key listing each layer's kind (None: every layer is alike but for its MLP).
        attention_layers_key: where the pattern is derived from a list of the attention layers' indices (Bamba's
            `attn_layer_indices`), that key: a child's is re-indexed.
        layer_norms: the norms of a decoder layer, by module name; each is scored for the hidden channels and
            sliced with them.
        embeddings, final_norm: the model-level modules' paths.
        stored_root: what a checkpoint on disk calls `model` (Nemotron-H's say `backbone`).
        scaled_embedding: the embedding output is multiplied by sqrt(hidden_size) (Gemma), a factor that changes
            with the child's width.
        per_layer: its decoder layer is an attention block and an MLP block, each x + post(block(pre(x))) with the
            norms of `block_norms`, reading its widths from the config, which `nas.loader` builds per layer
            (`Architecture.per_layer`).
        block_norms: (block, its norms) for the attention and the MLP of a per-layer family's layer; together they
            are its `layer_norms`.
    """

    model_type: str
    attention: Attention = Attention()
    mlp: MLP = MLP()
    norm: Norm = Norm()
    layer_norms: tuple[str, ...] = PRE_NORMS
    scaled_embedding: bool = False
    moe: MoE | None = None
    mamba: Mamba2 | None = None
    deltanet: GatedDeltaNet | None = None
    mixers: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ATTENTION_ONLY
    ffn: str | None = "mlp"
    pattern_key: str | None = None
    attention_layers_key: str | None = None
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    stored_root: str = "model"
    per_layer: bool = False
    block_norms: tuple[tuple[str, BlockNorms], ...] = PRE_NORM_BLOCKS

    def __post_init__(self) -> None:
        # Every norm of a per-layer family's layer belongs to one block: a skipped block takes exactly its own.
        assert not self.per_layer or sorted(n for _, b in self.block_norms for n in b.names) == \
            sorted(self.layer_norms), self.model_type

    def skippable(self) -> tuple[tuple[str, str, BlockNorms], ...]:
        """(block, module path inside the layer, its norms) of each block a per-layer child may skip, in the order
        the layer runs them."""
        paths = {"attention": dict(dict(self.mixers)["*"])["attention"], "mlp": self.ffn}
        return tuple((block, paths[block], norms) for block, norms in self.block_norms)

    @property
    def recurrent(self) -> Mamba2 | GatedDeltaNet | None:
        """The hybrid's recurrent mixer unit, or None."""
        return self.mamba or self.deltanet

    @property
    def unit_keys(self) -> tuple[str, ...]:
        """The config keys of its axes beyond the dense ones (`Architecture.unit_axes`)."""
        return (*(self.moe.keys if self.moe else ()), *(self.recurrent.keys if self.recurrent else ()))

    def is_sparse(self, config: Any, layer: int) -> bool:
        """Whether the parent layer `layer` routes tokens to experts."""
        return self.moe is not None and self.moe.is_sparse(config, layer)

    def layer_kind(self, config: Any, layer: int) -> str:
        """The parent layer's kind as its config's pattern names it ("*" without a pattern)."""
        return getattr(config, self.pattern_key)[layer] if self.pattern_key else "*"

    def kind_size(self, config: Any, layer: int) -> tuple[str, bool]:
        """What sets a layer's size: its kind, and whether it routes to experts."""
        return self.layer_kind(config, layer), self.is_sparse(config, layer)

    def depth_kind(self, config: Any, layer: int) -> str:
        """The kind a depth axis counts the parent layer under, which fixes its size: its pattern's kind, and
        ":dense" or ":sparse" where the parent has both (a family without a pattern: "dense" or "sparse")."""
        mlp = ""
        if len({self.is_sparse(config, i) for i in range(config.num_hidden_layers)}) > 1:
            mlp = "sparse" if self.is_sparse(config, layer) else "dense"
        return ":".join(k for k in (self.layer_kind(config, layer) if self.pattern_key else "", mlp) if k)

    def mixes_layers(self, config: Any) -> bool:
        """Whether the parent's layers differ in size (dense and sparse, or of several kinds): a shallower child's
        size then depends on which it keeps."""
        return len({self.kind_size(config, i) for i in range(config.num_hidden_layers)}) > 1

    def refusal(self, config: Any) -> str | None:
        """Why this parent's layers cannot be described by the family's units, or None."""
        kinds = {kind for kind, _ in self.mixers}
        if self.pattern_key and (odd := sorted(set(getattr(config, self.pattern_key)) - kinds)):
            return f"its {self.pattern_key} holds {odd} layers, which no block unit describes yet (the units " \
                   f"cover {sorted(kinds)})"
        return None

    def per_layer_refusal(self) -> str | None:
        """Why a child of this family cannot vary its widths layer by layer, or None."""
        if self.moe:
            return "its MLPs are mixtures of experts; per-layer KV heads and MLP widths are for dense families"
        if self.recurrent or self.pattern_key:
            return "it is a hybrid (recurrent mixers beside attention), whose children stay uniform"
        if not self.per_layer:
            supported = ", ".join(t for t, f in FAMILIES.items() if f.per_layer)
            return f"nas's loader does not build its decoder layer per layer yet (per-layer families: {supported})"
        return None

    def is_attention(self, config: Any, layer: int) -> bool:
        """Whether the parent layer `layer` holds attention (a KV cache)."""
        return any(isinstance(unit, Attention) for _, unit in self.slots(config, layer))

    def slots(self, config: Any, layer: int) -> list[tuple[str, Any]]:
        """(module path inside the layer, unit) of each block of the parent layer `layer`."""
        out = [(path, getattr(self, unit)) for unit, path in dict(self.mixers)[self.layer_kind(config, layer)]]
        if self.ffn:
            out.append((self.ffn, self.moe if self.is_sparse(config, layer) else self.mlp))
        return out

    def layer_axes(self, config: Any, layer: int) -> dict[str, tuple[str | None, ...]]:
        """Which kept-index set each dimension of each parameter of the parent layer `layer` (by name inside the
        layer) is sliced by."""
        out = {f"{n}.{kind}": axes for n in self.layer_norms for kind, axes in self.norm.slice_axes.items()}
        for path, unit in self.slots(config, layer):
            out.update(unit.axes(path))
        return out

    @property
    def outside_axes(self) -> dict[str, tuple[str | None, ...]]:
        """The slice rules of the parameters outside the layers."""
        return {f"{self.embeddings}.weight": (None, "hidden"), "lm_head.weight": (None, "hidden"),
                f"{self.final_norm}.weight": ("hidden",), f"{self.final_norm}.bias": ("hidden",)}

    def is_norm(self, name: str) -> bool:
        """Whether the parameter `name` is the weight of a norm over the hidden channels."""
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            return parts[-1] == "weight" and ".".join(parts[3:-1]) in self.layer_norms
        return name == f"{self.final_norm}.weight"

    def layer_parameters(self, config: Any, arch: Architecture, layer: int = 0, active: bool = False,
                         shape: LayerShape | None = None) -> int:
        """Parameters of the child `arch`'s copy of the parent layer `layer`, at its own widths `shape` (default:
        the global ones); `active`: those a token uses (a sparse layer's top-k experts, not all). A skipped block
        counts nothing, nor do its norms (`block_norms`)."""
        shape = shape or arch.uniform_shape
        widths = arch if shape == arch.uniform_shape else \
            arch.replace(per_layer=(), **{k: v for k, v in vars(shape).items() if v})
        blocks = {"attention": shape.attention, "mlp": shape.mlp}
        units = sum(unit.num_parameters(config, widths, active) if isinstance(unit, MoE) else
                    unit.num_parameters(config, widths) for _, unit in self.slots(config, layer)
                    if blocks.get(self.block_of(unit), True))
        norms = sum(len(n.names) for block, n in self.block_norms if blocks[block]) if self.per_layer \
            else len(self.layer_norms)
        return units + norms * self.norm.num_parameters(arch.hidden_size)

    def block_of(self, unit: Any) -> str | None:
        """"attention" or "mlp" for a unit a per-layer child may skip, else None."""
        return "attention" if isinstance(unit, Attention) else "mlp" if unit is self.mlp else None

    def num_parameters(self, config: Any, arch: Architecture, active: bool = False) -> int:
        """Exact parameter count of the child `arch` of a parent with `config` (no weights needed); `active`: the
        parameters one token uses (all but the experts it is not routed to)."""
        h = arch.hidden_size
        vocab = config.vocab_size * h
        lm_head = 0 if getattr(config, "tie_word_embeddings", False) else vocab
        return sum(self.layer_parameters(config, arch, i, active, arch.layer_shape(j))
                   for j, i in enumerate(arch.layers)) + vocab + lm_head + self.norm.num_parameters(h)

    def check_child(self, config: Any, arch: Architecture) -> None:
        """Raise if `arch` is not a sub-architecture of the parent `config`."""
        parent = Architecture.of_config(config, self.unit_keys)
        if set(arch.keys) != set(parent.keys):
            raise ArchitectureError(f"{arch.short()}: a {self.model_type} child sets {sorted(parent.keys)}, "
                                    f"not {sorted(arch.keys)}")
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                    *self.unit_keys):
            if arch.get(key) > parent.get(key):
                raise ArchitectureError(
                    f"{key}={arch.get(key)} is larger than the parent's {parent.get(key)}; "
                    f"pruning can only shrink it"
                )
        if self.moe and arch.get(TOP_K) > arch.get(self.moe.count_key):
            raise ArchitectureError(f"{TOP_K}={arch.get(TOP_K)} exceeds the {arch.get(self.moe.count_key)} experts "
                                    f"kept ({self.moe.count_key}); a token cannot take more experts than there are")
        if self.attention.q_norm_is_hidden and arch.hidden_size != arch.num_attention_heads * arch.head_dim:
            raise ArchitectureError(f"{self.model_type} sizes its q norm by hidden_size, so hidden_size must equal "
                                    f"num_attention_heads x head_dim ({arch.num_attention_heads} x {arch.head_dim}); "
                                    f"cut both in proportion")
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
        if self.recurrent and (problem := self.recurrent.check(config, arch, parent)):
            raise ArchitectureError(problem)
        if not arch.is_uniform:
            self.check_layers(arch, parent)
        if self.recurrent and arch.layers and not any(self.is_attention(config, i) for i in arch.layers):
            # With no attention layer HF's hybrid cache has no sequence length, so a cached forward (generation)
            # fails in transformers; a child keeps one at least.
            raise ArchitectureError(f"layers={list(arch.layers)} keeps no attention layer of the parent's "
                                    f"{[i for i in range(parent.num_hidden_layers) if self.is_attention(config, i)]}; "
                                    f"a hybrid child must keep at least one to run with a cache")

    def check_layers(self, arch: Architecture, parent: Architecture) -> None:
        """Raise if the per-layer widths of `arch` are not this family's or not within the parent's."""
        if problem := self.per_layer_refusal():
            raise ArchitectureError(f"{arch.short()}: {self.model_type} takes no per-layer architecture: {problem}")
        for j, shape in enumerate(arch.per_layer):
            for key in LAYER_KEYS:
                if getattr(shape, key) > parent.get(key):
                    raise ArchitectureError(f"{PER_LAYER}.{j}.{key}={getattr(shape, key)} is larger than the "
                                            f"parent's {parent.get(key)}; pruning can only shrink it")

    def child_config(self, config: Any, arch: Architecture) -> Any:
        """A stock config of the parent's class describing `arch`, with per-layer lists sliced."""
        self.check_child(config, arch)
        data = self.layers_data(config, arch.layers)
        data.update({k: v for k, v in arch.to_dict().items() if k != "layers"})
        if self.mamba:
            data.update(self.mamba.child_entries(arch))
        try:
            return type(config).from_dict(data)
        except Exception as e:  # the stock config's own validators (huggingface_hub strict dataclasses)
            reason = str(e).strip().splitlines()[-1].strip()
            raise ArchitectureError(f"{arch.short()}: {type(config).__name__} rejects it: {reason}") from None

    def layers_data(self, config: Any, layers: tuple[int, ...]) -> dict[str, Any]:
        """The parent's config as a dict, with what says each layer's kind made to describe the kept `layers`: the
        per-layer lists (`layer_types`' sliding and full layers, a hybrid's pattern, SmolLM3's `no_rope_layers`)
        sliced, and the lists of layer indices (dense layers, Bamba's attention layers) re-indexed."""
        data = config.to_dict()
        parent_layers = config.num_hidden_layers
        for key, value in data.items():
            if isinstance(value, list) and len(value) == parent_layers and key not in _NOT_PER_LAYER:
                data[key] = [value[i] for i in layers]
        data["num_hidden_layers"] = len(layers)
        if self.moe:
            data.update(self.moe.child_layout(config, layers))
        if self.attention_layers_key:
            attention = set(getattr(config, self.attention_layers_key) or [])
            data[self.attention_layers_key] = [j for j, i in enumerate(layers) if i in attention]
        data.pop("transformers_version", None)
        data.pop("quantization_config", None)  # a quantised parent (gpt-oss's MXFP4 experts) is dequantised on load
        return data


# Lists in a config that can happen to be as long as the layers without being per layer (layer indices, Falcon-H1's
# muP multipliers and time-step clamp, Nemotron-H's multi-token-prediction layers).
_NOT_PER_LAYER = {"architectures", "bos_token_id", "eos_token_id", "pad_token_id", "mlp_only_layers",
                  "attn_layer_indices", "time_step_limit", "mlp_multipliers", "ssm_multipliers",
                  "mtp_layers_block_type"}

_GEMMA = dict(norm=Norm("rms_1p"), layer_norms=SANDWICH_NORMS, block_norms=SANDWICH_BLOCKS, scaled_embedding=True,
              per_layer=True)
_GATED_ATTENTION = Attention(qk_norm="head", gated_query=True)
_DELTANET_MIXERS = (("linear_attention", (("deltanet", "linear_attn"),)),
                    ("full_attention", (("attention", "self_attn"),)))
_MAMBA_KEYS = dict(heads_key="mamba_n_heads", head_dim_key="mamba_d_head", groups_key="mamba_n_groups",
                   state_key="mamba_d_state", conv_key="mamba_d_conv", bias_key="mamba_proj_bias",
                   conv_bias_key="mamba_conv_bias")
_FFN_NORMS = dict(layer_norms=("input_layernorm", "pre_ff_layernorm"), final_norm="model.final_layernorm")

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", per_layer=True),
        Family("mistral", attention=Attention(bias_key=None), per_layer=True),
        Family("qwen2", attention=Attention(bias_key=None, qkv_bias_always=True), per_layer=True),
        Family("qwen3", attention=Attention(qk_norm="head"), per_layer=True),
        Family("nemotron", mlp=MLP(gated=False), norm=Norm("layernorm_1p"), per_layer=True),
        Family("gemma2", **_GEMMA),
        Family("gemma3_text", attention=Attention(qk_norm="head"), **_GEMMA),
        Family("phi3", attention=Attention(fused_qkv=True, bias_key=None), mlp=MLP(fused=True)),
        Family("smollm3", per_layer=True),
        Family("olmo2", attention=Attention(qk_norm="all"), layer_norms=POST_NORMS),
        Family("olmo3", attention=Attention(qk_norm="all"), layer_norms=POST_NORMS),
        Family("granite", per_layer=True),
        # Mixtures of experts.
        Family("qwen3_moe", attention=Attention(qk_norm="head"), moe=MoE("num_local_experts")),
        Family("qwen2_moe", attention=Attention(bias_key="qkv_bias", o_bias=False),
               moe=MoE("num_experts", shared_key="shared_expert_intermediate_size")),
        Family("mixtral", attention=Attention(bias_key=None),
               moe=MoE("num_local_experts", width_key="intermediate_size", stored_experts=("w1", "w3", "w2"),
                       stored_block="block_sparse_moe")),
        Family("olmoe", attention=Attention(qk_norm="all", q_norm_is_hidden=True),
               moe=MoE("num_experts", width_key="intermediate_size")),
        Family("gpt_oss", attention=Attention(sinks=True),
               moe=MoE("num_local_experts", width_key="intermediate_size", router="router", layout="interleaved",
                       stored_experts=None)),
        # Hybrids: recurrent mixers beside attention, each layer's kind set by its config's pattern.
        Family("nemotron_h", attention=Attention(bias_key=None), mlp=MLP(gated=False), mamba=Mamba2(),
               mixers=(("linear_attention", (("mamba", "mixer"),)), ("full_attention", (("attention", "mixer"),)),
                       ("mlp", (("mlp", "mixer"),))),
               ffn=None, pattern_key="layers_block_type", layer_norms=("norm",), embeddings="model.embeddings",
               final_norm="model.norm_f", stored_root="backbone"),
        Family("qwen3_next", attention=_GATED_ATTENTION, norm=Norm("rms_1p"), deltanet=GatedDeltaNet("interleaved"),
               moe=MoE("num_experts", shared_key="shared_expert_intermediate_size"), mixers=_DELTANET_MIXERS,
               pattern_key="layer_types"),
        # Qwen3.5's checkpoints are its vision-language model; its text decoder is this (`TEXT_DECODERS`).
        Family("qwen3_5_text", attention=_GATED_ATTENTION, norm=Norm("rms_1p"), deltanet=GatedDeltaNet("split"),
               mixers=_DELTANET_MIXERS, pattern_key="layer_types"),
        Family("bamba", mamba=Mamba2(**_MAMBA_KEYS, expand_key="mamba_expand"), ffn="feed_forward",
               mixers=(("linear_attention", (("mamba", "mamba"),)), ("full_attention", (("attention", "self_attn"),))),
               pattern_key="layers_block_type", attention_layers_key="attn_layer_indices", **_FFN_NORMS),
        # Attention and Mamba2 side by side in every layer, under muP multipliers (scalars, and a per-section vector
        # the model recomputes from its config, so a child keeps them as they are).
        Family("falcon_h1", mamba=Mamba2(**_MAMBA_KEYS, out_bias_key="projectors_bias", inner_key="mamba_d_ssm",
                                         norm_key="mamba_rms_norm"), ffn="feed_forward",
               mixers=(("*", (("attention", "self_attn"), ("mamba", "mamba"))),), **_FFN_NORMS),
    )
}

#: Vision-language configs whose text decoder `nas` prunes (transformers' `get_text_config()`; the checkpoint's
#: `model.language_model.*` weights load into the text model, the vision tower is left out).
TEXT_DECODERS = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}

#: Families transformers knows that these units do not describe yet, and what they lack.
NOT_YET: dict[str, str] = {
    "qwen3_5_moe_text": "its Gated DeltaNet and MoE layers fit the units, but every layer routes to experts and its "
                        "config has no dense intermediate_size, which the Architecture value requires",
    **{t: "its attention is multi-head latent attention (low-rank compressed keys and values, `kv_lora_rank`), "
          "which the attention unit cannot slice by heads"
       for t in ("deepseek_v2", "deepseek_v3", "kimi_k2")},
    **{t: "its router and experts have not been checked against the mixture-of-experts unit yet (module names, "
          "router softmax, logit scaling)"
       for t in ("granitemoe", "phimoe")},
    **{t: "its layers mix Mamba / linear-attention blocks with attention in a layout no block unit describes yet"
       for t in ("jamba", "granitemoehybrid")},
    "gemma4_text": "its layers take per-layer input embeddings (hidden_size_per_layer_input) and share KV caches "
                   "across layers (num_kv_shared_layers), which no block unit slices yet",
    "gemma3": "it is the multimodal Gemma 3; give the text model (model_type gemma3_text, e.g. Gemma 3 270M/1B)",
}


def family_of(config: Any) -> Family:
    """The family of a config, or one clear error: what is missing for a known family, else the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        family = FAMILIES[model_type]
        if problem := family.refusal(config):
            raise UnsupportedModelError(f"model_type={model_type!r}: {problem}")
        return family
    supported = ", ".join(sorted(FAMILIES))
    if model_type in NOT_YET:
        raise UnsupportedModelError(f"model_type={model_type!r} is not supported yet: {NOT_YET[model_type]}; "
                                    f"supported families: {supported}")
    raise UnsupportedModelError(f"model_type={model_type!r} is not supported; supported families: {supported}")


@dataclass(frozen=True)
class Parent:
    """A parent's config resolved once: its family and its own architecture (every layer kept). Enumeration, the
    budget and the plan ask it about children instead of re-deriving both from the config each time."""

    config: Any
    family: Family
    architecture: Architecture

    @classmethod
    def of(cls, config: Any) -> Parent:
        if getattr(config, "is_heterogeneous", False):
            raise UnsupportedModelError("the parent is a per-layer child (its config.json has per_layer_config); nas "
                                        "prunes uniform parents: prune the original parent to the architecture")
        family = family_of(config)
        return cls(config, family, Architecture.of_config(config, family.unit_keys))

    def num_parameters(self, arch: Architecture | None = None) -> int:
        """The exact parameter count of the child `arch` (of the parent itself when None)."""
        return self.family.num_parameters(self.config, arch or self.architecture)

    def active_parameters(self, arch: Architecture | None = None) -> int:
        """The parameters one token uses (equal to `num_parameters` in a dense family)."""
        return self.family.num_parameters(self.config, arch or self.architecture, active=True)

    def cache_bytes(self, arch: Architecture, context: int, batch: int, nbytes: int = 2) -> int:
        """Bytes of the cache the child `arch` holds for `batch` sequences of `context` tokens at `nbytes` an
        element, as HF's static cache allocates it: keys and values of every attention layer, `context` tokens in a
        full-attention layer and min(window, context) in a sliding-window one, each with the layer's own KV heads
        (none in a per-layer child's attention-free layer), and a hybrid's recurrent state in each
        linear-attention layer (beside the keys and values where a layer holds both), whose size does not grow
        with the context (the layers are HF's own static cache for the child's config)."""
        layers = _static_cache_layers(self.child_config(arch), context, self.family.model_type)
        # (HF's static cache gives an attention-free layer a layer too, which it never fills: 0 KV heads count it)
        head_tokens = sum(held * shape.num_key_value_heads for (held, _), shape in zip(layers, arch.layer_shapes))
        states = sum(kept for _, kept in layers)
        recurrent = states * self.family.recurrent.cache_bytes(self.config, arch, nbytes) if states else 0
        return (2 * head_tokens * arch.head_dim * nbytes + recurrent) * batch

    def layers_by_kind(self) -> dict[str, tuple[int, ...]]:
        """The parent's layers of each depth kind (`Family.depth_kind`), in order."""
        out: dict[str, list[int]] = {}
        for i in range(self.config.num_hidden_layers):
            out.setdefault(self.family.depth_kind(self.config, i), []).append(i)
        return {kind: tuple(layers) for kind, layers in out.items()}

    def kind_counts(self, layers: tuple[int, ...]) -> dict[str, int]:
        """How many of `layers` are of each depth kind, as the axes `layers.<kind>` name them (empty for a parent
        whose layers are all of one size)."""
        if not self.family.mixes_layers(self.config):
            return {}
        return {f"{KIND_AXIS}{kind}": sum(i in layers for i in members) for kind, members in self.layers_by_kind().items()}

    def first_layers(self, counts: dict[str, int]) -> tuple[int, ...]:
        """A layer set with `counts[kind]` layers of each depth kind (its first ones): same-kind layers are the
        same size, so it stands for any choice importance makes."""
        kinds = self.layers_by_kind()
        for kind, n in counts.items():
            if kind not in kinds:
                raise ArchitectureError(f"{KIND_AXIS}{kind}: the parent has no {kind} layers; its kinds: "
                                        f"{', '.join(kinds)}")
            if not 0 <= n <= len(kinds[kind]):
                raise ArchitectureError(f"{KIND_AXIS}{kind}={n}: the parent has {len(kinds[kind])} {kind} layers")
        return tuple(sorted(i for kind, n in counts.items() for i in kinds[kind][:n]))

    def largest_cache_layers(self, count: int, context: int) -> tuple[int, ...]:
        """The `count` parent layers whose caches hold the most tokens at `context` (full attention before sliding
        windows), ascending."""
        held = [tokens for tokens, _ in _static_cache_layers(self.config, context, self.family.model_type)]
        return tuple(sorted(sorted(range(len(held)), key=lambda i: (-held[i], i))[:count]))

    def served(self, arch: Architecture, context: int) -> Architecture:
        """`arch` keeping the layers whose caches hold the most at `context` where the parent mixes sliding-window
        and full-attention layers of one size: the worst case of those importance may keep, which a memory budget
        counts and a speed budget times."""
        if arch.num_hidden_layers < self.architecture.num_hidden_layers and not self.family.mixes_layers(self.config):
            # (where kinds differ, the child's layers already have the kinds it keeps, and any of a kind will do)
            return arch.replace(layers=self.largest_cache_layers(arch.num_hidden_layers, context))
        return arch

    def embedding_parameters(self, arch: Architecture | None = None) -> int:
        """Those of the embedding and a separate LM head (what a "non_embedding" budget leaves out)."""
        tied = getattr(self.config, "tie_word_embeddings", False)
        return self.config.vocab_size * (arch or self.architecture).hidden_size * (1 if tied else 2)

    def child_config(self, arch: Architecture) -> Any:
        return self.family.child_config(self.config, arch)

    def child(self, axes: dict[str, Any], layers: tuple[int, ...] | None = None) -> Architecture:
        """The architecture with these axis values (HF config keys, and `layers.<kind>` counts of a parent whose
        layers differ in size), keeping `layers` (default: the first ones, of each kind)."""
        counts = {k[len(KIND_AXIS):]: int(v) for k, v in axes.items() if k.startswith(KIND_AXIS)}
        widths = {k: int(v) for k, v in axes.items() if not k.startswith(KIND_AXIS)}
        if layers is None:
            layers = self.first_layers(counts) if counts else \
                tuple(range(int(widths.get("num_hidden_layers", self.architecture.num_hidden_layers))))
        return self.architecture.replace(**{**widths, "num_hidden_layers": len(layers)}, layers=layers)


def _static_cache_layers(config: Any, context: int, model_type: str) -> list[tuple[int, int]]:
    """(tokens of keys and values, recurrent states) that each layer of HF's static cache for `config` holds at
    `context`, read from transformers' public `StaticCache`, whose layers allocate nothing until first used."""
    from transformers import StaticCache, StaticLayer, StaticSlidingWindowLayer

    try:
        layers = StaticCache(config=config, max_cache_len=context).layers
    except KeyError as e:  # a layer type the static cache has no class for
        raise UnsupportedModelError(f"{model_type}: no cache size for {e.args[0]} layers yet") from None
    out = []
    for layer in layers:
        keys = isinstance(layer, StaticLayer)
        states = getattr(layer, "number_of_states", 0)  # linear attention's conv and recurrent states
        if keys and not states and type(layer) not in (StaticLayer, StaticSlidingWindowLayer):
            raise UnsupportedModelError(f"{model_type}: no cache size for {type(layer).__name__} layers yet")
        if states > 1:  # (the recurrent units size one state a layer; others may differ in shape)
            raise UnsupportedModelError(f"{model_type}: its layers keep {states} conv and recurrent states each "
                                        f"(number_of_conv_states), whose cache size nas cannot count yet")
        out.append((layer.max_cache_len if keys else 0, states))
    return out


def logit_map(config: Any) -> tuple[float, float | None]:
    """(scale, softcap) that a family's forward applies to `hidden @ lm_head.T`: Granite divides by
    `logits_scaling`, Falcon-H1 multiplies by `lm_head_multiplier`, Gemma 2 caps with `final_logit_softcapping`
    (tanh(x / cap) * cap). The chunked losses and the teacher cache apply the same, so that they see the logits the
    model's own forward gives."""
    scale = float(getattr(config, "lm_head_multiplier", None) or 1.0) / \
        float(getattr(config, "logits_scaling", None) or 1.0)
    return scale, getattr(config, "final_logit_softcapping", None) or None
