import pytest
import torch

from conftest import TINY_CONFIGS, tiny_model
from nas.architecture import Architecture
from nas.importance import ImportanceSettings, Importances, _over_sequence, _Running, cached_importance, \
    compute_importance, lm_loss, select_layers
from nas.prune import prune

TOKENS = torch.randint(0, 320, (6, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("how", ["mean", "l2", "var"])
def test_streaming_aggregation_equals_one_shot(how):
    x = torch.randn(10, 7, 5)
    running = _Running(how)
    for chunk in x.split(3):
        running.add(_over_sequence(chunk, "mean"))
    per_sample = x.mean(1)
    expected = {"mean": per_sample.mean(0), "l2": per_sample.norm(dim=0), "var": per_sample.var(0, unbiased=False)}
    torch.testing.assert_close(running.result(), expected[how], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_over_sequence(x, "l2"), x.norm(dim=1))
    torch.testing.assert_close(_over_sequence(x, "var"), x.var(1, unbiased=False))


def test_scores_equal_a_direct_computation():
    model = tiny_model("llama")
    captured = {}
    layer = model.model.layers[2]
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("attn", a[0])),
             layer.mlp.gate_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("gate", o))]
    with torch.no_grad():
        out = model(input_ids=TOKENS, output_hidden_states=True)
    for h in hooks:
        h.remove()
    imp = compute_importance(model, TOKENS, ImportanceSettings(drop_samples=0, batch_size=4))
    paper = compute_importance(model, TOKENS, ImportanceSettings(drop_samples=0, batch_size=4, head_source="attn"))
    d = model.config.head_dim
    heads = captured["attn"].unflatten(-1, (-1, d))  # [B, S, H, d]
    torch.testing.assert_close(paper.heads[2], heads.norm(dim=-1).mean(1).norm(dim=0), rtol=1e-5, atol=1e-6)
    w_o = layer.self_attn.o_proj.weight.unflatten(1, (-1, d))  # [hidden, H, d]
    contribution = torch.einsum("bshd,ohd->bsho", heads, w_o).norm(dim=-1)  # each head through its o_proj slice
    torch.testing.assert_close(imp.heads[2], contribution.mean(1).norm(dim=0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(imp.neurons[2], captured["gate"].mean(1).norm(dim=0), rtol=1e-5, atol=1e-6)
    x, y = out.hidden_states[1], out.hidden_states[2]  # input and output of layer 1
    bi = 1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()
    torch.testing.assert_close(imp.layer_bi[1], bi, rtol=1e-5, atol=1e-6)
    assert imp.hidden.shape == (48,) and (imp.hidden >= 0).all()


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_a_channel_every_norm_silences_scores_zero_and_lowest(name):
    """A channel's score sums its activation over every norm layer's output (paper §2.2), so a channel that every
    norm outputs as exactly zero must score 0, below every live channel. Zeroing its embedding column would not
    do: attention and MLP write into that channel of the residual stream (o_proj, down_proj rows), and a
    LayerNorm maps even a zero input channel to -mean/std. What silences a norm's output channel is its weight:
    RMSNorm outputs w * x / rms(x); Nemotron's LayerNorm1P (1 + w) * (x - mean) / std + b, so w = -1 and b = 0."""
    model = tiny_model(name)
    settings = ImportanceSettings(drop_samples=0, batch_size=4)
    before = compute_importance(model, TOKENS, settings).hidden
    dead = sorted({int(before.argmax()), 5})  # the channel that scored highest, and another
    layernorm = name == "nemotron"
    norms = [m for layer in model.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    with torch.no_grad():
        for norm in [*norms, model.model.norm]:
            norm.weight[dead] = -1.0 if layernorm else 0.0
            if getattr(norm, "bias", None) is not None:
                norm.bias[dead] = 0.0
    hidden = compute_importance(model, TOKENS, settings).hidden
    assert hidden[dead].abs().max() < 1e-6, hidden[dead]
    assert sorted(hidden.argsort()[: len(dead)].tolist()) == dead
    live = torch.ones_like(hidden, dtype=torch.bool)
    live[dead] = False
    assert hidden[live].min() > 1e-3  # every other channel still carries activation


def test_drop_loss_equals_loss_of_the_depth_pruned_child():
    model = tiny_model("qwen3")
    imp = compute_importance(model, TOKENS, ImportanceSettings(drop_samples=4, block_sizes=(2,), batch_size=4))
    full = Architecture.of_config(model.config)
    without_1 = prune(model, imp, full.replace(num_hidden_layers=3, layers=(0, 2, 3)))
    assert imp.block_loss[1][1] == pytest.approx(lm_loss(without_1, TOKENS[:4]), rel=1e-5)
    without_23 = prune(model, imp, full.replace(num_hidden_layers=2, layers=(0, 1)))
    assert imp.block_loss[2][2] == pytest.approx(lm_loss(without_23, TOKENS[:4]), rel=1e-5)
    assert imp.base_loss == pytest.approx(lm_loss(model, TOKENS[:4]), rel=1e-5)


def test_layer_selection_methods():
    imp = Importances(torch.rand(8), torch.rand(5, 4), torch.rand(5, 6), layer_bi=torch.tensor([.9, .1, .5, .2, .8]),
                      block_loss={1: torch.tensor([9., 2., 7., 3., 8.]), 2: torch.tensor([5., 1., 4., 6.])})
    assert select_layers(imp, 3, "bi") == (0, 2, 4)
    assert select_layers(imp, 3, "drop") == (0, 2, 4)
    assert select_layers(imp, 3, "block") == (0, 3, 4)
    assert select_layers(imp, 5, "block") == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="block_sizes including 3"):
        select_layers(imp, 2, "block")


def test_cache_reuses_matching_scores_and_recomputes_otherwise(tmp_path):
    model = tiny_model("mistral")
    path = tmp_path / "imp.safetensors"
    settings = ImportanceSettings(drop_samples=2, batch_size=4)
    first = cached_importance(model, TOKENS, path, settings)
    stamp = path.stat().st_mtime_ns
    again = cached_importance(model, TOKENS, path, settings)
    assert path.stat().st_mtime_ns == stamp and torch.equal(again.neurons, first.neurons)
    other = cached_importance(model, TOKENS[:3], path, settings)  # other data: recomputed, replaced
    assert other.meta["data"] != first.meta["data"] and Importances.load(path).meta["data"] == other.meta["data"]
    path.write_bytes(path.read_bytes()[:100])  # a truncated file is never trusted
    fixed = cached_importance(model, TOKENS, path, settings)
    torch.testing.assert_close(fixed.heads, first.heads)
    assert Importances.load(path).meta["samples"] == TOKENS.shape[0]


def test_bf16_scores_are_finite_and_rank_like_fp32():
    model = tiny_model("llama")
    settings = ImportanceSettings(drop_samples=0, batch_size=6)
    fp32 = compute_importance(model, TOKENS, settings)
    bf16 = compute_importance(model.to(torch.bfloat16), TOKENS, settings)
    for a, b in [(fp32.neurons, bf16.neurons), (fp32.heads, bf16.heads), (fp32.hidden, bf16.hidden)]:
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        ranks = lambda t: t.flatten().argsort().argsort().float()  # noqa: E731
        assert torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1] > 0.9


def test_scores_of_a_parent_offloaded_to_disk_equal_the_single_device_ones(tmp_path, tiny_tokenizer):
    """A parent spread by accelerate's `device_map` (here: half its layers offloaded to disk, the rest on the
    CPU) is scored layer by layer where it lives; the scores and the fingerprint are those of the whole model."""
    from nas.importance import fingerprint_model
    from nas.parents import load_parent

    tiny_model("llama").save_pretrained(tmp_path / "parent")
    tiny_tokenizer.save_pretrained(tmp_path / "parent")
    whole, _ = load_parent(str(tmp_path / "parent"), torch.device("cpu"))
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                 "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                 "lm_head": "cpu"}
    spread, _ = load_parent(str(tmp_path / "parent"), torch.device("cpu"), device_map=placement,
                            offload_folder=tmp_path / "offload")
    # really not in memory: read from the checkpoint's safetensors for each forward
    assert spread.model.layers[2].self_attn.o_proj.weight.device.type == "meta"
    tokens = torch.randint(0, 320, (6, 16), generator=torch.Generator().manual_seed(5))
    settings = ImportanceSettings(drop_samples=3, block_sizes=(2,))
    a, b = compute_importance(whole, tokens, settings), compute_importance(spread, tokens, settings)
    for name in ("hidden", "heads", "neurons", "layer_bi"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-6)
    for k in a.block_loss:
        torch.testing.assert_close(b.block_loss[k], a.block_loss[k], rtol=1e-5, atol=1e-6)
    assert fingerprint_model(spread) == fingerprint_model(whole)
