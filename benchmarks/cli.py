"""nas-bench NAME: runs one benchmark (its module `benchmarks.<name>`, dashes as underscores), writes its figures to
benchmarks/results/<name>.json (or --out) and prints them as a table."""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine
from nas.errors import NasError
from nas.files import write_json

# name -> what it measures (SmolLM2-135M, and Gemma 3 270M, unless it says otherwise): `nas-bench` lists these.
BENCHMARKS = {
    "core": "importance overhead, prune time, zero-shot held-out loss of pruning strategies",
    "distill": "KD vs CE recovery, step-time ratios, teacher top-K cost, peak memory of the chunked loss, 1 vs 2 "
               "Ray Train workers",
    "search": "demo search wall time, Ray/Optuna overhead vs a plain loop, ASHA vs exhaustive",
    "tokens": "tokenising a generated corpus of >= 100M tokens into shards: peak memory, speed; random sequence "
              "reads from the shards",
    "plan": "`nas plan`'s memory per worker against the peak of real `nas distill` runs on 1 and 2 Ray Train workers",
    "fidelity": "ranking stability over KD budgets, width vs depth, KD vs CE vs random init, our departures from the "
                "paper, ASHA (about an hour on 2 cores; resumable); writes benchmarks/FIDELITY.md",
    "validation": "the demo search's own ranking: its candidates after the short retrain against a 4x longer one, "
                  "with 8..128 validation sequences of its split (resumable)",
    "gemma3": "the second real parent, Gemma 3 270M: importance against random pruning, zero-shot and after "
              "equal-token KD, on held-out WikiText-2 (about 6 minutes)",
    "qk-norm": "OLMo 2's q/k norm over all heads: a small OLMo 2 trained from scratch on the plays (cached), half "
               "its query heads cut, the child as pruned against its q norm rescaled",
    "moe": "a small Qwen3-MoE trained from scratch on the plays (cached): half the experts cut by each expert score "
           "and at random, half the expert width by routed-token neuron scores and at random; held-out loss "
           "zero-shot and after equal-token KD",
    "hybrid": "a small Nemotron-H trained from scratch on the plays (cached): half the Mamba2 heads and head width "
              "by importance and at random, two layers dropped by layer kind; zero-shot and after equal-token KD",
    "speed": "the demo's candidates timed on this machine (decode latency, prefill, throughput: batch 1 after 512 "
             "tokens, batch 8 after 128) and ranked against their parameter counts",
    "per-layer-latency": "per-layer children's decode and prefill time predicted from their block variants' "
                         "measured costs (what a per-layer speed budget caps) against the children timed whole",
    "per-layer": "the per-layer search against the uniform one (SmolLM2 at the demo's budget and at half its "
                 "non-embedding parameters; Gemma 3's per-layer space, which nas refuses, gives its one-line refusal): both winners after equal KD tokens on held-out "
                 "WikiText-2 (2 seeds), their decode latency in HF, vLLM and llama.cpp, the block scores' "
                 "additivity, short against 4x longer KD, the program against random children (resumable)",
    "gpu": "CUDA only (exits 2 without): the KD step's MFU on SmolLM2 in bf16, and the demo's trial time on the GPU",
}


def _listing() -> str:
    width = max(map(len, BENCHMARKS))
    lines = [textwrap.fill(what, 116, initial_indent=f"  {name:<{width}} ", subsequent_indent=" " * (width + 3),
                           break_on_hyphens=False) for name, what in BENCHMARKS.items()]
    return "benchmarks:\n" + "\n".join(lines)


def table(name: str, figures: dict[str, Any]) -> str:
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
    parser = argparse.ArgumentParser(prog="nas-bench", description=__doc__, epilog=_listing(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", choices=tuple(BENCHMARKS), metavar="NAME", help="the benchmark to run")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/<which>.json)")
    parser.add_argument("--short-tokens", type=int, default=4096, help="validation: the short retrain's tokens")
    args = parser.parse_args(argv)
    if args.which is None:  # a bare `nas-bench`: what there is to run
        parser.print_help(sys.stderr)
        return 2
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    module = importlib.import_module(f"benchmarks.{args.which.replace('-', '_')}")
    path = Path(args.out or RESULTS / f"{args.which}.json")
    try:
        if args.which == "fidelity":
            return module.run(path)
        if args.which == "validation":
            path = Path(args.out or RESULTS / f"validation-{args.short_tokens}.json")
            figures = module.run(RESULTS / "validation-runs.json", short=args.short_tokens)
        else:
            figures = module.run()
    except NasError as e:  # e.g. `gpu` without CUDA: nothing was measured, so no result file is written
        print(f"nas-bench {args.which}: {e}", file=sys.stderr)
        return 2
    figures["machine"] = machine()
    write_json(path, figures)
    print(table(args.which, figures))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
