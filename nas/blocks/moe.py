"""Mixture-of-experts unit: a router (`mlp.gate`, or gpt-oss's `mlp.router` with a bias) over experts stored as
stacked tensors (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), with an optional always-on shared expert
and its sigmoid gate (Qwen2-MoE). Its prunable widths are the experts kept per layer, the experts a token takes
(top-k), each expert's MLP width (uniform over experts and layers) and the shared expert's width.

Two stacked layouts exist in transformers 5.24:
- "stacked" (Qwen2/3-MoE, Mixtral, OLMoE): `gate_up_proj` [E, 2I, H], the gate's rows first, then the up rows;
  `down_proj` [E, H, I]; no biases.
- "interleaved" (gpt-oss): `gate_up_proj` [E, H, 2I] with gate and up columns alternating, `down_proj` [E, I, H],
  a bias on each, and on the router; its activation is the experts module's own `_apply_gate` (private: transformers
  has no public per-expert activation; tests/test_moe.py checks each expert computed here against the module's
  own forward).

Pruning keeps whole experts (the router's rows with them, so the kept experts' router logits are unchanged) and,
inside each kept expert, that expert's own best neurons: neurons of different experts are unrelated, so each
expert keeps its own, the same number in every expert.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nas.blocks.mlp import MLP
from nas.errors import UnsupportedModelError

TOP_K = "num_experts_per_tok"
_SHARED = MLP()  # the shared expert is a dense gated MLP


@dataclass(frozen=True)
class MoE:
    """Attributes:
        count_key: the config key of the number of experts (`num_experts` or `num_local_experts`, as the family
            stores it in `config.json`).
        width_key: the config key of an expert's MLP width (`moe_intermediate_size`; Mixtral, OLMoE and gpt-oss
            use `intermediate_size`).
        shared_key: the config key of the shared expert's width, or None when the family has none.
        router: the router's module name inside `mlp`.
        layout: "stacked" or "interleaved" (see the module's docstring).
        stored_experts: how a checkpoint on disk names each expert's gate, up and down projections
            (`mlp.experts.{e}.gate_proj.weight`, ...: transformers stacks them on load and splits them on save);
            None when the checkpoint holds the stacked tensors themselves (gpt-oss).
        stored_block: the block's module name on disk (Mixtral's checkpoints say `block_sparse_moe` for `mlp`).
    """

    count_key: str
    width_key: str = "moe_intermediate_size"
    shared_key: str | None = None
    router: str = "gate"
    layout: str = "stacked"
    stored_experts: tuple[str, str, str] | None = ("gate_proj", "up_proj", "down_proj")
    stored_block: str = "mlp"

    def __post_init__(self) -> None:
        assert self.layout in ("stacked", "interleaved"), self.layout

    @property
    def biased(self) -> bool:
        return self.layout == "interleaved"

    @property
    def keys(self) -> tuple[str, ...]:
        """Its axes that are not the dense architecture's (an expert width called `intermediate_size` is)."""
        keys = (self.count_key, TOP_K, self.width_key, self.shared_key)
        return tuple(k for k in keys if k is not None and k != "intermediate_size")

    def is_sparse(self, config: Any, layer: int) -> bool:
        """Whether the parent's `layer` routes (Qwen-MoE can keep dense MLPs in `mlp_only_layers` and every layer
        whose index + 1 is not a multiple of `decoder_sparse_step`, and is dense throughout without experts)."""
        return getattr(config, self.count_key) > 0 and layer not in (getattr(config, "mlp_only_layers", None) or []) \
            and (layer + 1) % (getattr(config, "decoder_sparse_step", None) or 1) == 0

    def child_layout(self, config: Any, layers: tuple[int, ...]) -> dict[str, Any]:
        """The config entries that make the child's layer j dense or sparse as its parent layer `layers[j]` was."""
        if not hasattr(config, "mlp_only_layers"):
            return {}
        dense = [j for j, i in enumerate(layers) if not self.is_sparse(config, i)]
        return {"mlp_only_layers": dense, "decoder_sparse_step": 1}

    def expert_parameters(self, arch: Any) -> int:
        h, i = arch.hidden_size, arch.get(self.width_key)
        return 3 * h * i + (2 * i + h if self.biased else 0)

    def num_parameters(self, config: Any, arch: Any, active: bool = False) -> int:
        """The layer's MLP: the router, every expert (or, `active`, the top-k a token uses) and the shared expert."""
        h, experts = arch.hidden_size, arch.get(self.count_key)
        used = arch.get(TOP_K) if active else experts
        router = experts * h + (experts if self.biased else 0)
        shared = 0
        if self.shared_key:
            shared = _SHARED.num_parameters(config, _Width(h, arch.get(self.shared_key))) + h  # + its gate [1, H]
        return used * self.expert_parameters(arch) + router + shared

    def axes(self, prefix: str) -> dict[str, tuple[str | None, ...]]:
        """The slice rules of the block at `prefix` ("mlp"): "experts": kept experts; "expert_gate_up" /
        "expert_mlp": [E', n] rows of each kept expert."""
        router = f"{prefix}.{self.router}"
        out = {f"{router}.weight": ("experts", "hidden"), f"{router}.bias": ("experts",)}
        if self.layout == "stacked":
            out.update({f"{prefix}.experts.gate_up_proj": ("experts", "expert_gate_up", "hidden"),
                        f"{prefix}.experts.down_proj": ("experts", "hidden", "expert_mlp")})
        else:
            out.update({f"{prefix}.experts.gate_up_proj": ("experts", "hidden", "expert_gate_up"),
                        f"{prefix}.experts.gate_up_proj_bias": ("experts", "expert_gate_up"),
                        f"{prefix}.experts.down_proj": ("experts", "expert_mlp", "hidden"),
                        f"{prefix}.experts.down_proj_bias": ("experts", "hidden")})
        if self.shared_key:
            out.update(_SHARED.axes(f"{prefix}.shared_expert", "shared_mlp"))
            out[f"{prefix}.shared_expert_gate.weight"] = (None, "hidden")
        return out

    def indices(self, experts: Tensor, neurons: Tensor, parent_width: int,
                shared: Tensor | None = None) -> dict[str, Tensor]:
        """Index sets of one sparse layer.

        Args:
            experts: [E'] kept experts, ascending.
            neurons: [E', I'] each kept expert's kept neurons, ascending.
            parent_width: the parent's expert width I.
            shared: the shared expert's kept neurons.
        """
        if self.layout == "stacked":
            gate_up = torch.cat([neurons, parent_width + neurons], dim=1)
        else:  # gate and up columns alternate: neuron n is columns 2n and 2n + 1
            gate_up = torch.stack([2 * neurons, 2 * neurons + 1], dim=2).flatten(1)
        out = {"experts": experts, "expert_gate_up": gate_up, "expert_mlp": neurons}
        if shared is not None:
            out["shared_mlp"] = shared
        return out

    def expert_forward(self, experts: nn.Module, e: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Expert `e` on its routed tokens `x` [T, H], unweighted: (the gate's pre-activation [T, I], the down
        projection's input [T, I], the output [T, H]), computed as the experts module computes them."""
        if self.layout == "stacked":
            gate, up = nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            hidden = experts.act_fn(gate) * up
            return gate, hidden, nn.functional.linear(hidden, experts.down_proj[e])
        gate_up = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        hidden = experts._apply_gate(gate_up)
        return gate_up[..., ::2], hidden, hidden @ experts.down_proj[e] + experts.down_proj_bias[e]

    def hooks(self, block: nn.Module, record: Callable[[int, Tensor, Tensor, Tensor, Tensor], None]) -> list:
        """Experts are scored on the tokens routed to them: `record(expert, routing weights [T], pre-activation
        [T, I], down input [T, I], output [T, H])` for each expert a forward routes tokens to. This runs each used
        expert once more on its tokens (the experts module computes them all in one call, with no per-expert hook)."""
        experts = block.experts

        def hook(_module, args, kwargs, _out):
            x, index, weights = _routed(experts, args, kwargs)
            with torch.no_grad():
                for e in index.unique().tolist():
                    if e >= experts.num_experts:  # a padding slot some kernels use
                        continue
                    token, slot = torch.where(index == e)
                    record(e, weights[token, slot], *self.expert_forward(experts, e, x[token]))
        return [experts.register_forward_hook(hook, with_kwargs=True)]

    # -- the checkpoint's own names (streamed pruning reads and writes them) --------------------------------
    def _stored(self, name: str) -> tuple[str, str]:
        """(the layer's prefix on disk, the name inside the block) of an in-memory `...layers.i.mlp.<inner>`."""
        head, _, inner = name.partition(".mlp.")
        return f"{head}.{self.stored_block}.", inner

    def read_stored(self, name: str, read, num_experts: int, dtype: torch.dtype) -> Tensor | None:
        """The in-memory tensor `name` of a sparse layer read from a checkpoint (`read(disk name)`, and `disk name
        in read`), stacking the experts' tensors when the checkpoint stores them one by one, and dequantising
        MXFP4 ones (gpt-oss publishes its experts as `_blocks` and `_scales`) to `dtype` as transformers does on
        load; None for a name outside this unit."""
        if ".mlp." not in name:
            return None
        prefix, inner = self._stored(name)
        if f"{prefix}{inner}_blocks" in read:
            # (transformers' own MXFP4 dequantiser, which its loader runs; it has no public one. tests/test_moe.py
            # checks it against the MXFP4 format itself.)
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            return convert_moe_packed_tensors(read(f"{prefix}{inner}_blocks"), read(f"{prefix}{inner}_scales"),
                                              dtype=dtype)
        if self.stored_experts is None or inner not in ("experts.gate_up_proj", "experts.down_proj") or \
                prefix + inner in read:  # (a checkpoint may store the stacked tensors themselves)
            return read(prefix + inner)
        gate, up, down = (f"{prefix}experts.{{}}.{n}.weight" for n in self.stored_experts)
        if inner == "experts.down_proj":
            return torch.stack([read(down.format(e)) for e in range(num_experts)])
        return torch.stack([torch.cat([read(gate.format(e)), read(up.format(e))]) for e in range(num_experts)])

    def stored(self, name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The checkpoint's entries for the in-memory tensor `name` (the inverse of `read_stored`)."""
        if ".mlp." not in name:
            return [(name, tensor)]
        prefix, inner = self._stored(name)
        if self.stored_experts is None or inner not in ("experts.gate_up_proj", "experts.down_proj"):
            return [(prefix + inner, tensor)]
        gate, up, down = (f"{prefix}experts.{{}}.{n}.weight" for n in self.stored_experts)
        if inner == "experts.down_proj":
            return [(down.format(e), t) for e, t in enumerate(tensor)]
        return [entry for e, t in enumerate(tensor) for entry in zip((gate.format(e), up.format(e)), t.chunk(2))]


@dataclass(frozen=True)
class _Width:
    """The two widths a dense MLP's count reads, for the shared expert."""

    hidden_size: int
    intermediate_size: int


#: The parameter names of transformers' experts forward: the routed tokens, the experts each picked and their
#: weights (gpt-oss's own experts forward names the last two otherwise).
_ROUTED = (("hidden_states", "top_k_index", "top_k_weights"), ("hidden_states", "router_indices", "routing_weights"))


def _routed(experts: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens [T, H], the experts each picked [T, k], their weights [T, k]) of a call of `experts`, read by its
    forward's parameter names, so that a reordered forward is read right and a renamed one refused, not misread."""
    bound = inspect.signature(experts.forward).bind(*args, **kwargs).arguments
    for names in _ROUTED:
        if all(name in bound for name in names):
            return tuple(bound[name] for name in names)
    raise UnsupportedModelError(f"{type(experts).__name__}.forward takes ({', '.join(bound)}); nas reads the experts' "
                                f"call by the names ({', '.join(_ROUTED[0])}), which this transformers version changed")
