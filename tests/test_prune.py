import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_CONFIGS, tiny_model
from nas.architecture import Architecture
from nas.importance import ImportanceSettings, compute_importance
from nas.prune import PruneOptions, head_selection, prune

TOKENS = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _importances(model):
    return compute_importance(model, TOKENS, ImportanceSettings(drop_samples=2, batch_size=4))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_keep_everything_reproduces_parent_logits(name):
    parent = tiny_model(name)
    child = prune(parent, _importances(parent), Architecture.of_config(parent.config))
    torch.testing.assert_close(_logits(child), _logits(parent), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_parent_is_not_modified(name):
    parent = tiny_model(name)
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    full = Architecture.of_config(parent.config)
    prune(parent, _importances(parent), full.replace(hidden_size=36, intermediate_size=40))
    for k, v in parent.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_pruning_zeroed_heads_and_neurons_changes_nothing(name):
    parent = tiny_model(name)
    d = parent.config.head_dim
    dead_heads = [1, 5]  # one query head in each of the two KV groups
    dead_neurons = [3, 17, 40]
    with torch.no_grad():
        for layer in parent.model.layers:
            for h in dead_heads:
                layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
            # A zero pre-activation gives act(0) = 0 for SiLU and squared ReLU: no contribution and no score.
            first = layer.mlp.gate_proj if hasattr(layer.mlp, "gate_proj") else layer.mlp.up_proj
            first.weight[dead_neurons] = 0
            if first.bias is not None:
                first.bias[dead_neurons] = 0
    importances = _importances(parent)
    assert all(set(s.argsort()[:3].tolist()) == set(dead_neurons) for s in importances.neurons)
    # The default head score (head_source="output") is the norm of each head's contribution through its own
    # o_proj columns, so a head whose columns are zero scores exactly 0: the lowest of its KV group. The scores
    # are used as computed; pruning must then drop exactly the silenced heads.
    assert ImportanceSettings().head_source == "output"
    live = [h for h in range(parent.config.num_attention_heads) if h not in dead_heads]
    assert (importances.heads[:, dead_heads] == 0).all() and (importances.heads[:, live] > 0).all()
    full = Architecture.of_config(parent.config)
    arch = full.replace(num_attention_heads=4, intermediate_size=full.intermediate_size - len(dead_neurons))
    child = prune(parent, importances, arch)
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in live])
    for layer_child, layer_parent in zip(child.model.layers, parent.model.layers):  # exactly the live heads kept
        assert torch.equal(layer_child.self_attn.q_proj.weight, layer_parent.self_attn.q_proj.weight[rows])
    torch.testing.assert_close(_logits(child), _logits(parent), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "llama-tied", "mistral", "qwen2", "qwen3"])
def test_pruning_zeroed_channels_changes_nothing_with_rmsnorm(name):
    parent = tiny_model(name)
    dead = [0, 7, 13, 22, 30, 41]  # six, so that 42 stays a multiple of the 6 heads
    with torch.no_grad():
        parent.model.embed_tokens.weight[:, dead] = 0
        for layer in parent.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                if lin.bias is not None:
                    lin.bias[dead] = 0
    importances = _importances(parent)
    assert set(importances.hidden.argsort()[: len(dead)].tolist()) == set(dead)
    arch = Architecture.of_config(parent.config).replace(hidden_size=48 - len(dead))
    child = prune(parent, importances, arch)
    # Exact up to RMSNorm's epsilon, which is added to a mean over a different width.
    torch.testing.assert_close(_logits(child), _logits(parent), rtol=1e-4, atol=1e-4)
    unscaled = prune(parent, importances, arch, PruneOptions(rescale_norms=False))
    assert not torch.allclose(_logits(unscaled), _logits(parent), atol=1e-3)


def test_group_pruning_keeps_gqa_valid_and_whole_groups():
    parent = tiny_model("llama")
    importances = _importances(parent)
    importances.heads[:] = torch.tensor([9, 9, 9, 1, 1, 1.0])  # group 0 clearly better
    arch = Architecture.of_config(parent.config).replace(num_attention_heads=2, num_key_value_heads=1)
    queries, groups = head_selection(importances.heads[0], arch, 2)
    assert groups.tolist() == [0] and set(queries.tolist()) <= {0, 1, 2}
    child = prune(parent, importances, arch)
    assert child.config.num_key_value_heads == 1 and child.config.num_attention_heads == 2
    assert torch.isfinite(_logits(child)).all()


def test_residual_heads_fold_pruned_output_projection():
    parent = tiny_model("llama")
    importances = _importances(parent)
    arch = Architecture.of_config(parent.config).replace(num_attention_heads=4)
    plain = prune(parent, importances, arch, PruneOptions(residual_heads=False))
    folded = prune(parent, importances, arch)  # the default
    o_plain = plain.model.layers[0].self_attn.o_proj.weight
    o_folded = folded.model.layers[0].self_attn.o_proj.weight
    # Two pruned heads' columns (one per group) were added: the difference has their total norm.
    kept, _ = head_selection(importances.heads[0], arch, 2)
    d = parent.config.head_dim
    pruned = [h for h in range(6) if h not in kept.tolist()]
    o_parent = parent.model.layers[0].self_attn.o_proj.weight
    expected = sum(o_parent[:, h * d:(h + 1) * d].norm() ** 2 for h in pruned).sqrt()
    torch.testing.assert_close((o_folded - o_plain).norm(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_saved_child_reloads_with_stock_class_and_same_logits(name, tmp_path):
    parent = tiny_model(name)
    full = Architecture.of_config(parent.config)
    arch = full.replace(num_hidden_layers=2, layers=(0, 3), hidden_size=42, intermediate_size=50)
    child = prune(parent, _importances(parent), arch)
    child.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(parent)
    assert reloaded.config.head_dim == full.head_dim
    torch.testing.assert_close(_logits(reloaded), _logits(child), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_depth_pruned_child_generates_with_kv_cache(name):
    parent = tiny_model(name)
    arch = Architecture.of_config(parent.config).replace(num_hidden_layers=2, layers=(1, 3))
    child = prune(parent, _importances(parent), arch)
    assert [layer.self_attn.layer_idx for layer in child.model.layers] == [0, 1]
    prompt = TOKENS[:1, :8]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = child.generate(prompt, use_cache=True, **kwargs)
    uncached = child.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (1, 14) and torch.equal(cached, uncached)


def test_depth_pruning_equals_running_the_kept_layers():
    parent = tiny_model("llama")
    arch = Architecture.of_config(parent.config).replace(num_hidden_layers=3, layers=(0, 2, 3))
    child = prune(parent, _importances(parent), arch)
    from nas.importance import _without_layers

    with _without_layers(parent, {1}):
        expected = _logits(parent)
    torch.testing.assert_close(_logits(child), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_streamed_pruning_equals_in_memory_pruning(name, tmp_path):
    """A parent saved in several shards, pruned file to file, gives prune()'s tensors bit for bit."""
    from nas.prune import prune_checkpoint

    parent = tiny_model(name)
    parent.save_pretrained(tmp_path / "parent", max_shard_size="20KB")
    assert len(list((tmp_path / "parent").glob("*.safetensors"))) > 3
    full = Architecture.of_config(parent.config)
    arch = full.replace(num_hidden_layers=3, layers=(0, 2, 3), num_attention_heads=3, num_key_value_heads=1,
                        intermediate_size=40, hidden_size=36)
    importances = _importances(parent)
    expected = prune(parent, importances, arch).state_dict()
    prune_checkpoint(tmp_path / "parent", importances, arch, tmp_path / "child", max_shard_bytes=30_000)
    assert (tmp_path / "child" / "model.safetensors.index.json").exists()  # written in shards too
    child = AutoModelForCausalLM.from_pretrained(tmp_path / "child")
    got = child.state_dict()
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    torch.testing.assert_close(_logits(child), _logits(prune(parent, importances, arch)), rtol=0, atol=0)
