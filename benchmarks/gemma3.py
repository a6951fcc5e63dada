"""`nas-bench gemma3`: the second real parent, Gemma 3 270M: importance against random pruning, zero-shot and after
equal-token KD, on held-out WikiText-2 (about 6 minutes)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import HELDOUT, params
from nas.architecture import Architecture
from nas.data import load_tokens
from nas.importance import ImportanceSettings, compute_importance, lm_loss, select_layers
from nas.parents import load_parent
from nas.prune import prune


def run(kd_tokens: int = 2048) -> dict[str, Any]:
    """Zero-shot held-out loss of importance-pruned children of Gemma 3 270M against randomly pruned ones (width
    and depth cuts of the demo space), then the width child of each kind after the same KD budget from the
    parent."""
    import tempfile

    from nas.distill import DistillConfig, Distiller

    torch.manual_seed(0)
    model, tokenizer = load_parent("gemma3-270m", device=torch.device("cpu"))
    cal = load_tokens("shakespeare", tokenizer, 128)[:32]
    held = load_tokens(str(HELDOUT), tokenizer, 128)[:16]
    train = load_tokens("shakespeare", tokenizer, 128)[100:100 + kd_tokens // 128]
    start = time.perf_counter()
    imp = compute_importance(model, cal, ImportanceSettings(drop_samples=0))
    importance_s = time.perf_counter() - start
    full = Architecture.of_config(model.config)
    width = full.replace(intermediate_size=1536, hidden_size=512)  # L18-H4-KV1-M1536-E512 of the demo space
    depth = full.replace(num_hidden_layers=12, layers=select_layers(imp, 12, "bi"))
    both = full.replace(num_attention_heads=2, intermediate_size=1536, num_hidden_layers=14,
                        layers=select_layers(imp, 14, "bi"))
    quality: dict[str, Any] = {"parent": {"params": params(model), "heldout_loss": lm_loss(model, held)}}
    for cut, arch in (("width", width), ("depth (BI)", depth), ("heads+mlp+depth", both)):
        child = prune(model, imp, arch)
        quality[f"{cut}, importance"] = {"params": params(child), "heldout_loss": lm_loss(child, held)}
        if cut != "depth (BI)":  # depth keeps the same layers either way; its random baseline is another method
            losses = [lm_loss(prune(model, imp.shuffled(seed), arch), held) for seed in range(3)]
            quality[f"{cut}, random (mean of 3)"] = {"params": params(child), "heldout_loss": sum(losses) / 3}
    # The alternative to scaling the embeddings by sqrt(parent/child width) (and leaving the final norm alone, as the
    # head is tied): leave the embeddings as they are and rescale the final norm like every other norm.
    plain = prune(model, imp, width)
    factor = (model.config.hidden_size / width.hidden_size) ** 0.5
    with torch.no_grad():
        plain.model.embed_tokens.weight.div_(factor)  # the tied head with it
        plain.model.norm.weight.copy_((1 + plain.model.norm.weight) * factor - 1)
    quality["width, importance, embeddings not rescaled"] = {"params": params(plain),
                                                             "heldout_loss": lm_loss(plain, held)}
    after_kd = {}
    for name, importances in (("importance", imp), ("random", imp.shuffled(0))):
        student = prune(model, importances, width)
        cfg = DistillConfig(tokens=kd_tokens, batch_size=4, lr=1e-4, warmup_steps=2, checkpoint_every=0)
        with tempfile.TemporaryDirectory() as tmp:
            result = Distiller(student, model, train, held[:4], Path(tmp), cfg).run(progress=False, save_model=False)
        after_kd[name] = {"heldout_loss": lm_loss(student, held), "kd_tokens_per_s": result["tokens_per_s"]}
    return {"parent": "gemma3-270m", "calibration_tokens": int(cal.numel()), "heldout_tokens": int(held.numel()),
            "importance_pass_s": importance_s, "zero_shot": quality,
            "after_kd": {"tokens": kd_tokens, "child": width.short(), **after_kd}}
