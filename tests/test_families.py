"""The families written as data over block units (nas/families.py), each checked against its stock HF model:
keep-all pruning is the parent, a child cut on every axis is a stock checkpoint, counts and plans match what is
built, and KD sees the logits the family's own forward gives (softcaps and scalings included)."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILY_CONFIGS, tiny_model
from test_plan import _real_saved_bytes
from nas import losses
from nas.architecture import Architecture
from nas.cli import main
from nas.errors import UnsupportedModelError
from nas.families import family_of, logit_map
from nas.importance import ImportanceSettings, compute_importance
from nas.plan import saved_bytes_per_layer
from nas.prune import PruneOptions, prune, prune_checkpoint
from nas.teacher_cache import compute_topk

FAMILIES = sorted(FAMILY_CONFIGS)
TOKENS = torch.randint(3, 320, (4, 24), generator=torch.Generator().manual_seed(0))


def _importances(model):
    return compute_importance(model, TOKENS, ImportanceSettings(drop_samples=2, batch_size=4))


def _cut(config) -> Architecture:
    """Every axis cut at once: heads and KV heads halved, MLP and hidden width to 3/4 or less, one layer dropped."""
    return Architecture.of_config(config).replace(num_hidden_layers=3, layers=(0, 1, 3), num_attention_heads=3,
                                                  num_key_value_heads=1, intermediate_size=40, hidden_size=36)


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _cached_step(model):
    """Logits of one decoding step after a cached prompt: the path `generate` takes."""
    with torch.no_grad():
        out = model(input_ids=TOKENS[:, :16], use_cache=True)
        return model(input_ids=TOKENS[:, 16:17], cache=out.past_key_values, use_cache=True).logits


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", FAMILIES)
def test_keep_all_equals_the_parent_with_and_without_a_kv_cache(name):
    parent = tiny_model(name)
    child = prune(parent, _importances(parent), Architecture.of_config(parent.config))
    assert _rel(_logits(child), _logits(parent)) < 1e-4
    # The cached step is the full forward's position 16 (so the cache is really read), for child and parent alike.
    assert _rel(_cached_step(parent), _logits(parent, TOKENS[:, :17])[:, 16:17]) < 1e-4
    assert _rel(_cached_step(child), _cached_step(parent)) < 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_a_child_cut_on_every_axis_reloads_as_stock_and_generates(name, tmp_path):
    parent = tiny_model(name)
    arch = _cut(parent.config)
    child, reloaded = pruned_and_reloaded(parent, _importances(parent), arch, tmp_path)
    assert {k: getattr(reloaded.config, k) for k in arch.to_dict() if k != "layers"} == \
        {k: v for k, v in arch.to_dict().items() if k != "layers"}
    torch.testing.assert_close(_logits(reloaded), _logits(child), rtol=0, atol=0)
    for key in ("layer_types", "no_rope_layers"):  # per-layer patterns follow the kept layers
        if getattr(parent.config, key, None) is not None:
            assert getattr(reloaded.config, key) == [getattr(parent.config, key)[i] for i in arch.layers]
    out = reloaded.generate(TOKENS[:1, :8], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)


@pytest.mark.parametrize("name", FAMILIES)
def test_pruning_channels_nothing_writes_to_changes_nothing(name):
    """Hidden channels that the embeddings and every block leave at zero carry nothing: pruning them gives the
    parent's logits (up to the norms' epsilon), through each family's norms (post-norms, sandwich norms, Gemma's
    1 + w), multipliers, and Gemma's sqrt(hidden_size) embedding scale with a tied head. Without the rescale
    that the child's narrower norms need, the logits move."""
    parent = tiny_model(name)
    dead = [0, 7, 13, 22, 30, 41]
    with torch.no_grad():
        parent.model.embed_tokens.weight[:, dead] = 0
        for layer in parent.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight[dead] = 0
                if linear.bias is not None:
                    linear.bias[dead] = 0
    importances = _importances(parent)
    assert set(importances.hidden.argsort()[: len(dead)].tolist()) == set(dead)
    arch = Architecture.of_config(parent.config).replace(hidden_size=48 - len(dead))
    exact = _rel(_logits(prune(parent, importances, arch)), _logits(parent))
    unscaled = _rel(_logits(prune(parent, importances, arch, PruneOptions(rescale_norms=False))), _logits(parent))
    assert exact < 1e-3 and unscaled > 1e-2


@pytest.mark.parametrize("name", FAMILIES)
def test_parameter_count_equals_the_materialised_models(name):
    parent = tiny_model(name)
    family = family_of(parent.config)
    assert family.num_parameters(parent.config, Architecture.of_config(parent.config)) == \
        sum(p.numel() for p in parent.parameters())
    child = prune(parent, _importances(parent), _cut(parent.config))
    assert family.num_parameters(parent.config, _cut(parent.config)) == sum(p.numel() for p in child.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_streamed_pruning_is_bit_identical_to_in_memory(name, tmp_path):
    parent = tiny_model(name)
    assert_streamed_equals_in_memory(parent, _importances(parent), _cut(parent.config), tmp_path)


def pruned_and_reloaded(parent, importances, arch, tmp_path):
    """(the child `prune` makes, the same saved and reloaded with stock `from_pretrained`), checked to be of the
    parent's class."""
    child = prune(parent, importances, arch)
    child.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(parent)
    return child, reloaded


def assert_streamed_equals_in_memory(parent, importances, arch, tmp_path) -> None:
    """The parent saved in small shards, pruned file to file: the reloaded child's tensors are `prune`'s."""
    parent.save_pretrained(tmp_path / "parent", max_shard_size="20KB")
    expected = prune(parent, importances, arch).state_dict()
    prune_checkpoint(tmp_path / "parent", importances, arch, tmp_path / "child", max_shard_bytes=30_000)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "child").state_dict()
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def assert_two_fsdp_workers_reproduce_one(parent, arch, tmp_path, tokenizer, steps: int, keys=("loss",)) -> None:
    """`nas importance`, `nas prune` to `arch`, then `nas distill` of the child for `steps` steps on one process and
    on 2 FSDP2 gloo workers: each step's `keys` and the trained weights agree."""
    from conftest import WIKITEXT

    parent.save_pretrained(tmp_path / "parent")
    tokenizer.save_pretrained(tmp_path / "parent")
    (tmp_path / "text.txt").write_text((WIKITEXT / "valid.txt").read_text()[:60_000])
    assert main(["importance", "--parent", str(tmp_path / "parent"), "--data", str(tmp_path / "text.txt"), "--out",
                 str(tmp_path / "imp.safetensors"), "--samples", "4", "--seq-len", "32", "--drop-samples", "0"]) == 0
    (tmp_path / "arch.json").write_text(arch.to_json())
    assert main(["prune", "--parent", str(tmp_path / "parent"), "--arch", str(tmp_path / "arch.json"),
                 "--importance", str(tmp_path / "imp.safetensors"), "--out", str(tmp_path / "child")]) == 0
    train = ["--student", tmp_path / "child", "--teacher", tmp_path / "parent", "--data", tmp_path / "text.txt",
             "--seq-len", 32, "--quiet", "--tokens", 4 * 32 * steps, "--batch-size", 4, "--lr", 1e-3,
             "--checkpoint-every", 0]
    train = [str(a) for a in train]
    assert main(["distill", *train, "--out", str(tmp_path / "one")]) == 0
    assert main(["distill", *train, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    one, two = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                 if "grad_norm" in line] for run in ("one", "two"))
    assert len(one) == len(two) == steps
    for a, b in zip(one, two):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    m1, m2 = (AutoModelForCausalLM.from_pretrained(tmp_path / run / "model") for run in ("one", "two"))
    for (name, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(p2, p1, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("name", FAMILIES)
def test_planned_activations_equal_a_real_layers_saved_bytes(name):
    config = FAMILY_CONFIGS[name]()
    assert saved_bytes_per_layer(config, 3, 24, torch.float32) == _real_saved_bytes(config, 3, 24)


@pytest.mark.parametrize("name", FAMILIES)
def test_kd_sees_the_models_own_logits_online_and_from_a_full_vocabulary_cache(name):
    """The chunked KD loss, online and from a top-K cache with K = the vocabulary, equals forward KL between the
    two models' own `forward` logits, which carry the family's softcap and logit scaling."""
    teacher = tiny_model(name)
    assert_kd_sees_the_models_own_logits(teacher, prune(teacher, _importances(teacher), _cut(teacher.config)))


def assert_kd_sees_the_models_own_logits(teacher, student) -> None:
    """The chunked KD loss, online and from a full-vocabulary top-K cache, is forward KL between the two models'
    own `forward` logits."""
    mask = torch.ones(TOKENS.shape, dtype=torch.bool)
    reference = losses.forward_kl(_logits(student), _logits(teacher), mask)
    mapping = logit_map(teacher.config)
    with torch.no_grad():
        hidden = losses.final_hidden(student, TOKENS)
        online = losses.logit_losses(hidden, student.get_output_embeddings().weight, mask, losses.LogitTargets(
            teacher_hidden=losses.final_hidden(teacher, TOKENS), teacher_head=teacher.get_output_embeddings().weight,
            logit_map=mapping, teacher_logit_map=mapping), chunk_tokens=7)["loss"]
        top = compute_topk(teacher, TOKENS, teacher.config.vocab_size, dtype=torch.float32)
        cached = losses.logit_losses(hidden, student.get_output_embeddings().weight, mask, losses.LogitTargets(
            topk_logprobs=top.logprobs, topk_index=top.index.long(), logit_map=mapping), chunk_tokens=7)["loss"]
    torch.testing.assert_close(online, reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cached, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_cli_arch_importance_and_prune_keep_all_and_cut(name, tmp_path, tiny_tokenizer, text_file, capsys):
    """The Bar, through the CLI: `nas arch`, `nas importance`, then `nas prune` with the keep-all JSON (the child
    equals the parent) and with a cut one (a stock checkpoint carrying the cut values, that generates)."""
    parent = tiny_model(name)
    parent.save_pretrained(tmp_path / "parent")
    tiny_tokenizer.save_pretrained(tmp_path / "parent")
    p = str(tmp_path / "parent")
    assert main(["arch", "--parent", p, "--out", str(tmp_path / "keep.json")]) == 0
    keep = json.loads(capsys.readouterr().out)
    assert keep == json.loads((tmp_path / "keep.json").read_text())
    assert Architecture.from_dict(keep) == Architecture.of_config(parent.config)
    imp = str(tmp_path / "imp.safetensors")
    assert main(["importance", "--parent", p, "--data", str(text_file), "--seq-len", "32", "--samples", "8",
                 "--drop-samples", "2", "--out", imp, "--device", "cpu"]) == 0
    assert main(["prune", "--parent", p, "--arch", str(tmp_path / "keep.json"), "--importance", imp,
                 "--out", str(tmp_path / "same")]) == 0
    same = AutoModelForCausalLM.from_pretrained(tmp_path / "same").eval()
    assert _rel(_logits(same), _logits(parent)) < 1e-4
    rng = random.Random(name)
    cut = {**keep, "num_hidden_layers": 3, "layers": sorted(rng.sample(range(4), 3)), "num_attention_heads": 3,
           "num_key_value_heads": 1, "intermediate_size": 40, "hidden_size": 36}
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    assert main(["prune", "--parent", p, "--arch", str(tmp_path / "cut.json"), "--importance", imp,
                 "--out", str(tmp_path / "cut")]) == 0
    child = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").eval()
    assert {k: getattr(child.config, k) for k in cut if k != "layers"} == {k: v for k, v in cut.items() if k != "layers"}
    assert child.generate(TOKENS[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 12)


@pytest.mark.parametrize("model_type, says", [("deepseek_v3", "latent attention"), ("granitemoehybrid", "Mamba"),
                                               ("nemotron_h", r"holds \['moe'\] layers"),
                                               ("gemma4_text", "per-layer input"), ("gpt2", "supported families")])
def test_a_family_not_described_is_refused_with_what_it_lacks(model_type, says):
    from transformers import AutoConfig

    with pytest.raises(UnsupportedModelError, match=says):
        family_of(AutoConfig.for_model(model_type))
