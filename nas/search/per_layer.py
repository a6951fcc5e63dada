"""Per-layer candidates (`per_layer:` in a space; docs/per-layer-search.md): each block variant's score, computed
once per parent and data (`nas.block_scores`, in the parent's Ray task), its exact costs, and the assembly
program's best children under the budget (`nas.assembly`), which become the study's candidates: trained by the
same short retrains as uniform ones, promoted and exported as per-layer children.

Files in the run folder: block_scores.json (the scores, keyed by the importance's fingerprints, the variants and
the calibration sequences read, with what computing them cost) and per_layer.json (the program: its limits,
fixed part and solutions, each with its layer table and summed score and costs)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

from nas.architecture import Architecture, LayerShape
from nas.assembly import Block, assemble
from nas.block_scores import Variant, block_scores, variants
from nas.errors import ConfigError
from nas.families import Parent
from nas.files import cache_dir, write_json
from nas.importance import Importances
from nas.search.block_latency import TIMED, predicted, speed_limits
from nas.space import SearchSpace, _counted, _memory_problem, _range, axes_of, memory_bytes
from nas.storage import RunStorage

SCORES, ASSEMBLY = "block_scores.json", "per_layer.json"
#: A per-layer candidate's Optuna parameter and row key: its label's digest as an integer (0 in a uniform
#: candidate of a per-layer search), so that a trial's parameters name its layer table as its axes name its widths.
DIGEST = "per_layer"
#: A layer's MLP width in eighths of the parent's, one character a layer (`strips`).
LEVELS = "▁▂▃▄▅▆▇█"
ABSENT = "·"  # a skipped block, or a layer the child does not keep


def chosen_variants(space: SearchSpace, parent: Parent) -> list[Variant]:
    """The block variants the space names: narrower ones, and removal where `skip_attention`/`skip_mlp`."""
    p = space.per_layer
    skip = {"attention": p.skip_attention, "mlp": p.skip_mlp}
    return [v for v in variants(parent, p.kv_heads, p.mlp_widths) if v.width or skip[v.block]]


def scores_key(fingerprints: dict[str, Any], space: SearchSpace, parent: Parent, calibration: int) -> dict[str, Any]:
    """What block scores depend on: the importance's fingerprints (parent weights, calibration data, settings:
    `Importances.meta`), the variants and the calibration sequences read (of `calibration`)."""
    samples = space.per_layer.samples or calibration
    # (through JSON, as the files hold it: the settings' tuples read back as lists)
    return json.loads(json.dumps({"importance": {k: fingerprints.get(k) for k in ("parent", "data", "settings")},
                                  "samples": samples, "variants": [v.name for v in chosen_variants(space, parent)]}))


def shared_scores(key: dict[str, Any]) -> tuple[Path, dict[str, Any] | None]:
    """(the file of the importance cache, $NAS_CACHE/block_scores/, that holds the scores of `key`, its content
    where it holds them): a second study on the same parent and data, in another run folder, reads them there."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "block_scores" / f"{digest}.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or not JSON (edited by hand?): computed again
        return path, None
    return path, cached if cached.get("key") == key else None


def cached_block_scores(model: nn.Module, importances: Importances, calibration: Tensor, space: SearchSpace,
                        storage: RunStorage | None) -> dict[str, Any]:
    """block_scores.json of the run folder (`storage`; None: none), else of the importance cache (`shared_scores`),
    where made from the same parent, calibration data and importance settings (the importance's fingerprints),
    variants and sequences; else computed and written to both."""
    parent = Parent.of(model.config)
    key = scores_key(importances.meta, space, parent, len(calibration))
    path, shared = shared_scores(key)
    local = storage.read_json(SCORES) if storage else None
    out = local if local is not None and local.get("key") == key else shared
    if out is None:
        chosen, samples = chosen_variants(space, parent), key["samples"]
        start = time.time()
        scores = block_scores(model, importances, calibration[:samples], chosen, space.per_layer.batch_size)
        out = {"key": key, "scores": scores, "seconds": time.time() - start,
               "tokens": samples * calibration.shape[1], "variants": len(chosen)}
    if shared is None:  # (also a run folder's scores from before the importance cache held them)
        write_json(path, out)
    if storage and out is not local:
        storage.write_json(SCORES, out)
    return out


def _with(parent: Parent, variant: Variant) -> Architecture:
    """The parent with only `variant`'s block replaced."""
    shapes = [parent.architecture.uniform_shape] * parent.architecture.num_hidden_layers
    shapes[variant.layer] = variant.shape(parent)
    return parent.architecture.replace(per_layer=tuple(shapes))


def _cost_functions(space: SearchSpace, parent: Parent, latency: dict[str, Any] | None
                    ) -> dict[str, Callable[[Architecture], float]]:
    """The child's figures the budget bounds: its counted parameters (of the budget's kind), under a memory cap
    its weights' bytes or its weights' and KV cache's bytes at the budget's context x batch, and under a speed cap
    its predicted milliseconds from the variants' measured costs (`latency`, `nas.search.block_latency`)."""
    b = space.budget
    out: dict[str, Callable[[Architecture], float]] = {"counted": lambda a: _counted(space, parent, a)}
    for cap in speed_limits(space) if latency else ():
        out[cap] = lambda a, cap=cap: predicted(latency, parent, a)[cap]
    if b.max_weight_gb is not None:
        out["weights"] = lambda a: parent.num_parameters(a) * b.bytes_per_param
    if b.memory_gb is not None:
        out["memory"] = lambda a: memory_bytes(space, parent, a)
    return out


def _limits(space: SearchSpace, parent: Parent) -> dict[str, tuple[float | None, float | None]]:
    b = space.budget
    low, high = _range(space, parent)
    out = {"counted": (low or None, None if math.isinf(high) else high)}
    if b.max_weight_gb is not None:
        out["weights"] = (None, b.max_weight_gb * 2**30)
    if b.memory_gb is not None:
        out["memory"] = (None, b.memory_gb * 2**30)
    return {**out, **speed_limits(space)}


def block_widths(space: SearchSpace, parent: Parent) -> list[tuple[str, int]]:
    """The (block, width) variants the space names, each once (their measured cost is the same in every layer)."""
    return sorted({(v.block, v.width) for v in chosen_variants(space, parent)})


def assemble_candidates(space: SearchSpace, config: Any, scores: dict[str, dict[str, float]],
                        storage: RunStorage | None, echo: Callable[[str], None] = lambda line: None,
                        latency: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The program's `per_layer.candidates` best children as candidate rows (label with the table's digest, the
    table as `per_layer_config`, exact counts), written with the program to per_layer.json (of `storage`, where
    given). Under a speed budget `latency` is the variants' measured costs (`block_latency`), and the rows are
    still to be timed whole."""
    parent = Parent.of(config)
    functions = _cost_functions(space, parent, latency)
    base = {k: float(f(parent.architecture)) for k, f in functions.items()}
    by_block: dict[tuple[int, str], list[Variant]] = {}
    for v in chosen_variants(space, parent):
        by_block.setdefault((v.layer, v.block), []).append(v)
    blocks, options = [], []
    for (layer, block), chosen in sorted(by_block.items()):
        # Each variant's costs as differences against the parent: the parent's own block costs nothing extra.
        costs = [{k: 0.0 for k in functions}] + [{k: f(_with(parent, v)) - base[k] for k, f in functions.items()}
                                                  for v in chosen]
        blocks.append(Block(f"{layer}.{block}", ("keep", *(v.name for v in chosen)),
                            (0.0, *(scores[v.name]["kl"] for v in chosen)),
                            {k: tuple(c[k] for c in costs) for k in functions}))
        options.append((None, *chosen))
    limits = _limits(space, parent)
    solutions = assemble(blocks, limits, space.per_layer.candidates, space.per_layer.min_distance, fixed=base)
    low, high = _range(space, parent)
    if not solutions:
        raise ConfigError(f"per_layer: no per-layer child fits the budget (counted {space.budget.kind} parameters "
                          f"[{low:,.0f}, {high:,.0f}], memory and speed caps as given); the narrowest the variants "
                          f"allow is too large: add smaller per_layer.mlp_widths or kv_heads, or "
                          f"skip_attention/skip_mlp")
    rows, record = [], []
    for solution in solutions:
        shapes = [parent.architecture.uniform_shape] * parent.architecture.num_hidden_layers
        for choice, option in zip(solution.choices, options):
            if (v := option[choice]) is not None:
                kept = shapes[v.layer]
                shapes[v.layer] = LayerShape(v.width, kept.intermediate_size) if v.block == "attention" else \
                    LayerShape(kept.num_key_value_heads, v.width)
        arch = parent.architecture.replace(per_layer=tuple(shapes))
        label = arch.short()
        # The program's sums are of floats within the solver's tolerances: the exact counts decide, as they do a
        # uniform candidate's.
        counted = _counted(space, parent, arch)
        if not low <= counted <= high or (problem := _memory_problem(space, parent, arch)) is not None:
            echo(f"[per-layer] {label}: left out, {problem or f'{counted:,} counted parameters'} by exact counts")
            continue
        strip = strips(arch, parent.architecture)
        rows.append({"label": label, **axes_of(parent, arch), DIGEST: int(label.rsplit("-P", 1)[1], 16)
                     if arch.per_layer else 0, "per_layer_config": arch.per_layer_config(),
                     "params": parent.num_parameters(arch), "memory_bytes": memory_bytes(space, parent, arch),
                     "counted": counted, "share_of_parent": parent.num_parameters(arch) / parent.num_parameters(),
                     "block_score": solution.score})
        record.append({"label": label, "score": solution.score, "costs": solution.costs, **strip,
                       "per_layer_config": arch.per_layer_config()})
        speed = "".join(f", predicted {k} {solution.costs[k]:.3g}" for k in TIMED if k in solution.costs)
        echo(f"[per-layer] {label}: summed KL {solution.score:.4f}, {rows[-1]['params'] / 1e6:.2f}M params{speed}; "
             f"KV {strip['kv_heads']} MLP {strip['mlp']}")
    if storage:
        storage.write_json(ASSEMBLY, {"limits": limits, "fixed": base, "min_distance": space.per_layer.min_distance,
                                      "solutions": record})
    return rows


def strips(arch: Architecture, parent: Architecture) -> dict[str, str]:
    """A child's widths at a glance, one character a parent layer: its KV heads (a digit, A for 10 and on) and its
    MLP width in eighths of the parent's (`LEVELS`); `ABSENT` for a skipped block or a layer not kept."""
    shapes = dict(zip(arch.layers, arch.layer_shapes))

    def kv(s: LayerShape | None) -> str:
        if s is None or not s.attention:
            return ABSENT
        return "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"[s.num_key_value_heads] if s.num_key_value_heads < 36 else "+"

    def mlp(s: LayerShape | None) -> str:
        if s is None or not s.mlp:
            return ABSENT
        return LEVELS[min(len(LEVELS), math.ceil(len(LEVELS) * s.intermediate_size / parent.intermediate_size)) - 1]

    layers = range(parent.num_hidden_layers)
    return {"kv_heads": "".join(kv(shapes.get(i)) for i in layers), "mlp": "".join(mlp(shapes.get(i)) for i in layers)}
