"""A child as the folder vLLM runs with its `DeciLMForCausalLM` (vllm/model_executor/models/nemotron_nas.py).

vLLM reads each layer's shape from config.json's `block_configs`: `attention.no_op` or `attention.n_heads_in_group`
(the query heads per KV head: a layer's KV heads are the global query heads divided by it), and `ffn.no_op` or the
MLP width (`ffn.intermediate_size`, read exactly where `ffn_mult` is absent; `ffn_mult` would be rounded up to a
multiple of 256). The tensors keep their Llama names and a no-op block has none, as the saved child already has.
The config's `model_type` is "nemotron-nas", which transformers does not know: the small configuration module
written beside it (`configuration_decilm.py`, named by `auto_map`) gives vLLM attribute access to
`block_configs`, so vLLM loads the folder with `trust_remote_code=True` (the only remote code is that module).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from nas.architecture import PER_LAYER, LayerShape

#: The configuration module's name in the exported folder, and its class (config.json's `auto_map` names both).
CONFIG_MODULE = "configuration_decilm"
CONFIG_CLASS = "DeciLMConfig"
MODEL_TYPE = "nemotron-nas"
#: What a saved child holds besides weights and config.json that the DeciLM folder carries over as it is: the
#: tokenizer, generation defaults, chat template and nas's own architecture.json.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def block_config(shape: LayerShape, heads: int) -> dict[str, Any]:
    """One layer's `block_configs` entry: its attention (no-op, or query heads per KV head) and its MLP (no-op, or
    its width). `replace_with_linear` stays false: a no-op block is absent, not a linear map."""
    attention = {"no_op": not shape.attention, "replace_with_linear": False,
                 "n_heads_in_group": heads // shape.num_key_value_heads if shape.attention else None}
    ffn = {"no_op": not shape.mlp, "replace_with_linear": False,
           "intermediate_size": shape.intermediate_size if shape.mlp else None}
    return {"attention": attention, "ffn": ffn}


def decilm_config(child) -> dict[str, Any]:
    """config.json of the DeciLM folder of `child` (an `nas.exports.Child`)."""
    config = {k: v for k, v in child.config.items() if k != PER_LAYER}
    config.update(model_type=MODEL_TYPE, architectures=["DeciLMForCausalLM"],
                  auto_map={"AutoConfig": f"{CONFIG_MODULE}.{CONFIG_CLASS}"},
                  block_configs=[block_config(s, child.arch.num_attention_heads) for s in child.arch.layer_shapes])
    if child.family == "qwen2":
        # Qwen2 biases q/k/v but not o: vLLM's Llama attention takes `qkv_bias` for the first, `attention_bias` for o.
        config.update(attention_bias=False, qkv_bias=True)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:  # also in the older spelling, for a vLLM whose transformers predates rope_parameters
        config["rope_theta"] = rope["rope_theta"]
    return config


def write_decilm(child, out: Path, dtype: str) -> None:
    """Write the DeciLM folder of `child` into the empty folder `out`, tensors in `dtype`."""
    for path in child.folder.iterdir():
        if path.is_file() and path.name != "config.json" and path.name not in _WEIGHTS:
            shutil.copyfile(path, out / path.name)
    _write_weights(child.folder, out, dtype)
    config = decilm_config(child)
    config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(Path(__file__).with_name("decilm_config.py"), out / f"{CONFIG_MODULE}.py")


def _write_weights(folder: Path, out: Path, dtype: str) -> None:
    """The checkpoint's safetensors files under the same names (so its index still holds), tensors in `dtype`:
    copied where they are stored in it already, else cast file by file."""
    import torch
    from safetensors.torch import save_file

    from nas.prune import SafetensorsReader

    reader = SafetensorsReader(folder)
    files: dict[Path, list[str]] = {}
    for name, (path, _, _) in reader.entries.items():
        files.setdefault(path, []).append(name)
    stored = {entry["dtype"] for _, _, entry in reader.entries.values()}
    if stored == {_SAFETENSORS[dtype]}:
        for name in _WEIGHTS:
            if (folder / name).exists():
                shutil.copyfile(folder / name, out / name)
        return
    total = 0
    for path, names in files.items():
        tensors = {name: reader(name).to(getattr(torch, dtype)).contiguous() for name in names}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, out / path.name, metadata={"format": "pt"})
    if (folder / _WEIGHTS[1]).exists():
        index = json.loads((folder / _WEIGHTS[1]).read_text())
        index.setdefault("metadata", {})["total_size"] = total
        (out / _WEIGHTS[1]).write_text(json.dumps(index, indent=2) + "\n")


_SAFETENSORS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
