"""The configuration of a per-layer Llama-style model in the DeciLM layout (model_type "nemotron-nas").

nas writes this file beside a `--format decilm` export, as `configuration_decilm.py`, for vLLM's
`DeciLMForCausalLM`, which reads each layer's shape as attributes: `block_configs[i].attention.no_op`,
`.attention.n_heads_in_group`, `.ffn.no_op`, `.ffn.intermediate_size`. transformers has no class for this model
type, so config.json's `auto_map` names this one. It is a LlamaConfig whose `block_configs` entries are read as
attribute namespaces and written back as plain JSON. It builds no model: vLLM has its own.
"""

from types import SimpleNamespace

from transformers import LlamaConfig


def _namespace(value):
    if isinstance(value, dict):
        return SimpleNamespace(**{key: _namespace(item) for key, item in value.items()})
    return value


def _plain(value):
    if isinstance(value, SimpleNamespace):
        return {key: _plain(item) for key, item in vars(value).items()}
    return value


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [_namespace(block) for block in block_configs or []]
        super().__init__(**kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [_plain(block) for block in self.block_configs]
        return out
