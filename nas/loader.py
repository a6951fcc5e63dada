"""One loader for children, uniform or per-layer (`nas.load`).

A per-layer child is a stock HF folder: the parent's config class with transformers' own `per_layer_config` entry
(`transformers.integrations.heterogeneity`: a child layer's `num_key_value_heads`, `intermediate_size`, and
`skip: ["attention"] | ["mlp"]`), and safetensors under the family's stock tensor names. transformers 5.24 reads
that config but its modeling code (Llama's, Gemma's) does not build such layers yet (`from_config` and
`from_pretrained` raise `AmbiguousGlobalPerLayerAttributeError`), so nas builds them here: the stock model of the
global widths, then each listed layer given the family's own attention and MLP modules made from that layer's config,
and skipped blocks made real no-ops (no module, none of its norms, no tensors, no cache entry, no compute). A uniform
config goes the stock way. No remote code: the modules are transformers' own.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import DummyLayer

from nas.errors import ArchitectureError, NasError
from nas.families import family_of

def is_per_layer(config: Any) -> bool:
    """Whether `config` carries per-layer overrides (transformers' heterogeneous config)."""
    return bool(getattr(config, "is_heterogeneous", False))


def overrides(config: Any) -> dict[int, dict[str, Any]]:
    """Child layer index -> its overrides (the listed layers only), as transformers normalised them."""
    return {int(j): dict(o) for j, o in config._heterogeneity_spec.per_layer_overrides.items()} \
        if is_per_layer(config) else {}


def global_config(config: Any) -> Any:
    """A copy of a per-layer `config` without its overrides: the widths every unlisted layer takes."""
    data = config.to_dict()
    data.pop("per_layer_config", None)
    return type(config).from_dict(data)


def check_family(config: Any) -> None:
    """Raise `ArchitectureError` if nas cannot build `config`'s family per layer (with the reason)."""
    if problem := family_of(config).per_layer_refusal():
        raise ArchitectureError(f"model_type={config.model_type!r}: no per-layer children: {problem}")


def build(config: Any, dtype: torch.dtype | None = None, **kwargs: Any) -> PreTrainedModel:
    """A causal LM of `config`, per-layer or not, initialised as `from_config` initialises (on the current
    `torch.device` context: "meta" builds no storage). `kwargs` go to `from_config` (e.g. `attn_implementation`)."""
    if not is_per_layer(config):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    check_family(config)
    listed = overrides(config)
    model = AutoModelForCausalLM.from_config(global_config(config), dtype=dtype, **kwargs)
    # The overrides go onto the model's own config object, which every stock module already holds: the model then
    # saves them, and caches and masks read each layer's view (`config.per_layer_config[j]`).
    model.config.per_layer_config = listed
    model_dtype = next(model.parameters()).dtype
    for j, layer in enumerate(model.model.layers):
        if j in listed:
            _shape(layer, j, listed[j], model.config, model_dtype)
    model.init_weights()  # the new modules only: those from_config made are marked initialised
    return model


def _shape(layer: nn.Module, j: int, layer_overrides: dict[str, Any], config: Any, dtype: torch.dtype) -> None:
    """Give decoder layer `j` its own widths: its family's modules rebuilt from its config view, skipped ones gone
    with their norms."""
    view = config.per_layer_config[j]
    skip = set(layer_overrides.get("skip", ()))
    family = family_of(config)
    for block, path, norms in family.skippable():
        key = "num_key_value_heads" if block == "attention" else "intermediate_size"
        if block in skip:
            setattr(layer, path, None)
            for norm in norms.names:
                setattr(layer, norm, None)
        elif key in layer_overrides:
            old = getattr(layer, path)
            new = type(old)(view, layer_idx=j) if block == "attention" else type(old)(view)
            # Stock modules read the model's config at run time (its attention implementation); so do these.
            new.config = config
            setattr(layer, path, new.to(dtype))
    if skip:
        layer.__class__ = skipping(type(layer), family.skippable())
        layer.layer_index = j


@cache
def skipping(layer_class: type, blocks: tuple) -> type:
    """`layer_class` (a decoder layer of the `blocks` of `Family.skippable`) with a forward that runs only the
    blocks it has. It keeps the class name (device maps and `_no_split_modules` match on it) and stays an instance
    of the stock class (output capture hooks match on that)."""
    return type(layer_class.__name__, (layer_class,),
                {"forward": _forward, "blocks": blocks, "__module__": layer_class.__module__})


def _forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None, use_cache=False,
             position_embeddings=None, **kwargs) -> torch.Tensor:
    """The stock layer, block by block, x + post(block(pre(x))) (Llama's pre-norm layer has no post norm, Gemma's
    sandwich has both; Granite scales each branch by its residual multiplier), with a skipped block left out
    entirely. The model passes each layer its own attention type's mask and rotary embeddings (Gemma's sliding and
    full layers), which go to the attention as the stock layer passes them."""
    scale = getattr(self, "residual_multiplier", None)
    for block, path, norms in self.blocks:
        module = getattr(self, path)
        if module is None:
            if block == "attention" and cache is not None:
                _no_cache(cache, self.layer_index)
            continue
        x = getattr(self, norms.pre)(hidden_states) if norms.pre else hidden_states
        if block == "attention":
            out, _ = module(hidden_states=x, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                            use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        else:
            out = module(x)
        if norms.post:
            out = getattr(self, norms.post)(out)
        hidden_states = hidden_states + (out if scale is None else out * scale)
    return hidden_states


def _no_cache(cache: Any, j: int) -> None:
    """Make layer `j`'s cache entry transformers' `DummyLayer`, which holds nothing. The cache's sequence length and
    mask sizes are read from its first layer that is not a dummy, so an attention-free layer 0 no longer hides the
    tokens seen (an unused stock layer would say 0). Layers run in order, so a cache that grows a layer per update
    already holds layers 0..j-1."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    if j < len(layers):
        if not isinstance(layers[j], DummyLayer):
            layers[j] = DummyLayer()
    elif j == len(layers):
        layers.append(DummyLayer())


def load(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
         ) -> PreTrainedModel:
    """The HF model saved in the folder `path` (a uniform child the stock way, `from_pretrained`), in eval mode.
    `dtype`: the stored dtype when None; `device`: the CPU when None."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise NasError(f"{path}: not an HF checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    device = torch.device(device or "cpu")
    if not is_per_layer(config):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").to(device).eval()
    from transformers.initialization import no_init_weights

    stored = getattr(config, "dtype", None)
    dtype = dtype or (getattr(torch, stored) if isinstance(stored, str) else stored) or torch.float32
    with torch.device(device), no_init_weights():  # every tensor is read below
        model = build(config, dtype=dtype)
    state = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
             for name, tensor in _read(path, device).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if config.tie_word_embeddings else set()
    if unexpected or (missing := sorted(set(missing) - tied)):
        raise NasError(f"{path}: its tensors do not match its config.json's per-layer model (missing "
                       f"{missing[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return model.eval()


def _read(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder (one file, or shards by its index)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name), device=str(device)))
    return state
