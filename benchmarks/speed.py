"""`nas-bench speed`: the demo's candidates timed on this machine (decode latency, prefill, throughput: batch 1
after 512 tokens, batch 8 after 128) and ranked against their parameter counts."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import DEMO_SPACE


def run(settings: tuple[tuple[int, int], ...] = ((512, 1), (128, 8))) -> dict[str, Any]:
    """The demo space's candidates (and the parent) timed on this machine as a speed budget times them
    (`nas.latency.measure`: a random model of each shape, HF generate with a static cache), ranked by decode latency
    and by parameter count: where the two orders disagree, and what depth and width cuts buy at equal size."""
    from scipy.stats import kendalltau

    from nas.families import Parent
    from nas.latency import SpeedSettings, measure
    from nas.parents import parent_config
    from nas.space import architecture_of, enumerate_candidates, load_space

    space = load_space(DEMO_SPACE)
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
            # tau-b: candidates of equal size (a depth cut beside a width cut) are tied, not disagreeing
            "kendall_tau_latency_vs_params": float(kendalltau([figures[k]["latency_ms"] for k in labels],
                                                              [figures[k]["params"] for k in labels]).statistic),
            "fastest_first": by_latency, "smallest_first": by_params,
            "pairs_where_the_smaller_is_slower": [f"{a} vs {b}" for a, b in disagree]}
    return out
