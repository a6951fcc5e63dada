"""Search over per-layer children (nas.search.per_layer): the space's per-layer fields, the candidates the program
assembles against built children's real counts, and a per-layer search end to end on a tiny Llama under Ray."""

import itertools
import json
import random
import sys

import optuna
import pytest
import ray.cloudpickle as cloudpickle
import torch

from conftest import tiny_model, tiny_space
from nas.architecture import Architecture, LayerShape
from nas.errors import ConfigError
from nas.families import Parent
from nas.importance import ImportanceSettings, compute_importance
from nas.loader import load
from nas.prune import prune
from nas.search import export_best, run_search, storage_url
from nas.search.per_layer import assemble_candidates, chosen_variants, strips
from nas.search.preparation import candidates
from nas.space import parse_space
from nas.storage import RunStorage

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/

PER_LAYER = {"kv_heads": [1], "mlp_widths": [40], "skip_attention": True, "skip_mlp": True, "candidates": 3,
             "min_distance": 2}


def _space(root, tokenizer, per_layer=PER_LAYER, **overrides):
    """The tiny space in per-layer mode, its uniform candidates beside (unless `per_layer` says otherwise)."""
    return parse_space(tiny_space(root, tokenizer, per_layer={"uniform": True, **per_layer}, **overrides))


@pytest.mark.parametrize("per_layer, extra, message", [
    ({"kv_heads": [0]}, {}, "per_layer.kv_heads=[0]: must be a list of positive integers"),
    ({"mlp_widths": [40], "skip_mlp": "yes"}, {}, "per_layer.skip_mlp='yes': must be true or false"),
    ({"candidates": 4}, {}, "per_layer: give kv_heads, mlp_widths, skip_attention or skip_mlp"),
    ({"mlp_widths": [40], "min_distance": 0}, {}, "per_layer.min_distance=0: must be >= 1"),
    ({"mlp_widths": [40], "widths": [3]}, {}, "per_layer.widths: unknown field"),
    ({"mlp_widths": [40], "samples": 9}, {}, "per_layer.samples=9: the block scores read the calibration"),
    ({"mlp_widths": [40]}, {"search": {"objectives": ["val_loss", "latency_ms"]}},
     "search.objectives=['val_loss', 'latency_ms']: per-layer children are ranked by loss alone"),
    ({"mlp_widths": [40]}, {"search": {"sampler": "tpe"}}, "search.sampler='tpe': per-layer candidates are the"),
    ({"mlp_widths": [40], "uniform": False}, {}, "axes: per_layer.uniform is false, so no uniform candidate"),
])
def test_the_space_refuses_bad_per_layer_fields_in_one_line(tmp_path, tiny_tokenizer, per_layer, extra, message):
    with pytest.raises(ConfigError) as e:
        _space(tmp_path, tiny_tokenizer, per_layer=per_layer, **extra)
    assert "1 problem(s)" in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("per_layer, message", [
    ({"kv_heads": [2]}, "per_layer.kv_heads=[2]: [2] not below the parent's 2 KV heads"),
    ({"kv_heads": [4]}, "[4] not below the parent's 2 KV heads or not dividing its 6 query heads"),
    ({"mlp_widths": [80]}, "per_layer.mlp_widths=[80]: [80] not below the parent's MLP width 80"),
])
def test_widths_the_parent_does_not_have_are_refused_before_anything_runs(tmp_path, tiny_tokenizer, per_layer,
                                                                          message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        candidates(_space(tmp_path, tiny_tokenizer, per_layer=per_layer))


def _hamming(a: Architecture, b: Architecture) -> int:
    """Blocks (a layer's attention, a layer's MLP) whose widths differ between two full-depth children."""
    return sum((x.num_key_value_heads != y.num_key_value_heads) + (x.intermediate_size != y.intermediate_size)
               for x, y in zip(a.layer_shapes, b.layer_shapes))


@pytest.mark.parametrize("name, budget", [
    *(("llama", b) for b in ({"fraction": 0.6, "tolerance": 0.25},
                             {"fraction": 0.5, "tolerance": 0.1, "kind": "non_embedding"},
                             {"memory_gb": 4.6e-4, "context": 64, "batch": 2, "bytes_per_param": 4})),
    ("gemma3_text", {"memory_gb": 3.5e-4, "context": 64, "batch": 2, "bytes_per_param": 4})])
def test_the_candidates_are_the_best_children_under_the_budget_by_the_built_childs_counts(tmp_path, tiny_tokenizer,
                                                                                         name, budget):
    """(Gemma 3's tiny layers are sliding, full, sliding, full, with a window of 8 tokens: a sliding layer's cache
    holds 8 of the 64-token context.)"""
    space = _space(tmp_path, tiny_tokenizer, budget=budget)
    model = tiny_model(name)
    parent = Parent.of(model.config)
    rng = random.Random(0)
    chosen = chosen_variants(space, parent)
    scores = {v.name: {"kl": rng.uniform(0, 1), "lm_loss": 0.0} for v in chosen}
    storage = RunStorage(tmp_path / "run", "tiny")
    rows = assemble_candidates(space, model.config, scores, storage)
    importances = compute_importance(model, torch.randint(0, 320, (4, 16)), ImportanceSettings(batch_size=4))

    def real(arch):  # the reference: the child pruned from the parent, its tensors counted
        child = prune(model, importances, arch)
        n = sum(p.numel() for p in child.parameters())
        return n, n - child.get_input_embeddings().weight.numel() - (
            0 if model.config.tie_word_embeddings else child.get_output_embeddings().weight.numel())

    types = getattr(model.config, "layer_types", None) or ["full_attention"] * 4
    window = getattr(model.config, "sliding_window", None)

    def kv_bytes(arch, context, batch, nbytes):  # each attention layer's own keys and values, a window's at most
        held = [min(window, context) if t == "sliding_attention" else context for t in types]
        return 2 * batch * nbytes * arch.head_dim * sum(n * s.num_key_value_heads
                                                        for n, s in zip(held, arch.layer_shapes))

    b = space.budget
    whole, without = real(parent.architecture)
    target = (b.fraction * (without if b.kind == "non_embedding" else whole)) if b.fraction else None
    archs = []
    for row in rows:
        arch = Architecture.from_dict({**parent.architecture.to_dict(), "per_layer_config": row["per_layer_config"]})
        assert arch.short() == row["label"] and not arch.is_uniform
        total, non_embedding = real(arch)
        assert row["params"] == total
        if target:
            counted = non_embedding if b.kind == "non_embedding" else total
            assert target * (1 - b.tolerance) <= counted <= target * (1 + b.tolerance)
        else:
            assert total * b.bytes_per_param + kv_bytes(arch, b.context, b.batch, b.cache_bytes) <= b.memory_gb * 2**30
        archs.append(arch)
    assert 1 <= len(rows) <= 3
    assert all(_hamming(a, c) >= 2 for a, c in itertools.combinations(archs, 2))
    # The best is the lowest summed score of every child in the budget (brute force over the 3^8 tables).
    record = storage.read_json("per_layer.json")["solutions"]
    best = min(record, key=lambda s: s["score"])
    assert best["label"] == rows[0]["label"]
    options = {"attention": [2, 1, 0], "mlp": [80, 40, 0]}
    layers = parent.architecture.num_hidden_layers
    scored = []
    for table in itertools.product(*([[(kv, m) for kv in options["attention"] for m in options["mlp"]]] * layers)):
        arch = parent.architecture.replace(per_layer=tuple(LayerShape(kv, m) for kv, m in table))
        # (the exact count, held to built children in tests/test_per_layer.py; building 3^8 children is slow)
        total = parent.num_parameters(arch)
        non_embedding = total - parent.embedding_parameters()
        if target:
            counted = non_embedding if b.kind == "non_embedding" else total
            if not target * (1 - b.tolerance) <= counted <= target * (1 + b.tolerance):
                continue
        elif total * b.bytes_per_param + kv_bytes(arch, b.context, b.batch, b.cache_bytes) > b.memory_gb * 2**30:
            continue
        score = sum(scores[f"{i}.attention={kv or 'none'}"]["kl"] if kv != 2 else 0 for i, (kv, _) in enumerate(table))
        score += sum(scores[f"{i}.mlp={m or 'none'}"]["kl"] if m != 80 else 0 for i, (_, m) in enumerate(table))
        scored.append(score)
    assert best["score"] == pytest.approx(min(scored))


def test_strips_show_each_parent_layers_widths():
    arch = Parent.of(tiny_model("llama").config).architecture
    child = arch.replace(per_layer=(LayerShape(0, 80), LayerShape(2, 0), LayerShape(1, 40), LayerShape(2, 64)))
    assert strips(child, arch) == {"kv_heads": "·212", "mlp": "█·▄▇"}
    shallow = arch.replace(num_hidden_layers=3, layers=(0, 2, 3), intermediate_size=40)
    assert strips(shallow, arch) == {"kv_heads": "2·22", "mlp": "▄·▄▄"}


@pytest.mark.slow
def test_a_per_layer_search_trains_the_assemblys_children_and_reuses_its_block_scores(ray_session, tmp_path,
                                                                                     tiny_tokenizer):
    space = _space(tmp_path, tiny_tokenizer, 
                   axes={"num_hidden_layers": [3], "num_attention_heads": [6], "intermediate_size": [80, 40],
                         "hidden_size": [48]})
    lines = []
    frame = run_search(space, tmp_path, echo=lines.append)
    folder = tmp_path / space.study
    solutions = json.loads((folder / "per_layer.json").read_text())["solutions"]
    assert len(solutions) == 3
    study = optuna.load_study(study_name=space.study, storage=storage_url(space, tmp_path))
    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE
            and t.user_attrs.get("stage") == "short_retrain"]
    per_layer = {t.user_attrs["label"] for t in done if t.params["per_layer"]}
    assert per_layer == {s["label"] for s in solutions}
    assert any(not t.params["per_layer"] for t in done)  # the uniform candidates beside them
    for t in done:  # each trial's architecture.json holds its table: the assembly's, exactly
        arch = json.loads((folder / t.user_attrs["label"] / "architecture.json").read_text())
        if t.params["per_layer"]:
            [solution] = [s for s in solutions if s["label"] == t.user_attrs["label"]]
            assert arch["per_layer_config"] == solution["per_layer_config"]
    [full] = [t for t in study.get_trials() if t.user_attrs.get("stage") == "full_distillation"]
    promoted = folder / "promoted" / full.user_attrs["label"]
    arch = json.loads((promoted / "architecture.json").read_text())
    config = json.loads((promoted / "model" / "config.json").read_text())
    assert config.get("per_layer_config", {}) == arch.get("per_layer_config", {})
    assert sum(p.numel() for p in load(promoted / "model").parameters()) == arch["params"]
    assert set(frame.columns) >= {"kv_heads", "mlp"} and (folder / "layers.png").stat().st_size > 1000
    best = export_best(space.study, storage_url(space, tmp_path), tmp_path / "best.json", root=tmp_path)
    parent = Parent.of(load(space.parent).config).architecture
    assert best["strips"] == strips(Architecture.from_dict(best), parent)
    uniform = best["uniform_winner"]
    assert "-P" not in uniform["label"] and uniform["strips"]["kv_heads"] in ("2222", "222·", "22·2", "2·22", "·222")
    # Re-run: nothing is trained again, and the block scores are the file the first run wrote.
    scores = (folder / "block_scores.json").read_text()
    mtime = (folder / "block_scores.json").stat().st_mtime_ns
    again = []
    run_search(space, tmp_path, echo=again.append)
    assert (folder / "block_scores.json").stat().st_mtime_ns == mtime
    assert (folder / "block_scores.json").read_text() == scores
    assert any("0 trials to run" in line for line in again)
