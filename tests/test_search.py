"""The search service end to end: a real local Ray, a real sqlite Optuna study, a tiny random Llama parent."""

import json
import sys

import ray.cloudpickle as cloudpickle
import optuna
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import WIKITEXT, tiny_model
from nas.architecture import Architecture
from nas.families import family_of
from nas.search import TRIAL_FILES, export_best, init_ray, run_search, run_trial, storage_url, study_dir
from nas.space import parse_space

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/

FAILING = "L3-H6-KV2-M40-E48"


def failing_trial(config, shared, report=None):
    if config["arch"] == FAILING:
        raise RuntimeError("injected failure")
    return run_trial(config, shared, report)


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    import ray

    init_ray(None, tmp_path_factory.mktemp("ray"), num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def space(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("search")
    tiny_model("llama").save_pretrained(root / "parent")
    tiny_tokenizer.save_pretrained(root / "parent")
    (root / "data.txt").write_text((WIKITEXT / "valid.txt").read_text()[:120_000])
    spec = {
        "name": "tiny", "parent": str(root / "parent"), "data": str(root / "data.txt"), "seq_len": 32,
        "budget": {"fraction": 0.6, "tolerance": 0.25},
        "axes": {"num_hidden_layers": [4, 3], "num_attention_heads": [6], "intermediate_size": [80, 40],
                 "hidden_size": [48, 36]},
        "importance": {"samples": 8},
        "short_retrain": {"tokens": 4 * 32 * 3, "batch_size": 4, "lr": 1e-3, "reports": 2},
        "full_retrain": {"tokens": 4 * 32 * 4, "batch_size": 4, "lr": 1e-3, "reports": 1},
        "promote": 1, "search": {"sampler": "grid", "retries": 1},
        "resources": {"cpus_per_trial": 1, "max_concurrent": 2},
    }
    return parse_space(spec), root


def _trials(space, root):
    return optuna.load_study(study_name=space.study, storage=storage_url(space, root)).get_trials()


def test_search_records_trials_promotes_exports_and_resumes(ray_session, space):
    space, root = space
    frame = run_search(space, root, trial_fn=failing_trial)
    trials = _trials(space, root)
    labels = {t.params["arch"] for t in trials}
    assert len(labels) >= 4 and FAILING in labels
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {t.params["arch"] for t in complete} == labels - {FAILING}
    assert all(t.value > 0 for t in complete)
    assert [t.state for t in trials if t.params["arch"] == FAILING] == [optuna.trial.TrialState.FAIL]

    folder = study_dir(space, root)
    for t in complete:  # the fixed artifact contract of a trial
        files = sorted(p.name for p in (folder / t.params["arch"]).iterdir())
        assert files == sorted(TRIAL_FILES), files
        result = json.loads((folder / t.params["arch"] / "result.json").read_text())
        assert result["val_loss"] == pytest.approx(t.value)
    assert (folder / "summary.parquet").exists() and (folder / "summary.csv").exists()
    assert (folder / "pareto.png").stat().st_size > 1000
    assert set(frame["label"]) == labels

    best_short = min(complete, key=lambda t: t.value)
    promoted = folder / "promoted" / best_short.params["arch"]
    child = AutoModelForCausalLM.from_pretrained(promoted / "model")
    arch = json.loads((promoted / "architecture.json").read_text())
    config = AutoModelForCausalLM.from_pretrained(space.parent).config
    assert sum(p.numel() for p in child.parameters()) == arch["params"]
    assert arch["params"] == family_of(config).num_parameters(config, Architecture.from_dict(arch))
    with torch.no_grad():
        assert torch.isfinite(child(input_ids=torch.tensor([[5, 6, 7]])).logits).all()

    best = export_best(space.study, storage_url(space, root), root / "best.json", root / "ckpt", root=root)
    assert best["label"] == best_short.params["arch"] and best["stage"] == "full_distillation"
    assert json.loads((root / "best.json").read_text()) == best
    assert {k: best[k] for k in ("hidden_size", "intermediate_size", "layers")} == \
        {k: arch[k] for k in ("hidden_size", "intermediate_size", "layers")}
    assert best["parent"] == space.parent
    assert AutoModelForCausalLM.from_pretrained(root / "ckpt").config.hidden_size == arch["hidden_size"]

    # Re-running the same search repeats no finished trial (only the failed one is tried again).
    run_search(space, root, trial_fn=failing_trial)
    again = _trials(space, root)
    finished = [t.params["arch"] for t in again if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(finished) == sorted(t.params["arch"] for t in complete)
    assert len(again) == len(trials) + 1
