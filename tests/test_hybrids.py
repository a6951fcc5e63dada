"""Hybrid parents (nas/blocks/mamba.py, nas/blocks/deltanet.py) against their stock HF models, on the kernels'
pure-torch paths: keep-all pruning is the parent with and without a cache (the recurrent states included), dead
recurrent heads score lowest and removing them leaves the logits equal, a child cut on every axis is a stock
checkpoint whose layer pattern is its kept layers' kinds, counts are the built model's, streamed pruning is
bit-identical, and a child keeps an attention layer."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import HYBRID_CONFIGS, tiny_model
from test_families import assert_kd_sees_the_models_own_logits, assert_streamed_equals_in_memory, \
    assert_two_fsdp_workers_reproduce_one, pruned_and_reloaded
from nas.cli import main
from nas.errors import ArchitectureError
from nas.families import Parent, family_of
from nas.importance import ImportanceSettings, compute_importance
from nas.prune import prune
from nas.space import enumerate_candidates, parse_space

FAMILIES = sorted(HYBRID_CONFIGS)
TOKENS = torch.randint(3, 320, (4, 24), generator=torch.Generator().manual_seed(0))


def _importances(model, tokens=TOKENS):
    return compute_importance(model, tokens, ImportanceSettings(drop_samples=2, batch_size=4))


def _pattern(config) -> list[str]:
    """Each layer's kind as the config says it (Falcon-H1: "hybrid" throughout, derived)."""
    return list(getattr(config, family_of(config).pattern_key or "layers_block_type"))


def _cut(config):
    """Every axis cut: half the recurrent heads (Mamba2: and 4 of its 6 head channels; DeltaNet: one key head of
    two), half the attention heads, narrower MLPs (and experts, where there are), hidden narrower, and one layer
    dropped (a recurrent one)."""
    parent = Parent.of(config)
    family = parent.family
    changes = {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 40, "hidden_size": 36}
    if family.mamba:  # (Bamba: heads x head width a multiple of hidden_size)
        changes.update(zip(family.mamba.keys, (4, 9 if family.mamba.expand_key else 4)))
    else:
        changes.update(linear_num_value_heads=2, linear_num_key_heads=1)
    if family.moe:
        changes.update(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=12,
                       shared_expert_intermediate_size=20)
    layers = tuple(i for i in range(config.num_hidden_layers) if i != 0)  # (Falcon-H1: all layers alike)
    return parent.architecture.replace(**changes, num_hidden_layers=len(layers), layers=layers)


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _cached_logits(model, tokens=TOKENS):
    """The logits of a prefill of all but the last 4 tokens, then 4 one-token steps on the cache."""
    positions = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)  # (Bamba's default ignores the cache)
    with torch.no_grad():
        out = model(input_ids=tokens[:, :-4], position_ids=positions[:, :-4], use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for t in range(tokens.shape[1] - 4, tokens.shape[1]):
            out = model(input_ids=tokens[:, t:t + 1], position_ids=positions[:, t:t + 1], cache=cache,
                        use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_keep_all_equals_the_parent_with_and_without_a_cache(name):
    parent = tiny_model(name)
    child = prune(parent, _importances(parent), Parent.of(parent.config).architecture)
    torch.testing.assert_close(_logits(child), _logits(parent), rtol=0, atol=0)
    cached = _cached_logits(parent)
    torch.testing.assert_close(cached, _logits(parent), rtol=1e-4, atol=1e-4)  # the cache is the recurrence
    torch.testing.assert_close(_cached_logits(child), cached, rtol=0, atol=0)


def _plant_dead_heads(model) -> dict[int, list[int]]:
    """In every recurrent layer, kill one head of each group (Mamba2; Bamba two, so that the kept width is again a
    multiple of hidden_size) or one value head of each key head (DeltaNet): its `out_proj` columns are zero, and
    (Mamba2) its gate z is zero, so that its gated output is zero and adds nothing to its group's RMS either.
    Returns the dead heads by layer."""
    family = family_of(model.config)
    dead = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for path, unit in family.slots(model.config, i):
                if unit is family.mamba:
                    mixer = layer.get_submodule(path)
                    heads, width = mixer.num_heads, mixer.head_dim
                    per_group = heads // mixer.n_groups
                    killed = (1, 2) if unit.expand_key else (1,)
                    dead[i] = [g * per_group + k for g in range(mixer.n_groups) for k in killed]
                    for h in dead[i]:
                        mixer.out_proj.weight[:, h * width:(h + 1) * width] = 0
                        mixer.in_proj.weight[h * width:(h + 1) * width] = 0  # z's rows come first
                        if mixer.in_proj.bias is not None:
                            mixer.in_proj.bias[h * width:(h + 1) * width] = 0
                elif unit is family.deltanet:
                    mixer = layer.get_submodule(path)
                    per_key = mixer.num_v_heads // mixer.num_k_heads
                    dead[i] = [g * per_key for g in range(mixer.num_k_heads)]
                    for h in dead[i]:
                        mixer.out_proj.weight[:, h * mixer.head_v_dim:(h + 1) * mixer.head_v_dim] = 0
    return dead


@pytest.mark.parametrize("name", FAMILIES)
def test_dead_recurrent_heads_score_lowest_and_removing_them_leaves_the_logits_equal(name):
    """Mamba2 removes heads group by group, so its gated norm's RMS (a mean over the group) loses the dead heads'
    zeros: the kept weights are rescaled by sqrt(parent / child group width), which makes the removal exact but for
    the norm's eps (added to the mean, so it does not scale with it: made negligible here; at 1e-5 the logits move
    by 8e-3 on this tiny model, whose activations are small)."""
    eps = {"nemotron_h": "layer_norm_epsilon", "bamba": "rms_norm_eps", "falcon_h1": "rms_norm_eps"}
    parent = tiny_model(name, **{eps[name]: 1e-12}) if name in eps else tiny_model(name)
    dead = _plant_dead_heads(parent)
    assert dead
    importances = _importances(parent)
    for i, heads in dead.items():
        scores = importances.mixer_heads[i]
        alive = [h for h in range(scores.numel()) if h not in heads]
        assert scores[heads].max() < scores[alive].min(), (i, scores)
    family, arch = family_of(parent.config), Parent.of(parent.config).architecture
    if family.mamba:
        heads = family.mamba.heads_key
        cut = arch.replace(**{heads: arch.get(heads) - sum(len(h) for h in dead.values()) // len(dead)})
    else:
        cut = arch.replace(linear_num_value_heads=arch.get("linear_num_value_heads") - 2)
    child = prune(parent, importances, cut)
    # In float64 (the experts' loop, not grouped_mm, which takes no float64): the chunked scans' fp32 rounding
    # differs with the number of heads (4e-5 here). Bamba's and Falcon-H1's gated norms compute in fp32 whatever
    # the model's dtype (1.5e-6 here); a head removed from a group the norm did not treat as above moves them by 1e-2.
    for model in (child, parent):
        model.double().set_experts_implementation("eager")
    torch.testing.assert_close(_logits(child), _logits(parent), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_child_cut_on_every_axis_reloads_as_stock_with_its_kept_layers_kinds_and_generates(name, tmp_path):
    parent = tiny_model(name)
    arch = _cut(parent.config)
    child, reloaded = pruned_and_reloaded(parent, _importances(parent), arch, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in arch.to_dict() if k not in ("layers", "num_hidden_layers")} == \
        {k: v for k, v in arch.to_dict().items() if k not in ("layers", "num_hidden_layers")}
    assert reloaded.config.num_hidden_layers == arch.num_hidden_layers
    assert _pattern(reloaded.config) == [_pattern(parent.config)[i] for i in arch.layers]
    torch.testing.assert_close(_logits(reloaded), _logits(child), rtol=0, atol=0)
    out = reloaded.generate(TOKENS[:1, :8], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)


@pytest.mark.parametrize("name", FAMILIES)
def test_parameter_counts_equal_the_built_models(name):
    parent = tiny_model(name)
    for model in (parent, prune(parent, _importances(parent), _cut(parent.config))):
        assert Parent.of(model.config).num_parameters() == sum(t.numel() for t in model.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_kd_sees_the_models_own_logits(name):
    """Falcon-H1 multiplies its logits by `lm_head_multiplier`: the chunked losses apply it as its forward does."""
    teacher = tiny_model(name)
    assert_kd_sees_the_models_own_logits(teacher, prune(teacher, _importances(teacher), _cut(teacher.config)))


@pytest.mark.parametrize("name", FAMILIES)
def test_streamed_pruning_is_bit_identical_to_in_memory(name, tmp_path):
    """Nemotron-H's checkpoints name the model `backbone`: read under it and written under it."""
    parent = tiny_model(name)
    assert_streamed_equals_in_memory(parent, _importances(parent), _cut(parent.config), tmp_path)
    if name == "nemotron_h":
        names = json.loads((tmp_path / "child" / "model.safetensors.index.json").read_text())["weight_map"]
        assert names and all(k.startswith(("backbone.", "lm_head.")) for k in names)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "falcon_h1"])  # (its layers all hold attention)
def test_a_child_without_an_attention_layer_is_refused(name):
    config = HYBRID_CONFIGS[name]()
    family = family_of(config)
    recurrent = tuple(i for i in range(config.num_hidden_layers) if not family.is_attention(config, i))
    arch = Parent.of(config).architecture.replace(num_hidden_layers=len(recurrent), layers=recurrent)
    with pytest.raises(ArchitectureError, match="keeps no attention layer"):
        family.child_config(config, arch)


def test_uneven_mamba_heads_per_group_are_refused():
    config = HYBRID_CONFIGS["nemotron_h"]()
    arch = Parent.of(config).architecture.replace(mamba_num_heads=5)
    with pytest.raises(ArchitectureError, match="multiple of n_groups=2"):
        family_of(config).child_config(config, arch)


@pytest.mark.parametrize("name", FAMILIES)
def test_planned_activations_equal_a_real_layers_saved_bytes(name):
    """Each kind of layer (recurrent, attention, MLP; dense and sparse) traced on the meta device saves what the
    real layer saves on the kernels' torch path."""
    from test_plan import _real_saved_bytes
    from nas.plan import layer_kinds, saved_bytes_per_layer

    config = HYBRID_CONFIGS[name]()
    kinds = layer_kinds(config)
    assert len(kinds) == {"nemotron_h": 3, "qwen3_next": 3, "qwen3_5_text": 2, "bamba": 2, "falcon_h1": 1}[name]
    for i in kinds:
        assert saved_bytes_per_layer(config, 3, 24, torch.float32, i) == _real_saved_bytes(config, 3, 24, i), i


@pytest.mark.parametrize("name", ["nemotron_h", "qwen3_next"])
def test_cli_arch_importance_prune_and_candidates(name, tmp_path, tiny_tokenizer, text_file, capsys):
    """The Bar: `nas arch` (the recurrent axes under the family's keys, and the layers of each kind), `nas
    importance`, `nas prune` keep-all (the parent) and with half the recurrent heads and one recurrent layer
    dropped (chosen by importance among that kind: a stock checkpoint whose pattern is the kept layers' kinds), and
    `nas candidates` over recurrent heads and the recurrent layers kept, every attention layer kept."""
    from nas.importance import Importances
    from nas.space import kept_layers

    parent = tiny_model(name)
    parent.save_pretrained(tmp_path / "parent")
    tiny_tokenizer.save_pretrained(tmp_path / "parent")
    p = str(tmp_path / "parent")
    family = family_of(parent.config)
    heads = family.recurrent.keys[0]
    assert main(["arch", "--parent", p, "--out", str(tmp_path / "keep.json")]) == 0
    keep = json.loads(capsys.readouterr().out)
    kind = f"layers.{family.depth_kind(parent.config, 0)}"  # a recurrent layer's kind (Qwen3-Next: and sparse)
    recurrent = sum(family.depth_kind(parent.config, i) == kind[7:] for i in range(parent.config.num_hidden_layers))
    assert keep[heads] == getattr(parent.config, heads) and keep[kind] == recurrent > 1
    imp = str(tmp_path / "imp.safetensors")
    assert main(["importance", "--parent", p, "--data", str(text_file), "--seq-len", "32", "--samples", "8",
                 "--drop-samples", "2", "--out", imp, "--device", "cpu"]) == 0
    assert main(["prune", "--parent", p, "--arch", str(tmp_path / "keep.json"), "--importance", imp,
                 "--out", str(tmp_path / "same")]) == 0
    same = AutoModelForCausalLM.from_pretrained(tmp_path / "same").eval()
    torch.testing.assert_close(_logits(same), _logits(parent), rtol=1e-5, atol=1e-5)
    cut = {k: v for k, v in keep.items() if k not in ("layers", "num_hidden_layers")}
    cut.update({heads: keep[heads] // 2, kind: recurrent - 1})
    if family.deltanet:
        cut["linear_num_key_heads"] = 1
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    assert main(["prune", "--parent", p, "--arch", str(tmp_path / "cut.json"), "--importance", imp,
                 "--out", str(tmp_path / "cut")]) == 0
    saved = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert saved[heads] == keep[heads] // 2
    layers = kept_layers(cut, parent.config, Importances.load(imp), "bi")
    assert len(layers) == parent.config.num_hidden_layers - 1
    child = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").eval()
    assert type(child) is type(parent)
    assert _pattern(child.config) == [_pattern(parent.config)[i] for i in layers]
    assert child.generate(TOKENS[:1, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                          pad_token_id=0).shape == (1, 12)
    capsys.readouterr()
    space = {"name": "hybrid", "parent": p, "budget": {"fraction": 0.85, "tolerance": 0.15},
             "axes": {heads: [keep[heads] // 2, keep[heads]], "kept_layers": {kind[7:]: [recurrent - 1, recurrent]}}}
    (tmp_path / "space.yaml").write_text(json.dumps(space))
    assert main(["candidates", str(tmp_path / "space.yaml")]) == 0
    out = capsys.readouterr().out
    rows = enumerate_candidates(parse_space(space), parent.config)
    assert rows and all(r["label"] in out and f"{r['params']:,}" in out for r in rows)
    attention = [k for k in rows[0] if k.startswith("layers.full_attention")]
    assert attention and all(r[k] == keep[k] for r in rows for k in attention)  # every attention layer kept
    assert {r[kind] for r in rows} == {recurrent - 1, recurrent}


def test_the_recurrent_state_is_counted_in_fp32_beside_a_bf16_cache():
    """In a bf16 model the conv windows are bf16 and the SSM / DeltaNet states fp32 (the scans keep them so): the
    count at 2 bytes an element is the cache a bf16 generate builds."""
    from test_deploy import _cache_tensors

    for name in ("nemotron_h", "qwen3_5_text"):
        model = tiny_model(name).to(torch.bfloat16)
        out = model.generate(TOKENS[:2, :12], max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0,
                             cache_implementation="static", return_dict_in_generate=True)
        tensors = [t for layer in out.past_key_values.layers for t in _cache_tensors(layer)]
        assert {t.dtype for t in tensors} == {torch.bfloat16, torch.float32}
        built = sum(t.numel() * t.element_size() for t in tensors)
        assert Parent.of(model.config).cache_bytes(Parent.of(model.config).architecture, 14, 2, nbytes=2) == built


def test_the_nemotron_h_8b_space_holds_the_minitron_ssm_4b():
    """The shipped Nemotron-H 8B space: its inline config builds HF's 8,100,852,736-parameter model (the published
    checkpoint's count), and Minitron-SSM's 4B (hidden 3072, MLP 12288, 112 Mamba heads of 64, all 52 layers) is a
    candidate whose count is HF's build of its config."""
    from conftest import ROOT
    from nas.space import load_space, space_config

    space = load_space(ROOT / "search_spaces" / "nemotron-h-8b-to-4b.yaml")
    config = space_config(space)

    def built(c) -> int:
        with torch.device("meta"):
            return sum(t.numel() for t in AutoModelForCausalLM.from_config(c).parameters())

    assert built(config) == Parent.of(config).num_parameters() == 8_100_852_736
    rows = {r["label"]: r for r in enumerate_candidates(space, config)}
    row = rows["L52-H32-KV8-M12288-E3072-MH112-MD64-LA4-LR24-LF24"]
    child = family_of(config).child_config(config, Parent.of(config).child(
        {"hidden_size": 3072, "intermediate_size": 12288, "mamba_num_heads": 112}))
    assert row["params"] == built(child)


@pytest.mark.slow
def test_two_fsdp_workers_reproduce_one_on_a_hybrid(tmp_path, tiny_tokenizer, ray_session):
    """FSDP2 shards a hybrid's layers (Mamba2, attention and MLP units) over 2 gloo workers, and the KD run of a
    child cut on every axis equals the one-process run."""
    parent = tiny_model("nemotron_h")
    assert_two_fsdp_workers_reproduce_one(parent, _cut(parent.config), tmp_path, tiny_tokenizer, 6)


def test_a_qwen3_5_vision_language_checkpoint_is_pruned_as_its_text_decoder(tmp_path, tiny_tokenizer):
    """transformers ships Qwen3.5 as a vision-language model: its config reads as the text decoder's, the
    `model.language_model.*` weights load into `Qwen3_5ForCausalLM` (the vision tower is left out), and streamed
    pruning of the checkpoint gives the in-memory child of that text model, saved as a `qwen3_5_text` checkpoint."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from nas.parents import load_parent, parent_config
    from nas.prune import prune_checkpoint

    text = tiny_model("qwen3_5_text")
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=48, patch_size=4,
                  spatial_merge_size=1, temporal_patch_size=1)
    vl = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text.config.to_dict(), vision_config=vision))
    vl.model.language_model.load_state_dict(text.model.state_dict())
    vl.lm_head.load_state_dict(text.lm_head.state_dict())
    vl.save_pretrained(tmp_path / "parent")
    tiny_tokenizer.save_pretrained(tmp_path / "parent")
    assert parent_config(str(tmp_path / "parent")).model_type == "qwen3_5_text"
    model, _ = load_parent(str(tmp_path / "parent"), torch.device("cpu"), torch.float32)
    assert type(model) is type(text)
    for key, tensor in text.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    importances, arch = _importances(model), _cut(model.config)
    expected = prune(model, importances, arch).state_dict()
    prune_checkpoint(tmp_path / "parent", importances, arch, tmp_path / "child")
    assert json.loads((tmp_path / "child" / "config.json").read_text())["model_type"] == "qwen3_5_text"
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "child").state_dict()
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


@pytest.mark.slow
def test_a_search_over_recurrent_heads_and_layer_kinds_records_them_and_exports_the_winner(tmp_path, tiny_tokenizer,
                                                                                          ray_session):
    """`nas search` on a tiny Nemotron-H over its Mamba heads and the Mamba layers kept (every attention and MLP
    layer kept): the axes are Optuna parameters under the family's keys and `layers.<kind>`, each trial's
    architecture.json keeps that many layers of each kind (chosen by importance) and its count is that child's,
    and the exported winner is a checkpoint whose pattern is its kept layers' kinds."""
    import optuna

    from conftest import WIKITEXT
    from nas.architecture import Architecture
    from nas.search import export_best, run_search, storage_url

    parent = tiny_model("nemotron_h")
    parent.save_pretrained(tmp_path / "parent")
    tiny_tokenizer.save_pretrained(tmp_path / "parent")
    (tmp_path / "data.txt").write_text((WIKITEXT / "valid.txt").read_text()[:120_000])
    space = parse_space({
        "name": "hybrid", "parent": str(tmp_path / "parent"), "data": str(tmp_path / "data.txt"), "seq_len": 32,
        "budget": {"fraction": 0.85, "tolerance": 0.1},
        "axes": {"mamba_num_heads": [4, 8], "kept_layers": {"linear_attention": [1, 2]}},
        "importance": {"samples": 8},
        "short_retrain": {"tokens": 4 * 32 * 2, "batch_size": 4, "lr": 1e-3, "reports": 1},
        "full_retrain": {"tokens": 4 * 32 * 2, "batch_size": 4, "lr": 1e-3, "reports": 1},
        "promote": 1, "search": {"sampler": "grid"}, "resources": {"cpus_per_trial": 1, "max_concurrent": 2}})
    rows = enumerate_candidates(space, parent.config)
    assert {(r["mamba_num_heads"], r["layers.linear_attention"]) for r in rows} == {(4, 1), (4, 2), (8, 1)}
    frame = run_search(space, tmp_path / "runs", echo=lambda line: None)
    study = optuna.load_study(study_name="hybrid", storage=storage_url(space, tmp_path / "runs"))
    short = [t for t in study.get_trials() if t.user_attrs.get("stage") == "short_retrain"]
    assert len(short) == len(rows) and all(t.state == optuna.trial.TrialState.COMPLETE for t in short)
    p, pattern = Parent.of(parent.config), _pattern(parent.config)
    for t in short:
        arch = Architecture.from_dict(json.loads((tmp_path / "runs" / "hybrid" / t.user_attrs["label"] /
                                                  "architecture.json").read_text()))
        kinds = [pattern[i] for i in arch.layers]
        assert kinds.count("linear_attention") == t.params["layers.linear_attention"]
        assert kinds.count("full_attention") == 1 and kinds.count("mlp") == 2
        assert arch.get("mamba_num_heads") == t.params["mamba_num_heads"]
        assert t.user_attrs["params"] == p.num_parameters(arch)
    assert {"mamba_num_heads", "layers.linear_attention"} <= set(frame.columns)
    best = export_best("hybrid", storage_url(space, tmp_path / "runs"), tmp_path / "best.json", tmp_path / "winner",
                       root=tmp_path / "runs")
    winner = AutoModelForCausalLM.from_pretrained(tmp_path / "winner")
    assert winner.config.mamba_num_heads == best["mamba_num_heads"]
    assert _pattern(winner.config) == [pattern[i] for i in best["layers"]]


def test_layer_kind_counts_keep_the_kinds_left_out_and_name_a_wrong_kind():
    """Counts of some kinds (as an edited `nas arch` JSON gives them, its `num_hidden_layers` left stale): every
    other kind keeps all its layers and the depth is their sum; a kind the parent lacks, or too many of one, is one
    clear error; and `block` layer selection, which drops one contiguous block, is refused beside them."""
    from nas.architecture import KIND_AXIS
    from nas.errors import ConfigError
    from nas.space import kept_layers

    config = HYBRID_CONFIGS["nemotron_h"]()
    importances = _importances(tiny_model("nemotron_h"))
    layers = kept_layers({"num_hidden_layers": 5, f"{KIND_AXIS}mlp": 1}, config, importances, "bi")
    assert [_pattern(config)[i] for i in layers].count("mlp") == 1 and len(layers) == 4
    assert {0, 2, 3} <= set(layers)  # both Mamba layers and the attention layer
    for counts, says in (({"layers.moe": 1}, "no moe layers"), ({"layers.mlp": 3}, "has 2 mlp layers")):
        with pytest.raises(ArchitectureError, match=says):
            kept_layers(counts, config, importances, "bi")
    with pytest.raises(ConfigError, match="layer_method='block'"):
        parse_space({"name": "s", "parent": "x", "budget": {"fraction": 0.8},
                     "importance": {"layer_method": "block", "drop_samples": 2},
                     "axes": {"kept_layers": {"mlp": [1]}}})


def test_lists_as_long_as_the_layers_that_are_not_per_layer_are_kept_whole():
    """Falcon-H1's five muP multipliers of the Mamba sections in a five-layer parent are not its layers': a
    four-layer child keeps all five and builds."""
    config = HYBRID_CONFIGS["falcon_h1"](num_hidden_layers=5)
    arch = Parent.of(config).architecture.replace(num_hidden_layers=4, layers=(0, 1, 2, 4))
    child = family_of(config).child_config(config, arch)
    assert child.ssm_multipliers == config.ssm_multipliers and child.num_hidden_layers == 4
    AutoModelForCausalLM.from_config(child)


@pytest.mark.parametrize("name", FAMILIES)
def test_kd_captures_each_layers_residual_stream_after_the_final_norm(name):
    """The intermediate-state KD loss reads the embeddings and chosen layers' outputs, after the final norm, by the
    family's own module names (Nemotron-H: `embeddings`, `norm_f`): the layers' equal HF's own hidden states put
    through that norm; the embeddings' point the same way (the loss is a cosine), Falcon-H1 multiplying its
    embeddings by `embedding_multiplier` after the embedding module."""
    from nas.distill import capture_states

    model = tiny_model(name)
    layers = [0, model.config.num_hidden_layers - 2]
    with torch.no_grad(), capture_states(model, layers) as states:
        out = model(input_ids=TOKENS, output_hidden_states=True)
    norm = model.get_submodule(family_of(model.config).final_norm)
    with torch.no_grad():
        expected = [norm(out.hidden_states[0]), *(norm(out.hidden_states[i + 1]) for i in layers)]
    assert len(states) == len(expected) == 3
    cosine = torch.nn.functional.cosine_similarity(states[0], expected[0], dim=-1)
    assert float(cosine.min()) > 0.9999
    for got, want in zip(states[1:], expected[1:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
