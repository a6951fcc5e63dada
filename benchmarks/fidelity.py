"""`nas-bench fidelity`: ranking stability over KD budgets, width vs depth, KD vs CE vs random init, our departures
from the paper, ASHA (about an hour on 2 cores; resumable); writes benchmarks/FIDELITY.md. The arms themselves are
`nas.fidelity`'s."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import ROOT, machine
from nas.files import write_json


def run(path: Path) -> int:
    """Runs every arm (resuming from `path`), then writes benchmarks/FIDELITY.md and its plots."""
    from nas.fidelity import Fidelity, smollm2_plan, write_report

    fid = Fidelity(smollm2_plan(ROOT), path, log=lambda line: print(line, flush=True))
    summary = fid.run_all()
    m = machine()
    described = f"{m['cpu_threads']} CPU threads ({m['processor']}), torch {m['torch']}, no GPU" if not m["cuda"] else \
        f"CUDA, torch {m['torch']}"
    report = write_report(fid, summary, ROOT / "benchmarks", "nas-bench fidelity", described)
    write_json(path.with_name("fidelity-summary.json"), summary)
    print(f"-> {path}, {report}")
    return 0
