"""`nas-bench hybrid`: Mamba2 head pruning and depth by layer kind on a small Nemotron-H trained from scratch on the
plays (cached), against random pruning; held-out loss zero-shot and after equal-token KD."""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks.common import RESULTS, trained_from_scratch, zero_shot_and_after_kd
from nas.architecture import Architecture
from nas.importance import ImportanceSettings, compute_importance, lm_loss
from nas.prune import prune
from nas.space import kept_layers


def run(train_tokens: int = 1_000_000, kd_tokens: int = 32_768) -> dict[str, Any]:
    """Mamba2 head pruning and depth on a small Nemotron-H (8 layers: 4 Mamba2, 2 attention, 2 MLP) trained from
    scratch on the plays (cached): half the Mamba heads (2 of 4 in each group) by importance and at random (3
    draws), then half the head width; two layers dropped keeping both attention layers (each kind's best by Block
    Importance, `kept_layers`) against dropping one of them (a child keeps one); held-out loss zero-shot and after the
    same KD."""
    from transformers import AutoConfig

    from nas.families import Parent

    pattern = ["linear_attention", "mlp", "linear_attention", "full_attention", "linear_attention", "mlp",
               "linear_attention", "full_attention"]
    config = AutoConfig.for_model("nemotron_h", vocab_size=2048, hidden_size=128, intermediate_size=384,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, mamba_num_heads=8,
                                  mamba_head_dim=32, n_groups=2, ssm_state_size=32, layers_block_type=pattern,
                                  max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model, train, held = trained_from_scratch(RESULTS / f"nemotron-h-from-scratch-{train_tokens}", config,
                                              train_tokens)
    cal = train[:32]
    imp = compute_importance(model, cal, ImportanceSettings(drop_samples=0))
    parent = Parent.of(model.config)
    full = parent.architecture

    def evaluated(child, seed: int = 0) -> dict[str, float]:
        return zero_shot_and_after_kd(child, model, train[64:], held, kd_tokens, seed)

    def against_random(arch: Architecture, scores: str) -> dict[str, Any]:
        out = {"child": arch.short(), "params": parent.num_parameters(arch),
               "by importance": evaluated(prune(model, imp, arch)),
               # the KD's own noise: another draw of the training batches
               "by importance, KD seed 1": evaluated(prune(model, imp, arch), seed=1)}
        draws = [evaluated(prune(model, dataclasses.replace(imp, **{scores: getattr(imp.shuffled(seed), scores)}),
                                 arch)) for seed in range(3)]
        out["random (mean of 3)"] = {k: sum(d[k] for d in draws) / 3 for k in draws[0]}
        return out

    out: dict[str, Any] = {
        "parent": {"pattern": pattern, "trained_tokens": train_tokens, "heldout_loss": lm_loss(model, held),
                   "params": parent.num_parameters()},
        "kd_tokens": kd_tokens,
        "mamba_heads_halved": against_random(full.replace(mamba_num_heads=4), "mixer_heads"),
        "mamba_head_dim_halved": against_random(full.replace(mamba_head_dim=16), "mixer_channels"),
        "layer_bi": {f"{i} {kind}": round(float(v), 4) for i, (kind, v) in enumerate(zip(pattern, imp.layer_bi))},
    }
    # Two of the 8 layers dropped, each kind keeping its own best by Block Importance (`kept_layers`): both
    # attention layers kept (a Mamba2 and an MLP layer dropped), or one of them dropped with a Mamba2 layer (a
    # child must keep one: HF's hybrid cache needs an attention layer).
    depth = {}
    for name, counts in (("keeping both attention layers", {"full_attention": 2, "linear_attention": 3, "mlp": 1}),
                         ("dropping an attention layer", {"full_attention": 1, "linear_attention": 3, "mlp": 2})):
        layers = kept_layers({f"layers.{k}": n for k, n in counts.items()}, config, imp, "bi")
        arch = full.replace(num_hidden_layers=len(layers), layers=layers)
        depth[name] = {"layers": list(layers), "params": parent.num_parameters(arch),
                       **evaluated(prune(model, imp, arch))}
    out["two_layers_dropped"] = depth
    return out
