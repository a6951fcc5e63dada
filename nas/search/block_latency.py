"""Measured speed costs of per-layer block variants (a per-layer search under `budget.latency_ms`, `prefill_ms` or
`throughput`; docs/per-layer-search.md): what each variant adds to a child's decode and prefill time, so that the
assembly program (`nas.assembly`) can cap their sum as it caps parameters.

Timed as `nas.latency` times candidates (random weights, HF `generate` with a static cache, the budget's device,
dtype, context, batch and repeats; a Ray task on the timing node), each a whole model, since a layer's time in
`generate` includes its share of the loop's per-layer work (cache update, masks) that a lone layer's forward leaves
out:
- the parent at depth 1 and at its own depth L: a layer of its shape costs the difference over L - 1, and the
  rest of the depth-1 model is the fixed part (embeddings, final norm, LM head, the generate loop);
- for each block and width the space names, the parent with that block at that width in layers 1 .. L-1 (layer 0
  keeps its attention: HF's cache needs one attention layer): the variant's cost is the difference from the
  parent over L - 1.
A variant costs the same in every layer (the shapes are the same; a sliding-window parent's layers share the
average), and a child's predicted time is the parent's plus its variants' costs: the attention and MLP of one
layer are taken to add up. `nas-bench per-layer-latency` checks that prediction against whole children.

Kept in the run folder's block_latency.json, keyed by the parent's shape, the timing settings, the machine and the
widths, so a re-run reuses it; each model's figures are also in latency/ as a candidate's are.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable

from nas.architecture import Architecture, LayerShape
from nas.errors import ConfigError
from nas.families import Parent
from nas.latency import cached_measure, timer
from nas.space import SearchSpace

LATENCY = "block_latency.json"
TIMED = ("latency_ms", "prefill_ms")


def variant_key(block: str, width: int) -> str:
    """A block variant's name without its layer: its cost is the same in every layer."""
    return f"{block}={width or 'none'}"


def _stack(parent: Parent, block: str, width: int) -> Architecture:
    """The parent with `block` at `width` in every layer but the first."""
    full = parent.architecture.uniform_shape
    shape = LayerShape(width, full.intermediate_size) if block == "attention" else \
        LayerShape(full.num_key_value_heads, width)
    layers = parent.architecture.num_hidden_layers
    return parent.architecture.replace(per_layer=(full, *[shape] * (layers - 1)))


def block_latency(space: SearchSpace, config: Any, widths: list[tuple[str, int]], storage,
                  echo: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """block_latency.json of the run folder `storage` for the (block, width) variants `widths`: "parent" (the
    parent's figures), "fixed" and "layer" (its fixed part and a layer of its shape), "variants" (each variant's
    difference a layer, by `variant_key`); reused where the key matches, else measured and written."""
    parent = Parent.of(config)
    depth = parent.architecture.num_hidden_layers
    if depth < 2:
        raise ConfigError(f"budget: {space.budget.speed_caps}: a per-layer speed budget times variants in all layers "
                          f"but the first, and {space.parent} has {depth}; use a params band or memory cap")
    settings, where, timing = timer(space)
    stacks = {variant_key(b, w): _stack(parent, b, w) for b, w in sorted(set(widths))}
    models = {"parent": parent.architecture, "depth 1": parent.architecture.replace(num_hidden_layers=1, layers=(0,)),
              **stacks}
    shape = json.dumps(parent.child_config(parent.architecture).to_dict(), sort_keys=True, default=str)
    # (through JSON, as the file holds it: the settings' tuples read back as lists)
    key = json.loads(json.dumps({"parent": hashlib.sha256(shape.encode()).hexdigest()[:16],
                                 "settings": settings.keyed(), "machine": where, "variants": sorted(stacks)}))
    if (cached := storage.read_json(LATENCY)) is not None and cached.get("key") == key:
        return cached
    start, figures = time.time(), {}
    for n, (name, arch) in enumerate(models.items(), 1):
        figures[name], fresh = cached_measure(storage, settings, where, parent.child_config(arch).to_dict(),
                                              timing, f"{arch.short()} ({name})")
        if fresh:
            echo(f"[block latency {n}/{len(models)}] {name}: {figures[name]['latency_ms']:.3g} ms/token, prefill "
                 f"{figures[name]['prefill_ms']:.3g} ms on {figures[name]['device_name']}")
    whole, one = figures.pop("parent"), figures.pop("depth 1")
    layer = {k: (whole[k] - one[k]) / (depth - 1) for k in TIMED}
    out = {"key": key, "parent": {k: whole[k] for k in TIMED}, "layer": layer,
           "fixed": {k: one[k] - layer[k] for k in TIMED},
           "variants": {name: {k: (f[k] - whole[k]) / (depth - 1) for k in TIMED} for name, f in figures.items()},
           "device_name": whole["device_name"], "seconds": time.time() - start}
    storage.write_json(LATENCY, out)
    return out


def predicted(record: dict[str, Any], parent: Parent, arch: Architecture) -> dict[str, float]:
    """A full-depth per-layer child's predicted figures from `block_latency`'s record: the parent's, plus each
    layer's variants' costs."""
    full = parent.architecture.uniform_shape
    out = dict(record["parent"])
    for shape in arch.layer_shapes:
        for block, width, own in (("attention", shape.num_key_value_heads, full.num_key_value_heads),
                                  ("mlp", shape.intermediate_size, full.intermediate_size)):
            if width != own:
                for k in TIMED:
                    out[k] += record["variants"][variant_key(block, width)][k]
    return out


def speed_limits(space: SearchSpace) -> dict[str, tuple[None, float]]:
    """The program's caps on the summed figures: latency_ms and prefill_ms as given; a throughput floor is a cap
    on latency (throughput = batch x 1000 / latency_ms), the tighter of the two where both are given."""
    caps = dict(space.budget.speed_caps)
    if (floor := caps.pop("throughput", None)) is not None:
        caps["latency_ms"] = min(caps.get("latency_ms", float("inf")), space.budget.batch * 1000 / floor)
    return {k: (None, v) for k, v in caps.items()}
