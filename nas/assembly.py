"""Assembly of a per-layer child from scored block variants (Puzzle's mixed-integer program, arXiv 2411.19146).

Each block (a layer's attention, a layer's MLP) has a few variants (kept as is, narrower, skipped), each with a
score (how far the parent moves when only that block is replaced: lower is better) and costs (parameters, KV-cache
bytes, milliseconds). Choosing one variant per block to minimise the summed scores under limits on the summed
costs is a small 0-1 program: HiGHS (`scipy.optimize.milp`) solves it exactly in milliseconds for hundreds of
blocks. The N best children are taken one after another, each at least `min_distance` blocks away from every one
taken before (Hamming distance over the blocks' choices), so that the short-KD ranking that follows compares
different children rather than N copies of one with a single block changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from nas.errors import NasError


@dataclass(frozen=True)
class Block:
    """One block's variants: their names, scores, and each cost's value per variant."""

    name: str
    variants: tuple[str, ...]
    scores: tuple[float, ...]
    costs: dict[str, tuple[float, ...]]

    def __post_init__(self) -> None:
        sizes = {len(self.variants), len(self.scores), *(len(v) for v in self.costs.values())}
        if len(sizes) != 1:
            raise NasError(f"block {self.name}: {len(self.variants)} variants but scores or costs of other lengths")


@dataclass(frozen=True)
class Solution:
    """A child: the variant index chosen for each block, its summed score and its summed costs (fixed part
    included)."""

    choices: tuple[int, ...]
    score: float
    costs: dict[str, float]

    def names(self, blocks: Sequence[Block]) -> dict[str, str]:
        return {b.name: b.variants[i] for b, i in zip(blocks, self.choices)}


def assemble(blocks: Sequence[Block], limits: dict[str, tuple[float | None, float | None]], count: int = 1,
             min_distance: int = 1, fixed: dict[str, float] | None = None,
             time_limit: float = 60.0) -> list[Solution]:
    """The `count` best children under `limits`, each at least `min_distance` blocks away from the ones before.

    Args:
        blocks: the blocks, each with its variants.
        limits: cost name -> (least, most) of the child's total (None: unbounded on that side); every name must be
            a cost of every block.
        fixed: the part of each cost outside the blocks (embeddings, LM head), added to the blocks' sum.
    Returns:
        Up to `count` solutions, best first; fewer where no further child fits (an empty list: none fits).
    """
    fixed = fixed or {}
    if missing := sorted({c for c in limits for b in blocks if c not in b.costs}):
        raise NasError(f"limits name costs {missing} that some blocks do not record")
    offsets = np.cumsum([0, *(len(b.variants) for b in blocks)])
    n = int(offsets[-1])
    scores = np.concatenate([np.asarray(b.scores, float) for b in blocks])
    # one variant a block
    pick = np.zeros((len(blocks), n))
    for i, b in enumerate(blocks):
        pick[i, offsets[i]:offsets[i + 1]] = 1
    rows = [LinearConstraint(pick, 1, 1)]
    for cost, (lo, hi) in limits.items():
        row = np.concatenate([np.asarray(b.costs[cost], float) for b in blocks])
        base = fixed.get(cost, 0.0)
        rows.append(LinearConstraint(row[None], -np.inf if lo is None else lo - base,
                                     np.inf if hi is None else hi - base))
    out: list[Solution] = []
    while len(out) < count:
        result = milp(scores, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=rows,
                      options={"time_limit": time_limit})
        if result.status == 2:  # infeasible: no (further) child fits
            break
        if result.x is None:
            raise NasError(f"the assembly program stopped without a solution: {result.message}")
        x = np.round(result.x).astype(bool)
        choices = tuple(int(np.flatnonzero(x[offsets[i]:offsets[i + 1]])[0]) for i in range(len(blocks)))
        totals = {cost: fixed.get(cost, 0.0) + sum(b.costs[cost][c] for b, c in zip(blocks, choices))
                  for cost in blocks[0].costs} if blocks else {}
        out.append(Solution(choices, float(scores[x].sum()), totals))
        # the next child agrees with this one on at most (blocks - min_distance) blocks
        same = np.zeros(n)
        same[[offsets[i] + c for i, c in enumerate(choices)]] = 1
        rows.append(LinearConstraint(same[None], -np.inf, len(blocks) - min_distance))
    return out
