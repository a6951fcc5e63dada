"""`nas-bench qk-norm`: OLMo 2's q/k norm over all heads: a small OLMo 2 trained from scratch on the plays (cached),
half its query heads cut, the child as pruned against its q norm rescaled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, trained_from_scratch
from nas.architecture import Architecture
from nas.importance import ImportanceSettings, compute_importance, lm_loss
from nas.prune import prune


def run(train_tokens: int = 2_000_000, kd_tokens: int = 65_536) -> dict[str, Any]:
    """OLMo 2/3 normalise queries (and keys) over all heads at once, so a child with fewer heads divides by the RMS
    of its kept heads instead of all of them. No pretrained OLMo fits this machine, so a small OLMo 2 is trained
    from scratch on the shipped plays (cached under benchmarks/results/); then half its query heads are cut by
    importance, and the child as pruned is compared with one whose q/k norm weights are multiplied by the
    calibration mean of rms(kept heads) / rms(all heads), the correction that restores the parent's statistic on
    average: zero-shot and after the same KD, on held-out plays."""
    import tempfile

    from transformers import Olmo2Config

    from nas.distill import DistillConfig, Distiller
    from nas.prune import head_selection

    config = Olmo2Config(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model, train, held = trained_from_scratch(RESULTS / f"olmo2-from-scratch-{train_tokens}", config, train_tokens)
    cal = train[:32]
    imp = compute_importance(model, cal, ImportanceSettings(drop_samples=0))
    full = Architecture.of_config(model.config)
    arch = full.replace(num_attention_heads=4)  # one query head of each KV pair
    d = full.head_dim
    kept = [torch.cat([(h * d + torch.arange(d)) for h in head_selection(imp.heads[i], arch, 4)[0].tolist()])
            for i in range(full.num_hidden_layers)]
    ratios: list[list[float]] = [[] for _ in kept]

    def hook(i: int):
        def record(_m, _a, out):
            rms = lambda x: x.pow(2).mean(-1).sqrt()  # noqa: E731
            # nanmean: a token whose queries are all zero (the padding id's zero embedding) has no ratio
            ratios[i].append(float(torch.nanmean(rms(out[..., kept[i]]) / rms(out))))
        return record

    handles = [layer.self_attn.q_proj.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=cal)
    for h in handles:
        h.remove()
    q_ratio = [sum(r) / len(r) for r in ratios]
    as_pruned = prune(model, imp, arch)
    corrected = prune(model, imp, arch)
    with torch.no_grad():
        for layer, r in zip(corrected.model.layers, q_ratio):
            layer.self_attn.q_norm.weight.mul_(r)  # keys: every KV head is kept, so their statistic is unchanged
    out: dict[str, Any] = {"parent": {"trained_tokens": train_tokens, "heldout_loss": lm_loss(model, held)},
                           "child": arch.short(), "q_rms_kept_over_all": q_ratio}
    for name, child in (("as pruned", as_pruned), ("q norm rescaled", corrected)):
        zero_shot = lm_loss(child, held)
        cfg = DistillConfig(tokens=kd_tokens, batch_size=8, lr=1e-3, warmup_steps=5, checkpoint_every=0)
        with tempfile.TemporaryDirectory() as tmp:
            Distiller(child, model, train[64:], held[:4], Path(tmp), cfg).run(progress=False, save_model=False)
        out[name] = {"zero_shot": zero_shot, "after_kd": lm_loss(child, held)}
    out["kd_tokens"] = kd_tokens
    return out
