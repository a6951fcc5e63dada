"""Deployment memory (`budget.memory_gb`): a child's weights plus the KV cache of `batch` sequences of `context`
tokens, counted from its config, against the cache HF's own `generate` builds (a static cache), for families with
full, sliding-window and mixed attention, dense and mixtures of experts."""

import json

import pytest
import torch

from conftest import ALL_CONFIGS, tiny_model
from nas.cli import main
from nas.families import Parent
from nas.importance import ImportanceSettings, compute_importance
from nas.prune import prune
from nas.space import enumerate_candidates, parse_space

TOKENS = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def _cut(config):
    """Heads, KV heads and hidden narrower, one layer dropped (so that the kept layers' types are the child's)."""
    parent = Parent.of(config)
    return parent.architecture.replace(num_attention_heads=3, num_key_value_heads=1, num_hidden_layers=3,
                                       layers=(0, 2, 3), **({"hidden_size": 24} if config.model_type == "olmoe"
                                                            else {}))


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral", "gemma2", "gemma3_text", "olmo3", "qwen3_moe",
                                  "gpt_oss"])
@pytest.mark.parametrize("new_tokens", [2, 12])  # the context below and above the tiny sliding window (8)
def test_the_counted_kv_cache_is_the_one_generate_builds(name, new_tokens):
    parent = tiny_model(name)
    arch = _cut(parent.config)
    child = prune(parent, compute_importance(parent, TOKENS, ImportanceSettings(drop_samples=0)), arch)
    out = child.generate(TOKENS, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, cache_implementation="static", return_dict_in_generate=True)
    cache = out.past_key_values
    built = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    context = TOKENS.shape[1] + new_tokens - 1  # generate never feeds the last new token back: it is not cached
    assert Parent.of(parent.config).cache_bytes(arch, context, TOKENS.shape[0], nbytes=4) == built
    if name in ("gemma2", "gemma3_text", "olmo3", "gpt_oss") and new_tokens == 12:  # past the window: it is used
        assert built < 2 * 3 * context * 2 * arch.num_key_value_heads * arch.head_dim * 4


def test_a_memory_budget_enforces_weights_plus_cache_and_candidates_list_it(tmp_path, capsys):
    """A memory cap alone is a budget: the candidates are those whose weights and KV cache at the budget's context
    and batch fit, and `nas candidates` lists each one's memory (the same count `--json` gives in bytes)."""
    config = ALL_CONFIGS["qwen3"]()
    parent = Parent.of(config)
    spec = {"name": "mem", "parent": "x", "parent_config": {"model_type": "qwen3", **{
        k: v for k, v in config.to_dict().items() if k in ("vocab_size", "hidden_size", "intermediate_size",
                                                           "num_hidden_layers", "num_attention_heads",
                                                           "num_key_value_heads", "head_dim")}},
            "axes": {"num_hidden_layers": [2, 3, 4], "num_key_value_heads": [1, 2], "num_attention_heads": [2]}}
    sizes = {}
    for layers in (2, 3, 4):
        for kv in (1, 2):
            arch = parent.architecture.replace(num_hidden_layers=layers, layers=tuple(range(layers)),
                                               num_key_value_heads=kv, num_attention_heads=2)
            # weights in bf16; keys and values of 8 x 1024 tokens in every layer, kv heads of 12 dimensions
            sizes[(layers, kv)] = parent.num_parameters(arch) * 2 + 2 * layers * 1024 * 8 * kv * 12 * 2
    cap = sorted(sizes.values())[3] / 2**30
    spec["budget"] = {"memory_gb": cap, "context": 1024, "batch": 8}
    space = parse_space(spec)
    rows = enumerate_candidates(space, config)
    assert {(r["num_hidden_layers"], r["num_key_value_heads"]) for r in rows} == \
        {k for k, v in sizes.items() if v <= cap * 2**30}
    assert all(r["memory_bytes"] == sizes[(r["num_hidden_layers"], r["num_key_value_heads"])] for r in rows)
    (tmp_path / "space.json").write_text(json.dumps(spec))
    assert main(["candidates", str(tmp_path / "space.json")]) == 0
    text = capsys.readouterr().out
    assert "memory_gb" in text and "context 1024 x batch 8" in text
    assert all(f"{r['memory_bytes'] / 2**30:.2f}" in text for r in rows)
    assert main(["candidates", "--json", str(tmp_path / "space.json")]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["label"], c["memory_bytes"], c["active_params"]) for c in listed] == \
        [(r["label"], r["memory_bytes"], r["params"]) for r in rows]
    assert all(c["memory_bytes"] == sizes[(c["num_hidden_layers"], c["num_key_value_heads"])] and
               (c["context"], c["batch"]) == (1024, 8) for c in listed)
