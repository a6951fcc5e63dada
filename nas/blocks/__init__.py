"""Block units: the parts a decoder layer is made of, each written once.

A unit knows, for the module at a path inside a decoder layer (`self_attn`, `mlp`, Nemotron-H's `mixer`, a norm):
- its prunable widths, as the HF config keys of `Architecture` (`num_attention_heads`, `intermediate_size`, ...;
  a unit's own, such as the experts kept, are `Architecture.unit_axes`);
- `num_parameters(config, arch)`: its exact parameter count in a child;
- `axes(path)`: for each of its parameters (by name inside the layer), which kept-index set each dimension is
  sliced by ("hidden": residual channels; "q"/"kv": rows of kept query/KV heads; "mlp": neurons; None: whole),
  shared by in-memory `prune` and streamed `prune_checkpoint`;
- `indices(...)`: the kept-index sets it adds (fused projections need composite rows);
- `hooks(module, record)`: where importance reads its activations.

A model family (`nas.families`) is then data: which units a layer holds, which norms sit where, and the quirks
of its embeddings and logits.
"""

from nas.blocks.attention import Attention
from nas.blocks.deltanet import GatedDeltaNet
from nas.blocks.mamba import Mamba2
from nas.blocks.mlp import MLP
from nas.blocks.moe import MoE
from nas.blocks.norm import Norm

__all__ = ["MLP", "Attention", "GatedDeltaNet", "Mamba2", "MoE", "Norm"]
