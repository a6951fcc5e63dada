"""Per-layer searches under a speed budget (nas.search.block_latency): each block variant's measured cost, the
program's cap on their sum, the whole children timed after it; the block scores kept in the importance cache
across studies; and `nas candidates` listing the program's children."""

import itertools
import json
import random
import sys
from dataclasses import asdict

import pytest
import ray.cloudpickle as cloudpickle
import torch
import yaml

from conftest import tiny_model, tiny_space
from nas.architecture import Architecture, LayerShape
from nas.cli import main
from nas.errors import ConfigError
from nas.families import Parent
from nas.importance import ImportanceSettings, cached_importance
from nas.search.block_latency import block_latency, variant_key
from nas.search.per_layer import block_widths, cached_block_scores, chosen_variants
from nas.search.preparation import _per_layer_rows, prepare
from nas.space import parse_space
from nas.storage import RunStorage

PER_LAYER = {"kv_heads": [1], "mlp_widths": [40], "skip_attention": True, "skip_mlp": True, "candidates": 3,
             "min_distance": 2}
SPEED = {"context": 16, "batch": 1, "decode_tokens": 2, "warmup": 1, "repeats": 1}
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the stand-in timer runs in Ray workers


def _space(root, tokenizer, budget, **per_layer):
    """The tiny space in per-layer mode (its uniform candidates beside) under `budget` alone."""
    spec = tiny_space(root, tokenizer, per_layer={**PER_LAYER, "uniform": True, **per_layer})
    return parse_space({**spec, "budget": budget})


def test_each_variants_cost_is_its_stacks_measured_difference_and_a_rerun_times_nothing(tmp_path, tiny_tokenizer,
                                                                                         monkeypatch):
    import nas.latency

    space = _space(tmp_path, tiny_tokenizer, {"latency_ms": 1e6, **SPEED})
    config = tiny_model("llama").config
    parent = Parent.of(config)
    storage, lines = RunStorage(tmp_path / "run", "tiny"), []
    record = block_latency(space, config, block_widths(space, parent), storage, lines.append)
    assert set(record["variants"]) == {"attention=1", "attention=none", "mlp=40", "mlp=none"}
    assert len(lines) == 6 and len(storage.listdir("latency")) == 6  # the parent, depth 1, and a stack a variant
    # The reference: each model's own figures, as timed (latency/), and the parent's depth (4).
    timed = {json.loads((storage.local / "latency" / name).read_text())["label"].split(" (")[1][:-1]:
             json.loads((storage.local / "latency" / name).read_text()) for name in storage.listdir("latency")}
    for name, cost in record["variants"].items():
        assert cost["latency_ms"] == pytest.approx((timed[name]["latency_ms"] - timed["parent"]["latency_ms"]) / 3)
    assert record["fixed"]["prefill_ms"] + record["layer"]["prefill_ms"] == \
        pytest.approx(timed["depth 1"]["prefill_ms"])
    assert record["fixed"]["prefill_ms"] + 4 * record["layer"]["prefill_ms"] == \
        pytest.approx(timed["parent"]["prefill_ms"])

    def refuse(*_args):
        raise AssertionError("measured again")

    monkeypatch.setattr(nas.latency, "measure", refuse)
    again = []
    assert block_latency(space, config, block_widths(space, parent), storage, again.append) == record and not again
    # Other settings: timed again (the cache's key holds them).
    wider = _space(tmp_path, tiny_tokenizer, {"latency_ms": 1e6, **SPEED, "context": 24})
    with pytest.raises(AssertionError, match="measured again"):
        block_latency(wider, config, block_widths(wider, parent), storage, again.append)


def _fake_measure(data, settings):
    """A stand-in timing that adds up over blocks exactly: a millisecond plus one per 10,000 parameters of the
    model built from `data` (prefill: ten times that), so the tests below check the program, not the machine."""
    from nas.latency import timed_model

    n = sum(p.numel() for p in timed_model(data, settings).parameters())
    latency = 1 + n / 1e4
    return {"latency_ms": latency, "prefill_ms": 10 * latency, "throughput": 1000 / latency, "device_name": "fake",
            "machine": "fake", "settings": asdict(settings)}


@pytest.mark.parametrize("cap", [{"latency_ms": 0.8}, {"throughput": 1000 / 0.8}, {"prefill_ms": 8}])
def test_the_programs_children_stay_under_the_speed_cap_timed_whole(tmp_path, tiny_tokenizer, monkeypatch, cap):
    import nas.latency

    monkeypatch.setattr(nas.latency, "measure", _fake_measure)
    model = tiny_model("llama")
    parent = Parent.of(model.config)
    whole = 1 + parent.num_parameters() / 1e4  # the parent's fake latency; the cap: 80% of it (prefill: of 10x)
    budget = {key: value * whole for key, value in cap.items()} if "throughput" not in cap else \
        {"throughput": cap["throughput"] / whole}
    space = _space(tmp_path, tiny_tokenizer, {**budget, **SPEED})
    rng = random.Random(0)
    scores = {v.name: {"kl": rng.uniform(0, 1), "lm_loss": 0.0} for v in chosen_variants(space, parent)}
    storage, lines = RunStorage(tmp_path / "run", "tiny"), []
    rows = _per_layer_rows(space, model.config, scores, storage, lines.append)
    program = storage.read_json("per_layer.json")
    limit = 0.8 * whole
    assert 1 <= len(rows) <= 3
    for row, solution in zip(rows, program["solutions"]):
        arch = Architecture.from_dict({**parent.architecture.to_dict(), "per_layer_config": row["per_layer_config"]})
        # The reference: the child's own model, built and counted.
        from nas.latency import SpeedSettings, timed_model

        built = 1 + sum(p.numel() for p in timed_model(parent.child_config(arch).to_dict(),
                                                       SpeedSettings()).parameters()) / 1e4
        assert row["latency_ms"] == pytest.approx(built) and built <= limit * (1 + 1e-9)
        assert solution["measured"]["latency_ms"] == pytest.approx(built)
        # The program's sum of the variants' costs is the whole child's figure: the fake adds up over blocks.
        for key, value in solution["costs"].items():
            if key in ("latency_ms", "prefill_ms"):
                assert value == pytest.approx(built * (10 if key == "prefill_ms" else 1))
    # The best is the least summed score of every child within the cap (brute force over the 3^8 tables).
    options = [(kv, m) for kv in (2, 1, 0) for m in (80, 40, 0)]
    best = []
    for table in itertools.product(*[options] * 4):
        if all(kv == 0 for kv, _ in table):  # (HF's cache needs an attention layer: such a child is never timed)
            continue
        arch = parent.architecture.replace(per_layer=tuple(LayerShape(kv, m) for kv, m in table))
        if 1 + parent.num_parameters(arch) / 1e4 > limit:
            continue
        best.append(sum(scores[f"{i}.attention={kv or 'none'}"]["kl"] for i, (kv, _) in enumerate(table) if kv != 2)
                    + sum(scores[f"{i}.mlp={m or 'none'}"]["kl"] for i, (_, m) in enumerate(table) if m != 80))
    assert program["solutions"][0]["score"] == pytest.approx(min(best))
    assert min(best) > 0  # the cap binds: the parent itself (score 0) is over it


def test_a_one_layer_parent_is_refused_a_per_layer_speed_budget_in_one_line(tmp_path, tiny_tokenizer):
    space = _space(tmp_path, tiny_tokenizer, {"latency_ms": 5.0, **SPEED})
    parent = Parent.of(tiny_model("llama").config)
    config = parent.child_config(parent.architecture.replace(num_hidden_layers=1, layers=(0,)))
    with pytest.raises(ConfigError, match="times variants in all layers but the first") as e:
        block_latency(space, config, [("mlp", 40)], RunStorage(tmp_path / "run", "tiny"))
    assert "\n" not in str(e.value)


def test_a_second_study_reads_the_block_scores_from_the_importance_cache(tmp_path, tiny_tokenizer, monkeypatch):
    import nas.search.per_layer

    monkeypatch.setenv("NAS_CACHE", str(tmp_path / "cache"))
    calls = []
    real = nas.search.per_layer.block_scores
    monkeypatch.setattr(nas.search.per_layer, "block_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    space = _space(tmp_path, tiny_tokenizer, {"fraction": 0.6, "tolerance": 0.25}, samples=4)
    model = tiny_model("llama")
    calibration = torch.randint(0, 320, (8, 16), generator=torch.Generator().manual_seed(0))
    importances = cached_importance(model, calibration, tmp_path / "importance.safetensors",
                                    ImportanceSettings(batch_size=4))
    first = cached_block_scores(model, importances, calibration, space, RunStorage(tmp_path / "a", "tiny"))
    second = cached_block_scores(model, importances, calibration, space, RunStorage(tmp_path / "b", "tiny"))
    assert len(calls) == 1 and second == first
    assert RunStorage(tmp_path / "b", "tiny").read_json("block_scores.json") == first
    other = _space(tmp_path, tiny_tokenizer, {"fraction": 0.6, "tolerance": 0.25}, samples=3)
    cached_block_scores(model, importances, calibration, other, RunStorage(tmp_path / "c", "tiny"))
    assert len(calls) == 2  # other sequences: computed


def test_nas_candidates_lists_the_programs_children_from_the_importance_cache(tmp_path, tiny_tokenizer,
                                                                               monkeypatch, capsys):
    spec = tiny_space(tmp_path, tiny_tokenizer, per_layer={**PER_LAYER, "uniform": True, "samples": 4})
    # A line of this run's own: the data's fingerprint, and so the cache keys, are new in any cache.
    with open(spec["data"], "a") as f:
        f.write(f"\n{tmp_path.name} {random.random()}\n")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(spec))
    space = str(tmp_path / "space.yaml")
    monkeypatch.setenv("NAS_CACHE", str(tmp_path / "cache-a"))
    assert main(["candidates", "--json", space]) == 0
    out = capsys.readouterr()
    listed = json.loads(out.out)
    assert listed and not any("per_layer_config" in c for c in listed)  # the uniform ones only
    [line] = [line for line in out.err.splitlines() if line.startswith("per_layer:")]
    assert "--block-scores" in line and "no block scores" in line
    assert main(["candidates", "--json", "--block-scores", space]) == 0
    computed = [c["label"] for c in json.loads(capsys.readouterr().out) if "per_layer_config" in c]
    # The reference: a study's own children (its preparation, in another cache: the one its Ray workers were given,
    # the suite's), which the listing then reads.
    monkeypatch.undo()
    shared = prepare(parse_space(spec), tmp_path / "trials")
    study = [s["label"] for s in json.loads((tmp_path / "trials" / "tiny" / "per_layer.json").read_text())
             ["solutions"]]
    assert computed == study and len(study) == 3 and set(study) <= set(shared.rows)
    assert main(["candidates", space]) == 0
    text = capsys.readouterr().out
    assert all(label in text for label in study) and "kv_heads" in text


@pytest.mark.slow
def test_a_per_layer_search_under_a_latency_budget_times_its_children_and_a_rerun_times_nothing(ray_session,
                                                                                              tmp_path,
                                                                                              tiny_tokenizer):
    from nas.search import run_search

    spec = tiny_space(tmp_path, tiny_tokenizer, per_layer={**PER_LAYER, "candidates": 2})
    space = parse_space({**spec, "axes": {}, "promote": 0,
                         "budget": {"fraction": 0.6, "tolerance": 0.25, "latency_ms": 1e6, **SPEED}})
    lines = []
    run_search(space, tmp_path, echo=lines.append)
    folder = tmp_path / space.study
    assert any(line.startswith("[block latency") for line in lines)
    record = json.loads((folder / "block_latency.json").read_text())
    assert set(record["variants"]) == {"attention=1", "attention=none", "mlp=40", "mlp=none"}
    solutions = json.loads((folder / "per_layer.json").read_text())["solutions"]
    assert len(solutions) == 2 and all(s["measured"]["latency_ms"] > 0 for s in solutions)
    # Each child timed whole is a file of latency/ holding its label (the variants' models are labelled apart).
    timed = {json.loads(p.read_text())["label"] for p in (folder / "latency").iterdir()}
    assert {s["label"] for s in solutions} <= timed and all("-P" in s["label"] for s in solutions)
    assert all((folder / s["label"] / "architecture.json").exists() for s in solutions)  # trained
    again = []
    run_search(space, tmp_path, echo=again.append)
    assert not any(line.startswith(("[block latency", "[measured")) for line in again)
