"""Per-layer children (issue 27): each layer its own KV heads and MLP width, attention-free and MLP-free layers,
built and loaded by `nas.loader`, pruned in memory and streamed, counted, and distilled."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DummyLayer

import nas
from conftest import ALL_CONFIGS, PER_LAYER_FAMILIES, tiny_model
from nas.architecture import LayerShape
from nas.cli import main
from nas.distill import DistillConfig, Distiller, lr_factor, sample_indices
from nas.errors import ArchitectureError
from nas.families import Parent
from nas.importance import ImportanceSettings, compute_importance
from nas.prune import PruneOptions, prune, prune_checkpoint

#: The dense families nas builds per layer, by their tiny configs, and Llama with tied embeddings.
FAMILIES = [*PER_LAYER_FAMILIES, "llama-tied"]
TOKENS = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))
#: The tiny parents have 6 query heads in 2 KV groups of 3 and MLP width 80. Layer 0 keeps no attention, layer 1
#: no MLP, layer 2 one KV head (below the parent's groups: mean-pooled), layer 3 two KV heads and 32 neurons.
MIXED = (LayerShape(0, 80), LayerShape(2, 0), LayerShape(1, 48), LayerShape(2, 32))


def _importances(model):
    return compute_importance(model, TOKENS, ImportanceSettings(drop_samples=2, batch_size=4))


def _logits(model, tokens=TOKENS, **kwargs):
    with torch.no_grad():
        return model(input_ids=tokens, **kwargs).logits


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _mixed(name, hidden=36):
    parent = tiny_model(name)
    arch = Parent.of(parent.config).architecture.replace(hidden_size=hidden, per_layer=MIXED)
    return parent, arch


@pytest.mark.parametrize("name", FAMILIES)
def test_keep_all_in_per_layer_form_equals_the_parent(name):
    """Every layer lists the parent's widths over smaller global ones: the per-layer modules are the parent's."""
    parent = tiny_model(name)
    full = Parent.of(parent.config).architecture
    arch = full.replace(intermediate_size=40, per_layer=(full.uniform_shape,) * 4)
    assert not arch.is_uniform
    child = prune(parent, _importances(parent), arch)
    torch.testing.assert_close(_logits(child), _logits(parent), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_mixed_child_through_the_loader_equals_the_pruned_model(name, tmp_path):
    parent, arch = _mixed(name)
    child = prune(parent, _importances(parent), arch)
    child.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["per_layer_config"]
    assert saved == arch.per_layer_config()  # transformers' own form, listed layers only
    loaded = nas.load(tmp_path)
    # No weights, no norm for a skipped block (Gemma's sandwich: both of its norms); the other block keeps its own.
    attention_norms, mlp_norms = (("input_layernorm", "post_attention_layernorm"),
                                  ("pre_feedforward_layernorm", "post_feedforward_layernorm")) \
        if name.startswith("gemma") else (("input_layernorm",), ("post_attention_layernorm",))
    names = {n for n, _ in loaded.named_parameters()}
    gone = [f"model.layers.0.{m}" for m in ("self_attn", *attention_norms)] + \
        [f"model.layers.1.{m}" for m in ("mlp", *mlp_norms)]
    assert not [n for n in names if n.startswith(tuple(gone))]
    assert {f"model.layers.0.{m}.weight" for m in mlp_norms} | {f"model.layers.1.{m}.weight" for m in attention_norms} \
        <= names
    assert loaded.model.layers[2].self_attn.k_proj.weight.shape == (12, 36)
    assert loaded.model.layers[3].mlp.down_proj.weight.shape == (36, 32)
    # Counts: the family's formula against the materialised model.
    assert sum(p.numel() for p in loaded.parameters()) == Parent.of(parent.config).num_parameters(arch)
    full = _logits(child)
    assert _rel(_logits(loaded), full) < 1e-5
    # With a KV cache: a prefix, then the rest against the cache. The attention-free layer 0 holds nothing (its
    # entry is transformers' DummyLayer) and the cache's length still counts the prefix.
    prefix = loaded(input_ids=TOKENS[:, :10], use_cache=True)
    cache = prefix.cache
    assert isinstance(cache.layers[0], DummyLayer) and cache.get_seq_length() == 10
    assert [layer.keys.shape[1] for layer in cache.layers[1:]] == [2, 1, 2]
    with torch.no_grad():
        rest = loaded(input_ids=TOKENS[:, 10:], cache=cache, use_cache=True).logits
    assert _rel(torch.cat([prefix.logits.detach(), rest], 1), full) < 1e-5
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    greedy = loaded.generate(TOKENS[:2, :6], **kwargs)
    assert torch.equal(greedy, child.generate(TOKENS[:2, :6], **kwargs))
    assert torch.equal(greedy, loaded.generate(TOKENS[:2, :6], use_cache=False, **kwargs))


@pytest.mark.parametrize("name", FAMILIES)
def test_streamed_pruning_equals_in_memory(name, tmp_path):
    parent, arch = _mixed(name)
    importances = _importances(parent)
    parent.save_pretrained(tmp_path / "parent")
    prune_checkpoint(tmp_path / "parent", importances, arch, tmp_path / "child")
    streamed = load_file(tmp_path / "child" / "model.safetensors")
    in_memory = prune(parent, importances, arch).state_dict()
    if parent.config.tie_word_embeddings:
        in_memory.pop("lm_head.weight")
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[k], in_memory[k]) for k in streamed)


@pytest.mark.parametrize("name", PER_LAYER_FAMILIES)
def test_the_skipping_forward_with_every_block_kept_is_the_stock_layer(name):
    """nas's forward for a layer that skips a block, put on every layer of the stock model with nothing skipped,
    gives the stock model's logits bit for bit (Gemma's sandwich norms, its sliding and full layers' own masks and
    rotary embeddings, Granite's residual multiplier), with and without a cache."""
    from nas.loader import skipping

    model = tiny_model(name)
    stock = _logits(model)
    blocks = Parent.of(model.config).family.skippable()
    for j, layer in enumerate(model.model.layers):
        layer.__class__ = skipping(type(layer), blocks)
        layer.layer_index = j
    assert torch.equal(_logits(model), stock)
    prefix = model(input_ids=TOKENS[:, :10], use_cache=True)
    with torch.no_grad():
        rest = model(input_ids=TOKENS[:, 10:], cache=prefix.cache, use_cache=True).logits
    assert _rel(torch.cat([prefix.logits.detach(), rest], 1), stock) < 1e-5


#: Tables of a tiny 4-layer parent (its widths: 2 KV heads, MLP 80) that skip blocks and keep the rest whole. Gemma's
#: tiny layers are sliding, full, sliding, full (a window of 8 tokens): attention skipped in a layer of each type,
#: in every full layer, and in every sliding one.
SKIPS = {"sliding and full": (LayerShape(0, 80), LayerShape(0, 80), LayerShape(2, 0), LayerShape(2, 80)),
         "every full layer": (LayerShape(2, 80), LayerShape(0, 80), LayerShape(2, 0), LayerShape(0, 80)),
         "every sliding layer": (LayerShape(0, 0), LayerShape(2, 80), LayerShape(0, 80), LayerShape(2, 0))}


@pytest.mark.parametrize("name, table", [*(("gemma3_text", t) for t in SKIPS), ("gemma2", "sliding and full")])
def test_skipped_blocks_equal_the_stock_model_with_those_blocks_zeroed(name, table, tmp_path):
    """A child that keeps the parent's widths and skips blocks, saved and loaded by nas, against the stock
    transformers model of the parent with each skipped block's output projection zeroed (its output is then 0, and
    so is a Gemma post-norm of it): the same logits with and without a cache, the same greedy tokens, and the KV
    cache that `generate` fills is the one counted (nothing for an attention-free layer)."""
    parent = tiny_model(name)
    arch = Parent.of(parent.config).architecture.replace(per_layer=SKIPS[table])
    prune(parent, _importances(parent), arch).save_pretrained(tmp_path)
    child = nas.load(tmp_path)
    with torch.no_grad():
        for layer, shape in zip(parent.model.layers, arch.layer_shapes):
            for kept, projection in ((shape.attention, layer.self_attn.o_proj), (shape.mlp, layer.mlp.down_proj)):
                if not kept:
                    projection.weight.zero_()
                    if projection.bias is not None:
                        projection.bias.zero_()
    reference = _logits(parent)
    assert _rel(_logits(child), reference) < 1e-5
    prefix = child(input_ids=TOKENS[:, :10], use_cache=True)
    with torch.no_grad():
        rest = child(input_ids=TOKENS[:, 10:], cache=prefix.cache, use_cache=True).logits
    assert _rel(torch.cat([prefix.logits.detach(), rest], 1), reference) < 1e-5
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    greedy = child.generate(TOKENS[:2, :6], **kwargs)
    assert torch.equal(greedy, parent.generate(TOKENS[:2, :6], **kwargs))
    out = child.generate(TOKENS[:2, :6], cache_implementation="static", return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, greedy)
    built = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
                if t is not None)
    assert Parent.of(parent.config).cache_bytes(arch, 6 + 12 - 1, 2, nbytes=4) == built


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_mean_pooled_kv_heads_are_exact_where_the_pooled_heads_are_equal(name):
    """One KV head where the parent's two groups read equal keys and values: the mean is that head, and every
    query head still reads what it read in the parent."""
    parent = tiny_model(name)
    d = parent.config.head_dim
    with torch.no_grad():
        for layer in parent.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight[d:] = proj.weight[:d]
                if proj.bias is not None:
                    proj.bias[d:] = proj.bias[:d]
    full = Parent.of(parent.config).architecture
    arch = full.replace(per_layer=(LayerShape(1, 80),) * 4)
    child = prune(parent, _importances(parent), arch)
    assert child.model.layers[0].self_attn.k_proj.weight.shape[0] == d
    torch.testing.assert_close(_logits(child), _logits(parent), rtol=1e-5, atol=1e-5)


def test_kd_on_a_mixed_child_equals_a_hand_written_reference(tmp_path):
    """Three steps of nas.distill's KD against the loss written out: forward KL of the full logits, clipped,
    AdamW under the warm-up schedule."""
    teacher, arch = _mixed("llama")
    student = prune(teacher, _importances(teacher), arch).train()
    reference = prune(teacher, _importances(teacher), arch).train()
    train = torch.randint(0, 320, (12, 16), generator=torch.Generator().manual_seed(2))
    cfg = DistillConfig(tokens=3 * 4 * 16, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=0,
                        intermediate="off")
    Distiller(student, teacher, train, train[:4], tmp_path, cfg).run(progress=False, save_model=False)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(3):
        tokens = train[sample_indices(step, 0, cfg, train.shape[0])]
        with torch.no_grad():
            target = torch.log_softmax(teacher(tokens).logits, -1)
        logprobs = torch.log_softmax(reference(tokens).logits, -1)
        loss = (target.exp() * (target - logprobs)).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, 3, cfg.warmup_steps, cfg.min_lr_ratio)
        optimizer.step()
        optimizer.zero_grad()
    for (name, got), want in zip(student.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name, reason", [
    *((n, "mixtures of experts") for n in ("qwen3_moe", "mixtral")),
    *((n, "hybrid") for n in ("nemotron_h", "qwen3_5_text")),
    *((n, "does not build its decoder layer per layer") for n in ("phi3", "olmo2")),
])
def test_moe_hybrid_and_other_layouts_refuse_per_layer_cuts_in_one_line(name, reason):
    config = ALL_CONFIGS[name]()
    parent = Parent.of(config)
    full = parent.architecture
    arch = full.replace(per_layer=(full.uniform_shape,) * (full.num_hidden_layers - 1) + (LayerShape(1, 16),))
    with pytest.raises(ArchitectureError, match=reason) as e:
        parent.child_config(arch)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("shape, message", [
    (LayerShape(3, 80), "per_layer_config.3.num_key_value_heads=3 is larger than the parent's 2"),
    (LayerShape(2, 96), "per_layer_config.3.intermediate_size=96 is larger than the parent's 80"),
])
def test_layer_wider_than_the_parent_is_refused(shape, message):
    parent = Parent.of(ALL_CONFIGS["llama"]())
    arch = parent.architecture.replace(per_layer=MIXED[:3] + (shape,))
    with pytest.raises(ArchitectureError, match=message):
        parent.child_config(arch)


def test_loader_builds_no_storage_on_meta_and_refuses_a_per_layer_parent():
    parent, arch = _mixed("llama")
    config = Parent.of(parent.config).child_config(arch)
    with torch.device("meta"):
        model = nas.build(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.model.layers[0].self_attn is None and model.model.layers[1].mlp is None
    with pytest.raises(Exception, match="per-layer child"):
        Parent.of(model.config)
    # Stock transformers 5.24 cannot build it (the reason nas ships a loader).
    with pytest.raises(Exception, match="per-layer attribute"):
        AutoModelForCausalLM.from_config(config)


def test_cli_prunes_a_per_layer_json_that_nas_arch_prints(capsys, tiny_parent_dir, text_file, tmp_path):
    scores = tmp_path / "imp.safetensors"
    assert main(["importance", "--parent", str(tiny_parent_dir), "--data", str(text_file), "--out", str(scores),
                 "--samples", "4", "--seq-len", "32", "--drop-samples", "2"]) == 0
    assert main(["arch", "--parent", str(tiny_parent_dir), "--per-layer", "--out", str(tmp_path / "a.json")]) == 0
    data = json.loads((tmp_path / "a.json").read_text())
    assert sorted(data["per_layer_config"]) == ["0", "1", "2", "3"]  # every layer listed, ready to edit
    data["per_layer_config"] = {"0": {"skip": ["attention"]}, "1": {"skip": ["mlp"]},
                                "2": {"num_key_value_heads": 1, "intermediate_size": 48}}
    (tmp_path / "a.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["prune", "--parent", str(tiny_parent_dir), "--arch", str(tmp_path / "a.json"), "--importance",
                 str(scores), "--out", str(tmp_path / "child")]) == 0
    assert "-P" in capsys.readouterr().out
    loaded = nas.load(tmp_path / "child")
    from nas.architecture import Architecture
    from nas.importance import Importances

    arch = Architecture.from_dict(json.loads((tmp_path / "child" / "architecture.json").read_text()))
    parent = AutoModelForCausalLM.from_pretrained(tiny_parent_dir)
    in_memory = prune(parent, Importances.load(str(scores)), arch, PruneOptions())
    assert _rel(_logits(loaded), _logits(in_memory)) < 1e-5
