"""Block scores (nas.block_scores) against whole children: replacing one block and running the whole pruned model."""

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, tiny_model
from nas.block_scores import block_scores, variants
from nas.families import Parent
from nas.importance import ImportanceSettings, compute_importance
from nas.prune import prune

TOKENS = torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(0))


def _whole_child_kl(model, importances, variant):
    """The reference: the full-depth child whose one layer has the variant's shape, run whole, against the parent."""
    parent = Parent.of(model.config)
    shapes = [parent.architecture.uniform_shape] * parent.architecture.num_hidden_layers
    shapes[variant.layer] = variant.shape(parent)
    child = prune(model, importances, parent.architecture.replace(per_layer=tuple(shapes)))
    with torch.no_grad():
        p = F.log_softmax(model(TOKENS).logits, -1)
        q = F.log_softmax(child(TOKENS).logits, -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    loss = F.cross_entropy(q[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten())
    return float(kl), float(loss)


@pytest.mark.parametrize("name, layers", [("llama", 4), ("qwen3", 4), ("gemma3_text", 2)])
def test_each_score_is_the_whole_childs_kl_to_the_parent(name, layers):
    """(Gemma 3's first `layers`: a sliding-window layer and a full-attention one, each with its own mask and rotary
    base.)"""
    model = tiny_model(name)
    importances = compute_importance(model, TOKENS, ImportanceSettings(batch_size=3))
    chosen = [v for v in variants(Parent.of(model.config), kv_heads=[1], mlp_widths=[40]) if v.layer < layers]
    assert {v.name for v in chosen} >= {"0.attention=1", "0.attention=none", "1.mlp=40", "1.mlp=none"}
    scores = block_scores(model, importances, TOKENS, chosen, batch_size=4)  # batches of 4 and 2
    for v in chosen:
        kl, loss = _whole_child_kl(model, importances, v)
        assert scores[v.name]["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7), v.name
        assert scores[v.name]["lm_loss"] == pytest.approx(loss, rel=1e-4), v.name
    assert all(s["kl"] > 0 for s in scores.values())


def test_a_planted_dead_mlp_scores_lowest_to_remove():
    model = tiny_model("llama")
    with torch.no_grad():  # layer 2's MLP adds nothing to the residual stream
        model.model.layers[2].mlp.down_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.bias.zero_()
    importances = compute_importance(model, TOKENS, ImportanceSettings(batch_size=3))
    removals = [v for v in variants(Parent.of(model.config), [], []) if v.width == 0]
    scores = block_scores(model, importances, TOKENS, removals)
    ranked = sorted(scores, key=lambda name: scores[name]["kl"])
    assert ranked[0] == "2.mlp=none" and scores[ranked[0]]["kl"] < 1e-6 < scores[ranked[1]]["kl"]
