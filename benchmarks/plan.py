"""`nas-bench plan`: `nas plan`'s memory per worker against the peak measured in real `nas distill` runs on the
CPU, on 1 and on 2 Ray Train workers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import DEMO_SPACE, setup
from nas.importance import ImportanceSettings, compute_importance
from nas.prune import prune


def run(steps: int = 3) -> dict[str, Any]:
    """`nas plan`'s memory per worker against the peak measured in real CPU runs: `nas distill` (online teacher,
    the demo's batch and sequence) of the demo space's largest candidate, on 1 and on 2 Ray Train workers, each in a
    fresh process; measured = a worker's peak resident set above what it held before building its models."""
    import subprocess
    import tempfile

    from transformers import AutoConfig

    from nas.parents import resolve_parent
    from nas.plan import retrain_stage
    from nas.space import RetrainSpec, architecture_of, enumerate_candidates, load_space

    space = load_space(DEMO_SPACE)
    model, _, cal, _ = setup()
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
