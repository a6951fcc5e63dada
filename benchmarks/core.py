"""`nas-bench core`: importance overhead, prune time, and zero-shot held-out loss of pruning strategies at ~2/3 of
SmolLM2-135M's parameters (width: ours and its variants, random and weight-magnitude importance; depth by BI, by
loss-when-dropped and by contiguous block)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from benchmarks.common import DEPTH_2_3, WIDTH_2_3, params, setup, timed
from nas.architecture import Architecture
from nas.importance import ImportanceSettings, Importances, compute_importance, lm_loss, select_layers
from nas.prune import PruneOptions, prune


def magnitude_importances(model, like: Importances) -> Importances:
    """Weight-magnitude scores: a data-free baseline (row/column norms of the weights)."""
    d = model.config.head_dim
    layers = model.model.layers
    heads = torch.stack([l.self_attn.o_proj.weight.detach().unflatten(1, (-1, d)).norm(dim=(0, 2)) for l in layers])
    neurons = torch.stack([(l.mlp.gate_proj.weight.detach().norm(dim=1) * l.mlp.down_proj.weight.detach().norm(dim=0))
                           for l in layers])
    hidden = model.model.embed_tokens.weight.detach().norm(dim=0)
    return dataclasses.replace(like, hidden=hidden, heads=heads, neurons=neurons)


def run() -> dict[str, Any]:
    model, _, cal, held = setup()
    settings = ImportanceSettings(drop_samples=0)
    with torch.no_grad():
        forward_s, _ = timed(lambda: [model(input_ids=b, use_cache=False) for b in cal.split(8)], repeat=2)
    importance_s, imp = timed(lambda: compute_importance(model, cal, settings), repeat=2)
    drop_settings = ImportanceSettings(drop_samples=4, block_sizes=(30 - DEPTH_2_3,))
    drop_s, drops = timed(lambda: compute_importance(model, cal[:4], drop_settings))
    imp = dataclasses.replace(imp, block_loss=drops.block_loss)
    full = Architecture.of_config(model.config)
    width = full.replace(**WIDTH_2_3)
    prune_s, _ = timed(lambda: prune(model, imp, width), repeat=3)
    rows = {"parent": (model, params(model))}

    def add(name: str, importances: Importances, arch: Architecture, options: PruneOptions = PruneOptions()):
        child = prune(model, importances, arch, options)
        rows[name] = (child, params(child))

    add("width (ours)", imp, width)
    add("width, no norm rescale", imp, width, PruneOptions(rescale_norms=False))
    add("width, no residual heads", imp, width, PruneOptions(residual_heads=False))
    add("width, paper head metric", compute_importance(model, cal, dataclasses.replace(settings, head_source="attn")),
        width)
    for seed in range(3):
        add(f"width, random importance #{seed}", imp.shuffled(seed), width)
    add("width, weight magnitude", magnitude_importances(model, imp), width)
    for method in ("bi", "drop", "block"):
        layers = select_layers(imp, DEPTH_2_3, method)
        add(f"depth by {method}", imp, full.replace(num_hidden_layers=DEPTH_2_3, layers=layers))
    quality = {name: {"params": n, "share": n / rows["parent"][1], "heldout_loss": lm_loss(m, held)}
               for name, (m, n) in rows.items()}
    random_losses = [v["heldout_loss"] for k, v in quality.items() if k.startswith("width, random")]
    return {
        "importance_pass_s": importance_s, "plain_forward_s": forward_s,
        "importance_over_forward": importance_s / forward_s, "goal_importance_over_forward": 1.10,
        "calibration_tokens": int(cal.numel()), "drop_and_block_losses_s": drop_s, "prune_s": prune_s,
        "heldout_tokens": int(held.numel()), "quality": quality,
        "random_importance_mean_loss": sum(random_losses) / len(random_losses),
    }
