"""The per-layer candidates of a space before any search (`nas candidates SPACE` on a per-layer space): the
assembly program's children from the block scores in the importance cache ($NAS_CACHE/block_scores/, which every
`nas search` writes), computed here only when asked (`--block-scores`): they cost about half a forward of the
parent a variant, minutes for the demo's SmolLM2-135M on a 2-core CPU, too much to spend unasked.

Finding them needs their key, the importance's fingerprints: the parent's weights (loaded on the CPU, as `nas
search`'s parent task loads them) and the calibration sequences (tokenised and drawn as `nas search` draws them).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from nas.data import load_tokens
from nas.errors import ConfigError, NasError
from nas.families import Parent
from nas.importance import compute_importance, fingerprints
from nas.parents import load_parent, resolve_parent
from nas.search.block_latency import block_latency
from nas.search.per_layer import DIGEST, assemble_candidates, block_widths, cached_block_scores, chosen_variants, \
    scores_key, shared_scores, strips
from nas.search.preparation import calibration_rows, importance_settings
from nas.space import SearchSpace, architecture_of, enumerate_candidates, per_layer_problem


def listed_candidates(space: SearchSpace, config: Any, where: str, compute: bool, storage,
                      echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """A per-layer space's candidates as `nas candidates` lists them: the program's children (`per_layer_rows`),
    then the axes' uniform ones (digest 0) where the space asks."""
    if problem := per_layer_problem(space, Parent.of(config)):
        raise ConfigError(f"{where}: {problem}")
    uniform = [{**r, DIGEST: 0} for r in enumerate_candidates(space, config)] if space.per_layer.uniform else []
    return [*per_layer_rows(space, config, compute, storage, where, echo), *uniform]


def strip_columns(rows: list[dict[str, Any]], config: Any) -> dict[str, list[str]]:
    """The "kv_heads" and "mlp" strips of each row (`per_layer.strips`), blank for uniform ones; none at all where
    no per-layer child is listed."""
    if not any(r[DIGEST] for r in rows):
        return {}
    parent = Parent.of(config).architecture
    text = [strips(architecture_of(r, config), parent) if r[DIGEST] else {"kv_heads": "", "mlp": ""} for r in rows]
    return {"kv_heads": [t["kv_heads"] for t in text], "mlp": [t["mlp"] for t in text]}


def per_layer_rows(space: SearchSpace, config: Any, compute: bool, storage, where: str,
                   echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """The program's children as candidate rows (none, with one line to `echo` saying why, where the block scores
    are not cached and `compute` is false, or the parent's weights are not here). Under a speed budget the
    variants are timed into `storage`, as `nas candidates` times candidates. `where`: the space's file, for the
    line that names the command."""
    from transformers import AutoTokenizer

    try:
        model = load_parent(space.parent, torch.device("cpu"))[0]
        tokenizer = AutoTokenizer.from_pretrained(resolve_parent(space.parent))
    except (NasError, OSError) as e:
        echo(f"per_layer: the block scores need the parent's weights, which cannot be loaded here "
             f"({str(e).splitlines()[0]}); listing the uniform candidates only")
        return []
    imp = space.importance
    tokens = load_tokens(space.data, tokenizer, space.seq_len, space.text_field, min_sequences=imp.samples + 2)
    calibration = tokens[calibration_rows(space, len(tokens))]
    settings = importance_settings(space, config)
    found = fingerprints(model, calibration, settings)
    parent = Parent.of(config)
    path, cached = shared_scores(scores_key(found, space, parent, len(calibration)))
    if cached is None and not compute:
        samples = space.per_layer.samples or imp.samples
        echo(f"per_layer: no block scores of this parent, data and variants in {path.parent} yet; `nas candidates "
             f"{where} --block-scores` computes them here ({len(chosen_variants(space, parent))} variants on "
             f"{samples} x {space.seq_len} tokens), as `nas search` does; listing the uniform candidates only")
        return []
    if cached is None:
        importances = compute_importance(model, calibration, settings)
        cached = cached_block_scores(model, replace(importances, meta={**importances.meta, **found}), calibration,
                                     space, None)
    latency = block_latency(space, config, block_widths(space, parent), storage, echo) \
        if space.budget.speed_caps else None
    return assemble_candidates(space, config, cached["scores"], None, echo, latency)
