"""Block scores (Puzzle's "replace-1-block" scores, arXiv 2411.19146 §3): how far the parent moves when only one of
its blocks (a layer's attention or MLP) is replaced by a narrower variant or removed.

Each variant is the parent's own block pruned by importance to the variant's width (`nas.prune`, the slices a child
would get), or nothing. It is scored on the calibration tokens as the KL divergence from the parent's next-token
distribution (mean over tokens), with the LM loss beside it. The scores are the costs the assembly program
(`nas.assembly`) minimises.

Cost: the parent runs twice a batch (once to record each layer's inputs and its own output, once layer by layer to
carry the hidden state along), and each variant runs from its layer on, reusing the hidden state before it: about
half a forward a variant on average. What is held: one hidden state of the calibration batch a layer, not logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas.architecture import LayerShape
from nas.families import Parent, logit_map
from nas.importance import Importances, input_device
from nas.prune import prune

BLOCKS = ("attention", "mlp")


@dataclass(frozen=True)
class Variant:
    """Parent layer `layer`'s `block` at `width` (KV heads for attention, neurons for an MLP; 0: removed)."""

    layer: int
    block: str
    width: int

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.block}={self.width or 'none'}"

    def shape(self, parent: Parent) -> LayerShape:
        """The layer's shape with this block replaced and the other block the parent's."""
        full = parent.architecture.uniform_shape
        if self.block == "attention":
            return LayerShape(self.width, full.intermediate_size)
        return LayerShape(full.num_key_value_heads, self.width)


def variants(parent: Parent, kv_heads: list[int], mlp_widths: list[int], removable: bool = True) -> list[Variant]:
    """Every block variant of every parent layer: each KV-head count and MLP width below the parent's, and removal
    (`removable`). The parent's own widths are not variants: they score 0."""
    full = parent.architecture.uniform_shape
    out = []
    for layer in range(parent.architecture.num_hidden_layers):
        for block, widths, own in (("attention", kv_heads, full.num_key_value_heads),
                                   ("mlp", mlp_widths, full.intermediate_size)):
            out += [Variant(layer, block, w) for w in sorted(set(widths), reverse=True) if 0 < w < own]
            if removable:
                out.append(Variant(layer, block, 0))
    return out


def _variant_layer(model: nn.Module, importances: Importances, parent: Parent, variant: Variant) -> nn.Module:
    """The decoder layer a child holds for this variant: a one-layer child of the parent keeping only `layer`,
    pruned to the variant's shape, so its slices (and KV mean-pooling) are exactly a child's."""
    arch = parent.architecture.replace(num_hidden_layers=1, layers=(variant.layer,),
                                       per_layer=(variant.shape(parent),))
    return prune(model, importances, arch).model.layers[0]


@torch.no_grad()
def _recorded(model: nn.Module, tokens: Tensor) -> tuple[list[dict[str, Any]], Tensor, Tensor]:
    """Run the parent on `tokens`: each decoder layer's keyword inputs (mask, positions, rotary embeddings), the
    embedding output (layer 0's input) and the last layer's output (the parent's logits are recomputed from it
    when needed: a vocabulary-wide tensor per token is never held)."""
    layers = model.model.layers
    kwargs: list[dict[str, Any]] = [{} for _ in layers]
    first: list[Tensor] = []
    last: list[Tensor] = []

    def hook(i: int):
        def record(_module, args, kw):
            if i == 0:
                first.append(args[0] if args else kw["hidden_states"])
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
        return record

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(model.model.norm.register_forward_pre_hook(lambda _m, args: last.append(args[0])))
    try:
        model.model(tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return kwargs, first[0], last[0]


def _run(layer: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _logits(model: nn.Module, hidden: Tensor) -> Tensor:
    scale, cap = logit_map(model.config)
    logits = model.lm_head(model.model.norm(hidden)) * scale
    return torch.tanh(logits / cap) * cap if cap else logits


def _kl_and_loss(parent_logits: Tensor, logits: Tensor, tokens: Tensor) -> tuple[float, float, int]:
    """Summed KL(parent || variant) over the positions, summed next-token loss, and the positions' count."""
    p = F.log_softmax(parent_logits.float(), -1)
    q = F.log_softmax(logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    loss = F.cross_entropy(q[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    return float(kl.sum()), float(loss), kl.numel()


def _batches(tokens: Tensor, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, len(tokens), batch_size):
        yield tokens[start:start + batch_size]


@torch.no_grad()
def block_scores(model: nn.Module, importances: Importances, tokens: Tensor, chosen: list[Variant],
                 batch_size: int = 4) -> dict[str, dict[str, float]]:
    """{variant name: {"kl": mean KL to the parent a token, "lm_loss": mean next-token loss}} on `tokens`.

    Args:
        model: the parent (a dense family nas can cut per layer; left untouched).
        importances: its importances (which heads and neurons a narrower variant keeps).
        tokens: [N, T] calibration sequences.
        chosen: the variants to score (`variants`).
    """
    parent = Parent.of(model.config)
    model.eval()
    device = input_device(model)
    by_layer: dict[int, list[Variant]] = {}
    for v in chosen:
        by_layer.setdefault(v.layer, []).append(v)
    batches = [b.to(device) for b in _batches(tokens, batch_size)]
    records = [_recorded(model, b) for b in batches]
    hidden = [first for _, first, _ in records]  # each batch's input to the current layer
    sums = {v.name: [0.0, 0.0, 0] for v in chosen}
    layers = model.model.layers
    for i, layer in enumerate(layers):
        built = {v.name: _variant_layer(model, importances, parent, v) for v in by_layer.get(i, [])}
        for b, (kwargs, _, parent_last) in enumerate(records):
            parent_logits = _logits(model, parent_last) if built else None
            for name, variant_layer in built.items():
                h = _run(variant_layer, hidden[b], kwargs[i])
                for j in range(i + 1, len(layers)):
                    h = _run(layers[j], h, kwargs[j])
                for k, value in enumerate(_kl_and_loss(parent_logits, _logits(model, h), batches[b])):
                    sums[name][k] += value
            hidden[b] = _run(layer, hidden[b], kwargs[i])
    return {name: {"kl": kl / n, "lm_loss": loss / (n - n // tokens.shape[1])} for name, (kl, loss, n) in sums.items()}
