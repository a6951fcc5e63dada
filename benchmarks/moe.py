"""`nas-bench moe`: a small Qwen3-MoE trained from scratch on the plays (cached): half the experts cut by each
expert score and at random, half the expert width by routed-token neuron scores and at random; held-out loss
zero-shot and after equal-token KD."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from benchmarks.common import RESULTS, trained_from_scratch, zero_shot_and_after_kd
from nas.importance import EXPERT_SCORES, ImportanceSettings, Importances, compute_importance, lm_loss
from nas.prune import PruneOptions, prune


def run(train_tokens: int = 1_000_000, kd_tokens: int = 32_768) -> dict[str, Any]:
    """Expert pruning on a small Qwen3-MoE (4 layers, 8 experts, top-2) trained from scratch on the plays (cached):
    half the experts cut by each expert measure of `nas.importance.EXPERT_SCORES` and at random (3 draws), held-out
    loss zero-shot and after the same KD; then the expert width halved by the routed-token neuron scores against
    random neurons."""
    from transformers import Qwen3MoeConfig

    from nas.families import Parent

    config = Qwen3MoeConfig(vocab_size=2048, hidden_size=128, intermediate_size=384, moe_intermediate_size=128,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
                            output_router_logits=True, router_aux_loss_coef=0.01,
                            pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model, train, held = trained_from_scratch(RESULTS / f"qwen3-moe-from-scratch-{train_tokens}", config,
                                              train_tokens)
    cal = train[:32]
    imp = compute_importance(model, cal, ImportanceSettings(drop_samples=0))
    parent = Parent.of(model.config)
    half = parent.architecture.replace(num_local_experts=4)
    narrow = parent.architecture.replace(moe_intermediate_size=64)
    share = imp.experts["frequency"] / imp.experts["frequency"].sum(1, keepdim=True)

    def evaluated(child, seed: int = 0) -> dict[str, float]:
        return zero_shot_and_after_kd(child, model, train[64:], held, kd_tokens, seed)

    out: dict[str, Any] = {"parent": {"trained_tokens": train_tokens, "heldout_loss": lm_loss(model, held),
                                      "params": parent.num_parameters(), "active_params": parent.active_parameters()},
                           "routing_share_per_layer_min_max": [[float(r.min()), float(r.max())] for r in share],
                           "kd_tokens": kd_tokens, "experts_halved": {"child": half.short(),
                                                                       "active_params": parent.active_parameters(half)}}
    for score in EXPERT_SCORES:
        out["experts_halved"][f"by {score}"] = evaluated(prune(model, imp, half, PruneOptions(expert_score=score)))
    for score in ("output", "weighted"):  # the KD seed's noise: another draw of the training batches
        out["experts_halved"][f"by {score}, KD seed 1"] = evaluated(
            prune(model, imp, half, PruneOptions(expert_score=score)), seed=1)
    out["experts_halved"]["by weighted, pruned experts folded"] = evaluated(
        _folded_experts(prune(model, imp, half), model, imp, 4))
    draws = [evaluated(prune(model, imp.shuffled(seed), half)) for seed in range(3)]
    out["experts_halved"]["random (mean of 3)"] = {k: sum(d[k] for d in draws) / 3 for k in draws[0]}
    out["expert_width_halved"] = {"child": narrow.short(), "by routed-token neurons": evaluated(prune(model, imp, narrow))}
    shuffled = dataclasses.replace(imp, expert_neurons=imp.shuffled(0).expert_neurons)
    out["expert_width_halved"]["random neurons"] = evaluated(prune(model, shuffled, narrow))
    return out


def _folded_experts(child, parent, imp: Importances, kept: int):
    """The folding alternative (not in `prune`: it lost after KD): each pruned expert of the parent is merged into
    the kept expert whose router row is nearest (cosine), as a routing-frequency-weighted average of their weights,
    the way the dense residual heads fold a pruned head into a kept one. Only for children of the parent's expert
    width (the merged experts' neurons line up one to one)."""
    with torch.no_grad():
        for i, (layer, own) in enumerate(zip(parent.model.layers, child.model.layers)):
            scores, freq = imp.experts["weighted"][i], imp.experts["frequency"][i]
            keep = scores.float().topk(kept).indices.sort().values.tolist()
            router = torch.nn.functional.normalize(layer.mlp.gate.weight, dim=-1)
            merged = {k: [(float(freq[k]), k)] for k in keep}
            for p in (e for e in range(len(scores)) if e not in keep):
                nearest = max(keep, key=lambda k: float(router[p] @ router[k]))
                merged[nearest].append((float(freq[p]), p))
            for j, k in enumerate(keep):
                total = sum(f for f, _ in merged[k]) or 1.0
                for name in ("gate_up_proj", "down_proj"):
                    source = getattr(layer.mlp.experts, name)
                    getattr(own.mlp.experts, name)[j] = sum(f * source[e] for f, e in merged[k]) / total
    return child
