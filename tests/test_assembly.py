"""The assembly program (nas.assembly) against brute force over every child of a small space."""

import itertools
import random

import pytest

from nas.assembly import Block, assemble
from nas.errors import NasError


def _space(seed: int, layers: int = 3) -> list[Block]:
    rng = random.Random(seed)
    blocks = []
    for layer in range(layers):
        # attention: kept, fewer KV heads, none; MLP: kept, narrower, none (scores rise as costs fall, noisily)
        for kind, params, kv in (("attention", (40, 25, 0), (8, 2, 0)), ("mlp", (90, 50, 0), (0, 0, 0))):
            scores = tuple(sorted(rng.uniform(0, 1) for _ in params))
            blocks.append(Block(f"{layer}.{kind}", ("full", "narrow", "none"), scores,
                                {"params": params, "kv": kv}))
    return blocks


def _brute_force(blocks, limits, count, distance, fixed):
    children = []
    for choices in itertools.product(*(range(len(b.variants)) for b in blocks)):
        totals = {c: fixed.get(c, 0) + sum(b.costs[c][i] for b, i in zip(blocks, choices)) for c in limits}
        if all((lo is None or totals[c] >= lo) and (hi is None or totals[c] <= hi)
               for c, (lo, hi) in limits.items()):
            children.append((sum(b.scores[i] for b, i in zip(blocks, choices)), choices))
    taken = []
    for score, choices in sorted(children):
        if len(taken) == count:
            break
        if all(sum(a != b for a, b in zip(choices, t)) >= distance for _, t in taken):
            taken.append((score, choices))
    return taken


@pytest.mark.parametrize("seed, limits, count, distance", [
    (0, {"params": (None, 300)}, 5, 1),
    (1, {"params": (200, 320), "kv": (None, 12)}, 6, 2),
    (2, {"params": (150, 250)}, 4, 3),
    (3, {"params": (None, 390)}, 3, 6),  # far apart: fewer children exist than asked
])
def test_the_program_finds_the_brute_force_best_children_in_order(seed, limits, count, distance):
    blocks, fixed = _space(seed), {"params": 10}
    expected = _brute_force(blocks, limits, count, distance, fixed)
    got = assemble(blocks, limits, count=count, min_distance=distance, fixed=fixed)
    assert [s.choices for s in got] == [c for _, c in expected]
    assert [s.score for s in got] == pytest.approx([s for s, _ in expected])
    for s in got:
        assert s.costs["params"] == 10 + sum(b.costs["params"][i] for b, i in zip(blocks, s.choices))


def test_a_budget_nothing_fits_gives_no_child_and_unknown_costs_are_refused():
    blocks = _space(0)
    assert assemble(blocks, {"params": (None, 5)}, fixed={"params": 10}) == []
    with pytest.raises(NasError, match=r"limits name costs \['latency_ms'\]"):
        assemble(blocks, {"latency_ms": (None, 1.0)})
