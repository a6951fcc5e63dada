"""Benchmarks (not tests): speed and quality figures on SmolLM2-135M (and Gemma 3 270M), written to JSON and printed as a table.

    nas-bench core      importance overhead, prune time, zero-shot held-out loss of pruning strategies
    nas-bench distill   KD vs CE recovery, step-time ratios, teacher top-K cost, peak memory of the chunked
                        loss, 1 vs 2 Ray Train workers
    nas-bench search    demo search wall time, Ray/Optuna overhead vs a plain loop, ASHA vs exhaustive
    nas-bench tokens    tokenising a generated corpus of >= 100M tokens into shards: peak memory, speed; random
                        sequence reads from the shards
    nas-bench fidelity  ranking stability over KD budgets, width vs depth, KD vs CE vs random init, our
                        departures from the paper, ASHA (about an hour on 2 cores; resumable); writes
                        benchmarks/FIDELITY.md
    nas-bench validation  the demo search's own ranking: its candidates after the short retrain against a 4x
                        longer one, with 8..128 validation sequences of its split (resumable)
    nas-bench gemma3    the second real parent, Gemma 3 270M: importance against random pruning, zero-shot and
                        after equal-token KD, on held-out WikiText-2 (about 6 minutes)
    nas-bench qk-norm   OLMo 2's q/k norm over all heads: a small OLMo 2 trained from scratch on the plays
                        (cached), half its query heads cut, the child as pruned against its q norm rescaled
    nas-bench moe       a small Qwen3-MoE trained from scratch on the plays (cached): half the experts cut by
                        each expert score and at random, half the expert width by routed-token neuron scores
                        and at random; held-out loss zero-shot and after equal-token KD
    nas-bench speed     the demo's candidates timed on this machine (decode latency, prefill, throughput: batch 1
                        after 512 tokens, batch 8 after 128) and ranked against their parameter counts
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from nas.architecture import Architecture
from nas.data import load_tokens
from nas.files import atomic_dir, write_json
from nas.importance import EXPERT_SCORES, ImportanceSettings, Importances, compute_importance, lm_loss, select_layers
from nas.parents import load_parent
from nas.prune import PruneOptions, prune
from nas.space import kept_layers

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "data" / "wikitext-2" / "test.txt"  # shipped excerpt (data/README.md); never trained on
RESULTS = ROOT / "benchmarks" / "results"
WIDTH_2_3 = dict(num_attention_heads=6, intermediate_size=768)  # 88.1M of 134.5M parameters (65.5%)
DEPTH_2_3 = 17  # layers kept: 88.5M parameters (65.8%)


def _timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _setup(calibration: int = 32, heldout: int = 16):
    torch.manual_seed(0)
    model, tokenizer = load_parent("smollm2-135m", device=torch.device("cpu"))
    cal = load_tokens("shakespeare", tokenizer, 128)[:calibration]
    held = load_tokens(str(HELDOUT), tokenizer, 128)[:heldout]
    return model, tokenizer, cal, held


_LOSS_PEAK = """
import sys, torch
from nas import losses

def status(key):  # kB, from the kernel's accounting of this process
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

chunk, tokens, vocab, dim = map(int, sys.argv[1:])
g = torch.Generator().manual_seed(0)
hidden = torch.randn(1, tokens, dim, generator=g, requires_grad=True)
head = torch.randn(vocab, dim, generator=g, requires_grad=True)
teacher_hidden, teacher_head = torch.randn(1, tokens, dim, generator=g), torch.randn(vocab, dim, generator=g)
mask = torch.ones(1, tokens, dtype=torch.bool)
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
before = status("VmRSS:")
if chunk:
    targets = losses.LogitTargets(teacher_hidden=teacher_hidden, teacher_head=teacher_head)
    losses.logit_losses(hidden, head, mask, targets, chunk)["loss"].backward()
else:  # the unchunked way: both models' full logits, then the loss
    losses.forward_kl(hidden @ head.T, teacher_hidden @ teacher_head.T, mask).backward()
print(status("VmHWM:") - before)
"""


def loss_peak_kib(chunk_tokens: int, tokens: int = 2048, vocab: int = 32768, dim: int = 64) -> int:
    """Peak resident memory (KiB) of a forward-KL loss and its backward over `tokens` tokens, in a fresh process
    (Linux): chunked by `chunk_tokens` (`nas.losses.logit_losses`), or unchunked full logits when 0."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _LOSS_PEAK, *map(str, (chunk_tokens, tokens, vocab, dim))],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def magnitude_importances(model, like: Importances) -> Importances:
    """Weight-magnitude scores: a data-free baseline (row/column norms of the weights)."""
    d = model.config.head_dim
    layers = model.model.layers
    heads = torch.stack([l.self_attn.o_proj.weight.detach().unflatten(1, (-1, d)).norm(dim=(0, 2)) for l in layers])
    neurons = torch.stack([(l.mlp.gate_proj.weight.detach().norm(dim=1) * l.mlp.down_proj.weight.detach().norm(dim=0))
                           for l in layers])
    hidden = model.model.embed_tokens.weight.detach().norm(dim=0)
    return dataclasses.replace(like, hidden=hidden, heads=heads, neurons=neurons)


def bench_core() -> dict[str, Any]:
    model, _, cal, held = _setup()
    settings = ImportanceSettings(drop_samples=0)
    with torch.no_grad():
        forward_s, _ = _timed(lambda: [model(input_ids=b, use_cache=False) for b in cal.split(8)], repeat=2)
    importance_s, imp = _timed(lambda: compute_importance(model, cal, settings), repeat=2)
    drop_settings = ImportanceSettings(drop_samples=4, block_sizes=(30 - DEPTH_2_3,))
    drop_s, drops = _timed(lambda: compute_importance(model, cal[:4], drop_settings))
    imp = dataclasses.replace(imp, block_loss=drops.block_loss)
    full = Architecture.of_config(model.config)
    width = full.replace(**WIDTH_2_3)
    prune_s, _ = _timed(lambda: prune(model, imp, width), repeat=3)
    rows = {"parent": (model, _params(model))}

    def add(name: str, importances: Importances, arch: Architecture, options: PruneOptions = PruneOptions()):
        child = prune(model, importances, arch, options)
        rows[name] = (child, _params(child))

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


def bench_gemma3(kd_tokens: int = 2048) -> dict[str, Any]:
    """The second real parent, Gemma 3 270M: zero-shot held-out loss of importance-pruned children against
    randomly pruned ones (width and depth cuts of the demo space), then the width child of each kind after the same
    KD budget from the parent."""
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
    quality: dict[str, Any] = {"parent": {"params": _params(model), "heldout_loss": lm_loss(model, held)}}
    for cut, arch in (("width", width), ("depth (BI)", depth), ("heads+mlp+depth", both)):
        child = prune(model, imp, arch)
        quality[f"{cut}, importance"] = {"params": _params(child), "heldout_loss": lm_loss(child, held)}
        if cut != "depth (BI)":  # depth keeps the same layers either way; its random baseline is another method
            losses = [lm_loss(prune(model, imp.shuffled(seed), arch), held) for seed in range(3)]
            quality[f"{cut}, random (mean of 3)"] = {"params": _params(child), "heldout_loss": sum(losses) / 3}
    # The alternative to scaling the embeddings by sqrt(parent/child width) (and leaving the final norm alone, as the
    # head is tied): leave the embeddings as they are and rescale the final norm like every other norm.
    plain = prune(model, imp, width)
    factor = (model.config.hidden_size / width.hidden_size) ** 0.5
    with torch.no_grad():
        plain.model.embed_tokens.weight.div_(factor)  # the tied head with it
        plain.model.norm.weight.copy_((1 + plain.model.norm.weight) * factor - 1)
    quality["width, importance, embeddings not rescaled"] = {"params": _params(plain),
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


def trained_from_scratch(folder: Path, config, train_tokens: int):
    """(model, training sequences, 64 held-out sequences) of a small model of `config` trained from scratch on the
    shipped plays with plain next-token CE (and the router's load-balancing loss when the config asks for it),
    with a 2,048-entry byte-level BPE learnt from the same text; cached in `folder` (no small pretrained checkpoint
    of these families fits here)."""
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from nas.data import iter_texts, split
    from nas.distill import DistillConfig, Distiller

    torch.manual_seed(0)
    if not (folder / "model.safetensors").exists():
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.train_from_iterator(iter_texts("shakespeare"), trainers.BpeTrainer(
            vocab_size=config.vocab_size, special_tokens=["<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
        train, _ = split(load_tokens("shakespeare", tokenizer, 128), 0.05)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        cfg = DistillConfig(tokens=train_tokens, batch_size=16, lr=3e-3, warmup_steps=50, kd="none", ce_weight=1.0,
                            checkpoint_every=0, weight_decay=0.01)
        with tempfile.TemporaryDirectory() as tmp:
            Distiller(model, None, train, train[:8], Path(tmp), cfg).run(progress=False, save_model=False)
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    train, held = split(load_tokens("shakespeare", tokenizer, 128), 0.05)
    return model, train, held[:64]


def zero_shot_and_after_kd(child, teacher, train: torch.Tensor, held: torch.Tensor, kd_tokens: int,
                           seed: int = 0) -> dict[str, float]:
    """A pruned child's held-out loss as it is, then after `kd_tokens` of KD from `teacher` (the child is trained in
    place)."""
    import tempfile

    from nas.distill import DistillConfig, Distiller

    zero_shot = lm_loss(child, held)
    cfg = DistillConfig(tokens=kd_tokens, batch_size=8, lr=1e-3, warmup_steps=5, checkpoint_every=0, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        Distiller(child, teacher, train, held[:4], Path(tmp), cfg).run(progress=False, save_model=False)
    return {"zero_shot": zero_shot, "after_kd": lm_loss(child, held)}


def bench_moe(train_tokens: int = 1_000_000, kd_tokens: int = 32_768) -> dict[str, Any]:
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


def bench_hybrid(train_tokens: int = 1_000_000, kd_tokens: int = 32_768) -> dict[str, Any]:
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


def bench_speed(settings: tuple[tuple[int, int], ...] = ((512, 1), (128, 8))) -> dict[str, Any]:
    """The demo space's candidates (and the parent) timed on this machine as a speed budget times them
    (`nas.latency.measure`: a random model of each shape, HF generate with a static cache), ranked by decode latency
    and by parameter count: where the two orders disagree, and what depth and width cuts buy at equal size."""
    from nas.families import Parent
    from nas.fidelity import kendall_tau
    from nas.latency import SpeedSettings, measure
    from nas.parents import parent_config
    from nas.space import architecture_of, enumerate_candidates, load_space

    space = load_space(ROOT / "search_spaces" / "smollm2-135m-demo.yaml")
    config = parent_config(space.parent)
    parent = Parent.of(config)
    rows = enumerate_candidates(space, config)
    shapes = {"parent": (parent.num_parameters(), config.to_dict())}
    for r in rows:
        arch = architecture_of(r, config, tuple(range(r["num_hidden_layers"])))
        shapes[r["label"]] = (r["params"], parent.child_config(arch).to_dict())
    out: dict[str, Any] = {"decode_tokens": 16, "repeats": 5}
    for context, batch in settings:
        timing = SpeedSettings("cpu", "float32", context, batch, decode_tokens=16, warmup=1, repeats=5,
                               threads=torch.get_num_threads())
        timed = {label: {"params": n, **measure(shape, timing)} for label, (n, shape) in shapes.items()}
        base = timed["parent"]["latency_ms"]
        figures = {label: {"params": t["params"], "latency_ms": t["latency_ms"], "spread": t["latency_ms_spread"],
                           "prefill_ms": t["prefill_ms"], "throughput": t["throughput"],
                           "speedup_vs_parent": base / t["latency_ms"]} for label, t in timed.items()}
        labels = [r["label"] for r in rows]
        by_latency = sorted(labels, key=lambda k: figures[k]["latency_ms"])
        by_params = sorted(labels, key=lambda k: figures[k]["params"])
        # Pairs the two orders rank differently: the smaller candidate is the slower one.
        disagree = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]
                    if (figures[a]["params"] - figures[b]["params"]) * (figures[a]["latency_ms"] -
                                                                         figures[b]["latency_ms"]) < 0]
        out[f"batch {batch} after {context} tokens"] = {
            "device": timed["parent"]["device_name"], "candidates": figures,
            "kendall_tau_latency_vs_params": kendall_tau([figures[k]["latency_ms"] for k in labels],
                                                         [figures[k]["params"] for k in labels]),
            "fastest_first": by_latency, "smallest_first": by_params,
            "pairs_where_the_smaller_is_slower": [f"{a} vs {b}" for a, b in disagree]}
    return out


def bench_qk_norm(train_tokens: int = 2_000_000, kd_tokens: int = 65_536) -> dict[str, Any]:
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


def _child(model, cal):
    imp = compute_importance(model, cal, ImportanceSettings(drop_samples=0))
    return prune(model, imp, Architecture.of_config(model.config).replace(**WIDTH_2_3)).float()


def bench_distill(tokens: int = 4096) -> dict[str, Any]:
    from nas.distill import DistillConfig, Distiller
    from nas.losses import forward_kl, topk_forward_kl
    from nas.teacher_cache import compute_topk
    import tempfile

    model, _, cal, held = _setup()
    train = load_tokens("shakespeare", load_parent("smollm2-135m", torch.device("cpu"))[1], 128)[100:]
    out: dict[str, Any] = {"train_tokens": tokens}
    base = lm_loss(_child(model, cal), held)
    out["heldout_before"] = base
    for name, cfg, teacher in [
        ("kd", DistillConfig(tokens=tokens, batch_size=4, lr=1e-4, checkpoint_every=0), model),
        ("ce", DistillConfig(tokens=tokens, batch_size=4, lr=1e-4, checkpoint_every=0, kd="none", ce_weight=1.0),
         None),
    ]:
        student = _child(model, cal)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = Distiller(student, teacher, train, held[:4], Path(tmp), cfg).run(progress=False, save_model=False)
        out[f"{name}_heldout_after"] = lm_loss(student, held)
        out[f"{name}_wall_s"] = time.perf_counter() - start
        out[f"{name}_tokens_per_s"] = result["tokens_per_s"]

    # Step times of the same student on the same batch: online KD, cached KD, CE, teacher forward alone.
    batch = train[:4]
    topk = compute_topk(model, batch, 64)
    idx = torch.arange(4)

    scratch = tempfile.TemporaryDirectory()

    def stepper(cfg: DistillConfig, teacher, cache=None) -> Callable[[], None]:
        d = Distiller(_child(model, cal), teacher, batch, batch, Path(scratch.name), cfg, teacher_topk=cache)

        def once() -> None:
            d.loss(idx)["loss"].backward()
            d.optimizer.step()
            d.optimizer.zero_grad()
        once()  # warm-up
        return once

    def teacher_forward() -> None:
        with torch.no_grad():
            model(input_ids=batch, use_cache=False)

    kd_cfg = DistillConfig(tokens=512, batch_size=4, checkpoint_every=0)
    ce_cfg = dataclasses.replace(kd_cfg, kd="none", ce_weight=1.0)
    runs = {"kd_online": stepper(kd_cfg, model), "kd_cached_top64": stepper(kd_cfg, model, topk),
            "ce": stepper(ce_cfg, None), "teacher_forward": teacher_forward}
    # Interleaved, best of 5 each: a drift of the machine's speed over the measurement hits every kind alike.
    best = {name: float("inf") for name in runs}
    for _ in range(5):
        for name, fn in runs.items():
            best[name] = min(best[name], _timed(fn)[0])
    scratch.cleanup()
    out["step_s"] = best
    s = out["step_s"]
    out["kd_online_over_teacher_plus_ce"] = s["kd_online"] / (s["teacher_forward"] + s["ce"])
    out["kd_cached_over_ce"] = s["kd_cached_top64"] / s["ce"]
    out["goals"] = {"kd_online_over_teacher_plus_ce": 1.10, "kd_cached_over_ce": 1.10}

    # The loss's own memory at SmolLM2's vocabulary and width, 4 x 128 tokens a micro-batch.
    vocab, dim = model.config.vocab_size, model.config.hidden_size
    peaks = {str(c): loss_peak_kib(c, 512, vocab, dim) / 1024 for c in (0, 512, 128, 32)}
    out["loss_peak_mib"] = {"tokens": 512, "vocab": vocab, "unchunked": peaks["0"],
                            **{f"chunk_{c}": peaks[str(c)] for c in (512, 128, 32)}}
    out["workers"] = _bench_workers(model, cal, tokens=2048)

    # Quality cost of a smaller K: relative error of the cached KD loss against the exact one.
    student = _child(model, cal)
    sample = held[:4]
    with torch.no_grad():
        s_logits, t_logits = student(input_ids=sample).logits, model(input_ids=sample).logits
        mask = torch.ones(sample.shape, dtype=torch.bool)
        exact = float(forward_kl(s_logits, t_logits, mask))
        topk_error = {}
        for k in (8, 64, 512, 4096):
            cache = compute_topk(model, sample, k)
            approx = float(topk_forward_kl(s_logits, cache.logprobs, cache.index, mask))
            topk_error[k] = {"kd": approx, "relative_error": abs(approx - exact) / exact,
                             "bytes_per_token": k * 6}
    out["kd_exact"] = exact
    out["topk"] = topk_error
    return out


def _bench_workers(model, cal, tokens: int) -> dict[str, Any]:
    """`nas distill` of the same SmolLM2 child by 1 worker (this process) and by 2 Ray Train workers (FSDP2)."""
    import tempfile

    from nas.cli import main as nas

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        _child(model, cal).save_pretrained(Path(tmp) / "child")
        args = ["distill", "--student", f"{tmp}/child", "--data", "shakespeare", "--seq-len", "128", "--tokens",
                str(tokens), "--batch-size", "2", "--checkpoint-every", "0", "--val-fraction", "0.002", "--quiet"]
        for n in (1, 2):
            start = time.perf_counter()
            assert nas([*args, "--out", f"{tmp}/w{n}", "--workers", str(n)]) == 0
            result = json.loads(Path(f"{tmp}/w{n}/result.json").read_text())
            out[f"workers_{n}"] = {"tokens_per_s": result["tokens_per_s"], "wall_s": time.perf_counter() - start,
                                   "param_optim_mib_per_worker": result["param_optim_bytes_per_worker"] / 2**20,
                                   "val_loss": result["val_loss"]}
    import ray

    ray.shutdown()
    return out


def bench_plan(steps: int = 3) -> dict[str, Any]:
    """`nas plan`'s memory per worker against the peak measured in real CPU runs: `nas distill` (online teacher,
    the demo's batch and sequence) of the demo space's largest candidate, on 1 and on 2 Ray Train workers, each in a
    fresh process; measured = a worker's peak resident set above what it held before building its models."""
    import subprocess
    import tempfile

    from transformers import AutoConfig

    from nas.parents import resolve_parent
    from nas.plan import retrain_stage
    from nas.space import RetrainSpec, architecture_of, enumerate_candidates, load_space

    space = load_space(ROOT / "search_spaces" / "smollm2-135m-demo.yaml")
    model, _, cal, _ = _setup()
    row = enumerate_candidates(space, model.config)[0]
    arch = architecture_of(row, model.config, tuple(range(int(row["num_hidden_layers"]))))
    imp = compute_importance(model, cal, ImportanceSettings(drop_samples=0))
    out: dict[str, Any] = {"candidate": row["label"], "batch_size": 4, "seq_len": space.seq_len}
    with tempfile.TemporaryDirectory() as tmp:
        prune(model, imp, arch).float().save_pretrained(Path(tmp) / "child")
        del model
        for workers in (1, 2):
            tokens = 4 * space.seq_len * steps
            subprocess.run([sys.executable, "-m", "nas.cli", "distill", "--student", f"{tmp}/child", "--data",
                            "shakespeare", "--seq-len", str(space.seq_len), "--tokens", str(tokens), "--batch-size", "4",
                            "--checkpoint-every", "0", "--val-fraction", "0.002", "--quiet", "--out",
                            f"{tmp}/w{workers}", "--workers", str(workers)], check=True)
            measured = json.loads(Path(f"{tmp}/w{workers}/result.json").read_text())["peak_memory_bytes_per_worker"]
            child = AutoConfig.from_pretrained(Path(tmp) / "child")
            stage = retrain_stage("distill", space, AutoConfig.from_pretrained(resolve_parent(space.parent)), child,
                                  workers, 0, False, RetrainSpec(tokens=tokens, batch_size=4), cached=False, runs=1)
            out[f"workers_{workers}"] = {"planned_mib": stage.peak / 2**20, "measured_mib": measured / 2**20,
                                         "planned_over_measured": stage.peak / measured,
                                         "planned_parts_mib": {k: v / 2**20 for k, v in stage.memory.items()}}
    return out


def bench_search() -> dict[str, Any]:
    import optuna

    from nas.search import prepare, replay_trial, run_search, storage_url
    from nas.space import load_space

    space = load_space(ROOT / "search_spaces" / "smollm2-135m-demo.yaml")
    root = RESULTS / "search-trials"
    out: dict[str, Any] = {}
    start = time.perf_counter()
    frame = run_search(space, root)
    out["demo_wall_s"] = time.perf_counter() - start
    done = frame[frame["state"] == "COMPLETE"]
    out["trials"] = int(len(done))
    out["ray_trial_wall_s"] = float(done["wall_s"].sum())
    study = optuna.load_study(study_name=space.study, storage=storage_url(space, root))
    out["ray_trial_durations_s"] = float(sum(t.duration.total_seconds() for t in study.trials if t.duration))
    out["exhaustive_winner"] = done.loc[done["val_loss"].idxmin(), "label"]

    shared = prepare(space, RESULTS / "plain-loop")
    plain = []
    for label in shared.rows:
        t0 = time.perf_counter()
        replay_trial(shared, label)
        plain.append(time.perf_counter() - t0)
    out["plain_loop_trial_s"] = sum(plain)
    out["ray_overhead_per_trial_s"] = (out["ray_trial_durations_s"] - sum(plain)) / len(plain)
    out["ray_overhead_share"] = out["ray_trial_durations_s"] / sum(plain) - 1

    asha = dataclasses.replace(space, name="smollm2-135m-demo-asha",
                               search=dataclasses.replace(space.search, asha=True),
                               short_retrain=dataclasses.replace(space.short_retrain, reports=4), promote=0)
    start = time.perf_counter()
    asha_frame = run_search(asha, root)
    out["asha_wall_s"] = time.perf_counter() - start
    asha_done = asha_frame[asha_frame["state"] == "COMPLETE"]
    out["asha_winner"] = asha_done.loc[asha_done["val_loss"].idxmin(), "label"]
    asha_tokens = 0
    stopped = asha_frame["note"].fillna("").str.startswith("stopped by ASHA")
    for label in asha_frame[(asha_frame["state"] == "COMPLETE") | stopped]["label"]:
        metrics = (root / asha.study / label / "metrics.jsonl").read_text().splitlines()
        asha_tokens += max(json.loads(line).get("tokens", 0) for line in metrics)
    out["asha_retrain_tokens"] = asha_tokens
    out["exhaustive_retrain_tokens"] = int(done["tokens"].fillna(0).sum()) or \
        len(done) * space.short_retrain.tokens
    out["same_winner"] = out["asha_winner"] == out["exhaustive_winner"]
    out["goal_ray_overhead_share"] = 0.10
    return out


_TOKENIZE = """
import json, sys, time
from transformers import AutoTokenizer
from nas.data import tokenize
from nas.parents import resolve_parent

def status(key):  # kB, from the kernel's accounting of this process
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

source, out = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(resolve_parent("smollm2-135m"))
start = time.perf_counter()
tokens = tokenize(source, tokenizer, 2048, out)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": status("VmHWM:") / 1024,
                  "tokens": tokens.index["tokens"], "shards": len(tokens.index["shard_rows"])}))
"""


def bench_tokens(target_tokens: int = 100_000_000) -> dict[str, Any]:
    """A generated JSONL corpus (words drawn from the shipped WikiText-2 excerpt) of about `target_tokens`
    SmolLM2 tokens, tokenised into shards in a fresh process; then random reads from the shards."""
    import subprocess
    import tempfile

    import numpy as np

    from nas.tokens import TokenSet

    words = np.array((ROOT / "data" / "wikitext-2" / "valid.txt").read_text().split())
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        start = time.perf_counter()
        chars = 0
        with corpus.open("w") as f:
            while chars < target_tokens * 4.6:  # about 4.6 characters a token for SmolLM2 on this text
                for _ in range(1000):
                    doc = " ".join(words[rng.integers(0, len(words), 400)])
                    f.write(json.dumps({"text": doc}) + "\n")
                    chars += len(doc)
        out["corpus_mib"] = corpus.stat().st_size / 2**20
        out["corpus_write_s"] = time.perf_counter() - start
        result = subprocess.run([sys.executable, "-c", _TOKENIZE, str(corpus), f"{tmp}/shards"],
                                capture_output=True, text=True, check=True)
        made = json.loads(result.stdout.splitlines()[-1])
        out["tokenize"] = {**made, "tokens_per_s": made["tokens"] / made["seconds"]}
        tokens = TokenSet(f"{tmp}/shards")
        rows = torch.from_numpy(rng.integers(0, len(tokens), 20_000))
        start = time.perf_counter()
        for batch in rows.split(8):  # a training loop's reads: 8 random sequences at a time
            tokens[batch]
        seconds = time.perf_counter() - start
        out["random_read"] = {"sequences": len(rows), "seq_len": tokens.seq_len,
                              "tokens_per_s": len(rows) * tokens.seq_len / seconds}
    out["goals"] = {"tokenize_peak_rss_mib": 2048, "random_read_tokens_per_s": 1_000_000}
    return out


def _machine() -> dict[str, Any]:
    return {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.is_available(), "processor": platform.processor() or platform.machine()}


def bench_fidelity(path: Path) -> int:
    """Runs every arm (resuming from `path`), then writes benchmarks/FIDELITY.md and its plots."""
    from nas.fidelity import Fidelity, smollm2_plan, write_report

    fid = Fidelity(smollm2_plan(ROOT), path, log=lambda line: print(line, flush=True))
    summary = fid.run_all()
    m = _machine()
    machine = f"{m['cpu_threads']} CPU threads ({m['processor']}), torch {m['torch']}, no GPU" if not m["cuda"] else \
        f"CUDA, torch {m['torch']}"
    report = write_report(fid, summary, ROOT / "benchmarks", "nas-bench fidelity", machine)
    write_json(path.with_name("fidelity-summary.json"), summary)
    print(f"-> {path}, {report}")
    return 0


def per_sequence_loss(model, val: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Each validation sequence's mean next-token cross-entropy (their mean is `Distiller.evaluate`'s val_loss)."""
    out = []
    with torch.no_grad():
        for batch in val.split(batch_size):
            logits = model(input_ids=batch).logits[:, :-1].float()
            out += torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none") \
                .mean(1).tolist()
    return out


def bench_validation(path: Path, short: int = 4096, factor: int = 4, sizes: tuple[int, ...] = (8, 16, 32, 64, 128)):
    """The demo space's candidates, each short-retrained as a demo trial does (`short` tokens, the teacher's cached
    top-K) and `factor` times longer (the teacher online, as in promotion), then scored on the first n of
    max(sizes) sequences of the demo's own validation split: how many sequences make the short ranking agree with
    the longer one (Kendall tau, same top-1)? Each run is saved to `path` when it ends; a re-run resumes."""
    import tempfile

    from nas.distill import Distiller
    from nas.fidelity import kendall_tau
    from nas.search import candidate_inputs, prepare, retrain_config
    from nas.space import load_space

    demo = load_space(ROOT / "search_spaces" / "smollm2-135m-demo.yaml")
    space = dataclasses.replace(demo, val_sequences=max(sizes), promote=0,
                                full_retrain=dataclasses.replace(demo.full_retrain, tokens=short * factor))
    shared = prepare(space, RESULTS / "validation-trials")
    # The saved runs count only for the same sequences (a change to the space or to how rows are drawn moves them).
    data = hashlib.sha256(shared.val.numpy().tobytes() + shared.train_rows.tobytes()).hexdigest()[:16]
    saved = json.loads(path.read_text()) if path.exists() else {}
    runs = saved.get("runs", {}) if saved.get("data") == data else {}
    for tokens in (short, short * factor):
        spec = dataclasses.replace(space.short_retrain, tokens=tokens)
        # No evaluations on the way (they would cost more than the training): the losses are taken after it.
        cfg = dataclasses.replace(retrain_config(spec, space.seq_len, space.search.seed, checkpoint_tokens=10 * tokens),
                                  eval_every=0)
        for label in shared.rows:
            key = f"{tokens}/{label}"
            if key in runs:
                continue
            start = time.perf_counter()
            inputs = candidate_inputs(shared, label, promoted=tokens > short, device=torch.device("cpu"))
            with tempfile.TemporaryDirectory() as out:
                Distiller(inputs.student, inputs.teacher, inputs.train, inputs.val[:1], out, cfg, inputs.layer_map,
                          inputs.topk).run(progress=False, save_model=False)
            trained = time.perf_counter() - start
            losses = per_sequence_loss(inputs.student, shared.val)
            runs[key] = {"per_sequence": losses, "train_s": trained, "eval_s": time.perf_counter() - start - trained}
            write_json(path, {"data": data, "runs": runs})
            print(f"{key}: val {sum(losses) / len(losses):.4f} (train {trained:.0f} s)", flush=True)
    labels = list(shared.rows)

    def mean(tokens: int, n: int) -> list[float]:
        return [sum(runs[f"{tokens}/{label}"]["per_sequence"][:n]) / n for label in labels]

    longest = mean(short * factor, max(sizes))
    agreement = {}
    for n in sizes:
        ranked, same_n = mean(short, n), mean(short * factor, n)
        agreement[n] = {"tau_vs_long_at_max": kendall_tau(ranked, longest), "tau_vs_long_at_n": kendall_tau(ranked, same_n),
                        "top1_same": labels[ranked.index(min(ranked))] == labels[longest.index(min(longest))],
                        "eval_s_per_trial_eval": sum(runs[f"{short}/{label}"]["eval_s"] for label in labels)
                        / len(labels) * n / max(sizes)}
    return {"short_tokens": short, "long_tokens": short * factor, "candidates": labels,
            "val_loss": {t: dict(zip(labels, mean(t, max(sizes)))) for t in (short, short * factor)},
            "agreement": agreement}


def _table(name: str, figures: dict[str, Any]) -> str:
    lines = [f"== nas-bench {name} =="]

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"{prefix:<58} {shown}")
    walk("", figures)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nas-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("core", "distill", "search", "tokens", "plan", "fidelity", "validation",
                                          "gemma3", "qk-norm", "moe", "hybrid", "speed"))
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/<which>.json)")
    parser.add_argument("--short-tokens", type=int, default=4096, help="validation: the short retrain's tokens")
    args = parser.parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = Path(args.out or RESULTS / f"{args.which}.json")
    if args.which == "fidelity":
        return bench_fidelity(path)
    if args.which == "validation":
        path = Path(args.out or RESULTS / f"validation-{args.short_tokens}.json")
        figures = bench_validation(RESULTS / "validation-runs.json", short=args.short_tokens)
    else:
        figures = {"core": bench_core, "distill": bench_distill, "search": bench_search,
                   "tokens": bench_tokens, "plan": bench_plan, "gemma3": bench_gemma3, "qk-norm": bench_qk_norm,
                   "moe": bench_moe, "hybrid": bench_hybrid, "speed": bench_speed}[args.which]()
    figures["machine"] = _machine()
    write_json(path, figures)
    print(_table(args.which, figures))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
