"""`nas-bench per-layer-latency`: how well a per-layer child's decode and prefill time is predicted by the sum of
its block variants' measured costs (`nas.search.block_latency`, what a per-layer search under a speed budget caps),
against the child timed whole, for SmolLM2-135M on this machine."""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from typing import Any

#: The variants: the demo's (1 KV head or none) and two MLP widths or none.
PER_LAYER = {"kv_heads": [1], "mlp_widths": [1024, 512], "skip_attention": True, "skip_mlp": True, "candidates": 4,
             "min_distance": 8}


def _space(context: int, batch: int, threads: int, latency_ms: float = 1e6):
    from nas.space import parse_space

    return parse_space({
        "name": "per-layer-latency", "parent": "smollm2-135m", "axes": {}, "per_layer": PER_LAYER,
        "budget": {"latency_ms": latency_ms, "context": context, "batch": batch, "decode_tokens": 16, "warmup": 1,
                   "repeats": 5},
        "resources": {"cpus_per_trial": threads}})


def run(context: int = 256, batch: int = 1, children: int = 8, threads: int = 1) -> dict[str, Any]:
    """The variants timed (the parent at depth 1 and 30, a stack of each variant), then `children` per-layer
    children: half the assembly program's under a latency cap at 80% of the parent's predicted time (block scores
    drawn at random: the costs are what is checked, not the choice), half tables drawn at random; each predicted
    from the variants' costs and timed whole, in HF `generate` on the CPU (the only engine a budget can name yet),
    with `threads` threads (one: the machine is shared, and one core is less disturbed by others' work)."""
    from nas.architecture import LayerShape
    from nas.families import Parent
    from nas.latency import measure
    from nas.parents import parent_config
    from nas.search.block_latency import block_latency, predicted
    from nas.search.per_layer import assemble_candidates, block_widths, chosen_variants
    from nas.space import architecture_of
    from nas.storage import RunStorage

    load_before = os.getloadavg()
    start = time.time()
    config = parent_config("smollm2-135m")
    parent = Parent.of(config)
    space = _space(context, batch, threads)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        storage = RunStorage(tmp, "bench")
        record = block_latency(space, config, block_widths(space, parent), storage, print)
        capped = _space(context, batch, threads, 0.8 * record["parent"]["latency_ms"])
        scores = {v.name: {"kl": rng.uniform(0, 1), "lm_loss": 0.0} for v in chosen_variants(space, parent)}
        rows = assemble_candidates(capped, config, scores, None, print, record)[:children // 2]
    archs = {r["label"]: architecture_of(r, config) for r in rows}
    full = parent.architecture.uniform_shape
    while len(archs) < children:  # random tables: each block kept, narrower or dropped, one attention kept at least
        shapes = [parent.architecture.uniform_shape] * parent.architecture.num_hidden_layers
        for i in range(len(shapes)):
            shapes[i] = LayerShape(rng.choice([full.num_key_value_heads, 1, 0] if i else [full.num_key_value_heads]),
                                   rng.choice([full.intermediate_size, 1024, 512, 0]))
        arch = parent.architecture.replace(per_layer=tuple(shapes))
        archs[arch.short()] = arch
    settings = _settings(space)
    out: dict[str, Any] = {}
    for n, (label, arch) in enumerate(archs.items(), 1):
        guess = predicted(record, parent, arch)
        got = measure(parent.child_config(arch).to_dict(), settings)
        out[label] = {"source": "program" if label in {r["label"] for r in rows} else "random",
                      "params": parent.num_parameters(arch),
                      **{k: {"predicted": guess[k], "measured": got[k], "spread": got[f"{k}_spread"],
                             "relative_error": guess[k] / got[k] - 1} for k in ("latency_ms", "prefill_ms")}}
        print(f"[{n}/{len(archs)}] {label}: decode {guess['latency_ms']:.2f} ms predicted, {got['latency_ms']:.2f} "
              f"measured; prefill {guess['prefill_ms']:.1f} predicted, {got['prefill_ms']:.1f} measured", flush=True)
    errors = {k: [abs(c[k]["relative_error"]) for c in out.values()] for k in ("latency_ms", "prefill_ms")}
    return {"settings": {"context": context, "batch": batch, "decode_tokens": 16, "repeats": 5, "threads": threads,
                         "dtype": settings.dtype, "engine": "HF generate, static cache, SDPA"},
            "device": record["device_name"], "variants": record["variants"], "parent": record["parent"],
            "fixed": record["fixed"], "layer": record["layer"], "children": out,
            "abs_relative_error": {k: {"mean": statistics.mean(v), "max": max(v)} for k, v in errors.items()},
            "load_average_before_after": [load_before[0], os.getloadavg()[0]], "seconds": time.time() - start}


def _settings(space):
    from nas.latency import settings_of

    return settings_of(space.budget, space.resources.cpus_per_trial)
