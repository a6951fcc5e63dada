"""`nas-bench tokens`: tokenising a generated corpus of >= 100M tokens into shards (peak memory, speed); random
sequence reads from the shards."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT


_TOKENIZE = """
import json, sys, time
from transformers import AutoTokenizer
from nas.data import tokenize
from nas.parents import resolve_parent

def status(key):  # kB, from the kernel's accounting of this process
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

source, out = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(resolve_parent("smollm2-135m"))
start = time.perf_counter()
tokens = tokenize(source, tokenizer, 2048, out)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": status("VmHWM:") / 1024,
                  "tokens": tokens.index["tokens"], "shards": len(tokens.index["shard_rows"])}))
"""


def run(target_tokens: int = 100_000_000) -> dict[str, Any]:
    """A generated JSONL corpus (words drawn from the shipped WikiText-2 excerpt) of about `target_tokens`
    SmolLM2 tokens, tokenised into shards in a fresh process; then random reads from the shards."""
    import subprocess
    import tempfile

    import numpy as np

    from nas.tokens import TokenSet

    words = np.array((ROOT / "data" / "wikitext-2" / "valid.txt").read_text().split())
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        start = time.perf_counter()
        chars = 0
        with corpus.open("w") as f:
            while chars < target_tokens * 4.6:  # about 4.6 characters a token for SmolLM2 on this text
                for _ in range(1000):
                    doc = " ".join(words[rng.integers(0, len(words), 400)])
                    f.write(json.dumps({"text": doc}) + "\n")
                    chars += len(doc)
        out["corpus_mib"] = corpus.stat().st_size / 2**20
        out["corpus_write_s"] = time.perf_counter() - start
        result = subprocess.run([sys.executable, "-c", _TOKENIZE, str(corpus), f"{tmp}/shards"],
                                capture_output=True, text=True, check=True)
        made = json.loads(result.stdout.splitlines()[-1])
        out["tokenize"] = {**made, "tokens_per_s": made["tokens"] / made["seconds"]}
        tokens = TokenSet(f"{tmp}/shards")
        rows = torch.from_numpy(rng.integers(0, len(tokens), 20_000))
        start = time.perf_counter()
        for batch in rows.split(8):  # a training loop's reads: 8 random sequences at a time
            tokens[batch]
        seconds = time.perf_counter() - start
        out["random_read"] = {"sequences": len(rows), "seq_len": tokens.seq_len,
                              "tokens_per_s": len(rows) * tokens.seq_len / seconds}
    out["goals"] = {"tokenize_peak_rss_mib": 2048, "random_read_tokens_per_s": 1_000_000}
    return out
