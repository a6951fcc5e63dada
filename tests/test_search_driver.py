"""The search driver without Ray: the Optuna parameters across re-runs, proposals over layer kinds, promotion
claims, the summary of duplicate proposals, the Pareto front, the retrain settings a study holds, and the
driver's identity and heartbeat (real sqlite Optuna studies)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import optuna
import pytest

from conftest import tiny_model, tiny_space
from nas.errors import ConfigError
from nas.search import METRIC, open_study, run_search, storage_url, study_storage, summarize
from nas.search.liveness import DRIVER, _Heartbeat, _dead_driver, _pid_space, _process_start
from nas.search.promotion import _claim, _front_picks
from nas.search.report import _pareto_front
from nas.search.searcher import ArchitectureSearch
from nas.search.study import _check_study, _distributions, _enqueue, _params, _plan
from nas.space import enumerate_candidates, parse_space, space_config

State = optuna.trial.TrialState


def _rows(space):
    return {r["label"]: r for r in enumerate_candidates(space, space_config(space))}


def _study(space, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = study_storage(url)
    return open_study(space, storage=storage), storage


def _trained(study, rows, label, value, stage="short_retrain", curve=None, **attrs):
    study.add_trial(optuna.trial.create_trial(
        params=_params(rows[label]), distributions={k: _distributions(rows)[k] for k in _params(rows[label])},
        value=value, intermediate_values=curve or {},
        user_attrs={"label": label, "stage": stage, "params": rows[label]["params"], **attrs}))


def test_axis_parameters_accept_every_re_run_of_a_study(tmp_path, tiny_tokenizer):
    """A study asked and told under one space's candidates, then under a tighter budget's (fewer values of
    hidden_size) and another axes list's: each run's parameters are accepted beside the earlier runs' (Optuna
    refused a categorical whose choices changed), and each proposal is one of that run's values."""
    spaces = [tiny_space(tmp_path, tiny_tokenizer, name="rerun"),
              tiny_space(tmp_path, tiny_tokenizer, name="rerun", budget={"tolerance": 0.1}),
              tiny_space(tmp_path, tiny_tokenizer, name="rerun", axes={"num_hidden_layers": [4, 3, 2],
                                                                       "hidden_size": [48, 36, 24]})]
    study, _ = _study(parse_space(spaces[0]), tmp_path)
    for spec in spaces:
        rows = _rows(parse_space(spec))
        for label in rows:
            _enqueue(study, rows[label])
            trial = study.ask(_distributions(rows))
            assert trial.params == _params(rows[label])
            study.tell(trial, 1.0)
        # a promotion recorded under this run's parameters
        _trained(study, rows, next(iter(rows)), 0.5, stage="full_distillation")
    assert sum(t.user_attrs.get("stage") == "full_distillation" for t in study.get_trials()) == 3
    other = optuna.create_study()  # why they are not categoricals over the candidates' values
    other.ask({"hidden_size": optuna.distributions.CategoricalDistribution([36, 48])})
    with pytest.raises(ValueError, match="dynamic value space"):
        other.ask({"hidden_size": optuna.distributions.CategoricalDistribution([36])})


def _hybrid_space(tmp_path, tiny_tokenizer, **search):
    parent = tmp_path / "nemotron_h"
    tiny_model("nemotron_h").config.save_pretrained(parent)
    return parse_space({
        "name": "kinds", "parent": str(parent), "seq_len": 32, "budget": {"fraction": 0.7, "tolerance": 0.3},
        "axes": {"mamba_num_heads": [4, 8], "kept_layers": {"linear_attention": [0, 1, 2], "mlp": [1, 2]}},
        "short_retrain": {"tokens": 4 * 32 * 2, "batch_size": 4}, "search": {"max_trials": 6, **search}})


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_samplers_over_layer_kinds_propose_consistent_candidates(tmp_path, tiny_tokenizer, sampler):
    """TPE and NSGA-II over a tiny Nemotron-H's kind counts: the depth is no parameter of its own (it is their sum),
    so no proposal disagrees with itself, and none is given the speed budget's reason in a space without one."""
    space = _hybrid_space(tmp_path, tiny_tokenizer, sampler=sampler)
    rows = _rows(space)
    assert len(rows) >= 6
    study, storage = _study(space, tmp_path)
    search = ArchitectureSearch(space, rows, study, storage, [])
    for n in range(6):
        params = search.suggest(str(n))
        assert "num_hidden_layers" not in params
        search.on_trial_complete(str(n), {METRIC: 1.0 + n / 10, "tokens": search.final})
    trials = study.get_trials()
    assert sum(t.state == State.COMPLETE for t in trials) == 6
    pruned = [t.user_attrs["pruned_reason"] for t in trials if t.state == State.PRUNED]
    assert not [r for r in pruned if "speed budget" in r], pruned
    for t in trials:  # the label names the depth the kinds add up to
        kinds = sum(v for k, v in t.params.items() if k.startswith("layers."))
        assert "num_hidden_layers" not in t.params
        if t.state == State.COMPLETE:
            assert rows[t.user_attrs["label"]]["num_hidden_layers"] == kinds
            assert t.user_attrs["label"].startswith(f"L{kinds}-")


def test_suggest_ends_when_another_driver_takes_the_last_free_label(tmp_path, tiny_tokenizer):
    """Every label but one is trained; another driver takes the last one while this one's proposals are being
    rejected (it also takes the candidates this driver queues): `suggest` ends rather than proposing forever."""
    space = parse_space(tiny_space(tmp_path, tiny_tokenizer, name="race", search={"sampler": "tpe"}))
    rows = _rows(space)
    study, storage = _study(space, tmp_path)
    *trained, last = sorted(rows)
    for label in trained:
        _trained(study, rows, label, 1.0)
    search = ArchitectureSearch(space, rows, study, storage, [])
    ask, asked = study.ask, []

    def ask_beside_another_driver(*args, **kwargs):
        asked.append(1)
        if len(asked) > 100:
            raise AssertionError("suggest kept proposing after every label was taken")
        if len(asked) == 1:  # the other driver takes the last free label (and, later, what this one queues)
            theirs = ask()
            for key, value in (("label", last), ("stage", "short_retrain"), ("driver", "elsewhere:x:1:1")):
                theirs.set_user_attr(key, value)
        while study.get_trials(deepcopy=False, states=(State.WAITING,)):
            study.tell(ask(), state=State.PRUNED)
        return ask(*args, **kwargs)

    study.ask = ask_beside_another_driver
    assert search.suggest("0") is ArchitectureSearch.FINISHED


def test_promotion_claims_a_label_against_other_live_drivers(tmp_path, tiny_tokenizer):
    space = parse_space(tiny_space(tmp_path, tiny_tokenizer, name="claims"))
    rows = _rows(space)
    shared = SimpleNamespace(rows=rows)
    study, storage = _study(space, tmp_path)
    first, second, third = sorted(rows)[:3]
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = f"{socket.gethostname()}:{_pid_space()}:{ended.pid}:{_process_start(ended.pid)}"
    ended.wait()
    for label, driver in ((first, "another-host:x:1:1"), (second, dead)):  # one promoting elsewhere; one died
        study.add_trial(optuna.trial.create_trial(
            state=State.RUNNING, params=_params(rows[label]), distributions=_distributions(rows),
            user_attrs={"label": label, "stage": "full_distillation", "driver": driver}))
    claims = _claim(study, storage, shared, [first, second, third])
    assert set(claims) == {second, third}  # the live driver's label is left to it; the dead one's is taken over
    states = {(t.user_attrs["label"], t.user_attrs["driver"]): t.state for t in study.get_trials()}
    assert states == {(first, "another-host:x:1:1"): State.RUNNING, (second, dead): State.FAIL,
                      (second, DRIVER): State.RUNNING, (third, DRIVER): State.RUNNING}
    assert _claim(study, storage, shared, [first, second, third]) == {}  # this driver's own claims hold them


def test_summary_keeps_the_trained_curve_and_figures_beside_a_duplicate_proposal(tmp_path, tiny_tokenizer,
                                                                                 monkeypatch):
    space = parse_space(tiny_space(tmp_path / "inputs", tiny_tokenizer, name="dups"))
    rows = _rows(space)
    root = tmp_path / "runs"
    (root / "dups").mkdir(parents=True)
    study = open_study(space, root)
    label, other = sorted(rows)[:2]
    curve = {128: 2.5, 256: 2.0, 384: 1.5}
    _trained(study, rows, label, 1.5, curve=curve)
    _trained(study, rows, other, 1.7, curve={128: 2.6, 384: 1.7})
    (root / "dups" / label).mkdir()
    (root / "dups" / label / "result.json").write_text(json.dumps({"val_loss": 1.5, "tokens": 384, "wall_s": 9.0}))
    study.add_trial(optuna.trial.create_trial(  # TPE proposing it again: pruned, never trained
        state=State.PRUNED, params=_params(rows[label]), distributions=_distributions(rows),
        user_attrs={"label": label, "stage": "short_retrain", "pruned_reason": f"duplicate: {label} was trained"}))
    drawn = {}
    monkeypatch.setattr("nas.search.report._plot_curves", lambda curves, parent, path: (drawn.update(curves),
                                                                                  path.write_bytes(b"")))
    frame = summarize(space, root)
    assert drawn[(label, "short_retrain")] == sorted(curve.items())
    trained, duplicate = frame[frame["label"] == label].sort_values("trial").to_dict("records")
    assert (trained["tokens"], trained["wall_s"]) == (384, 9.0)
    assert duplicate["state"] == "PRUNED" and duplicate["tokens"] != duplicate["tokens"]  # NaN: it trained none
    assert duplicate["wall_s"] != 9.0


def test_the_promoted_front_and_pareto_json_agree_on_ties(tmp_path, tiny_tokenizer):
    """Two candidates with the same size and loss: one point of the front, as pareto.json draws it, so the
    promotion does not spend a full distillation on the second."""
    space = parse_space(tiny_space(tmp_path, tiny_tokenizer, promote=3,
                                   search={"objectives": ["val_loss", "params"], "promotion": "front"}))
    points = [(70_000, 1.5), (70_000, 1.5), (60_000, 1.9), (80_000, 1.6)]
    trials = [optuna.trial.create_trial(values=[loss, size]) for size, loss in points]
    assert _pareto_front(points) == [2, 0]  # (80,000, 1.6) is beaten by (70,000, 1.5)
    assert _front_picks(space, trials) == [trials[0], trials[2]]


@pytest.mark.no_ray
def test_a_re_run_with_other_retrain_settings_is_refused_before_ray_saying_what_changed(tmp_path, tiny_tokenizer):
    import ray

    spec = tiny_space(tmp_path / "inputs", tiny_tokenizer, name="settings")
    space = parse_space(spec)
    (tmp_path / "runs" / "settings").mkdir(parents=True)  # as a first run leaves it
    study = open_study(space, storage=study_storage(storage_url(space, tmp_path / "runs")))
    _check_study(space, study)  # as the first run records them
    _check_study(space, study)  # the same settings again
    changed = parse_space({**spec, "short_retrain": {**spec["short_retrain"], "tokens": 4 * 32 * 6, "lr": 1e-2}})
    with pytest.raises(ConfigError) as info:
        run_search(changed, tmp_path / "runs")
    assert not ray.is_initialized()
    message = str(info.value)
    assert "short_retrain.tokens=768 (was 384)" in message and "short_retrain.lr=0.01 (was 0.001)" in message
    assert "study_name" in message and "--out" not in message and "\n" not in message
    # Settings that do not change what is trained (how often it reports, checkpoints) are free to change.
    _check_study(parse_space({**spec, "short_retrain": {**spec["short_retrain"], "reports": 3}}), study)


def test_a_study_made_with_categorical_axes_is_refused_in_one_line(tmp_path, tiny_tokenizer):
    space = parse_space(tiny_space(tmp_path, tiny_tokenizer, name="old"))
    study, _ = _study(space, tmp_path)
    study.add_trial(optuna.trial.create_trial(
        params={"hidden_size": 48}, distributions={"hidden_size": optuna.distributions.CategoricalDistribution([48])},
        value=1.0))
    with pytest.raises(ConfigError, match="study_name: study old was made by an earlier nas"):
        _check_study(space, study)


def test_queued_candidates_are_read_back_by_label(tmp_path, tiny_tokenizer):
    space = parse_space(tiny_space(tmp_path, tiny_tokenizer, name="queued", search={"sampler": "grid"}))
    rows = _rows(space)
    study, _ = _study(space, tmp_path)
    first, *rest = sorted(rows)
    _enqueue(study, rows[first])  # as a killed run leaves it
    assert _plan(space, study, sorted(rows)) == ("grid", rest, len(rows))


def test_a_driver_is_judged_by_its_pid_only_in_this_pid_namespace():
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    start = "12345"
    here = f"{socket.gethostname()}:{_pid_space()}:{ended.pid}:{start}"
    assert _dead_driver(here)
    # A container that shares this hostname has pids of its own: its driver is not judged by this one's pids.
    assert not _dead_driver(f"{socket.gethostname()}:{_pid_space()}x:{ended.pid}:{start}")
    assert not _dead_driver(DRIVER) and DRIVER.count(":") >= 3 and os.getpid() == int(DRIVER.rsplit(":", 2)[1])


def test_the_heartbeat_thread_outlives_a_failed_read(monkeypatch):
    monkeypatch.setattr("nas.search.liveness.HEARTBEAT_S", 0.01)
    beats, reads = [], []

    def trial_ids():
        reads.append(1)
        if len(reads) == 1:
            raise RuntimeError("database is locked")
        return [7]

    with _Heartbeat(SimpleNamespace(record_heartbeat=beats.append), trial_ids) as heartbeat:
        deadline = time.time() + 10
        while not beats and time.time() < deadline:
            time.sleep(0.02)
        assert heartbeat.thread.is_alive()
    assert beats and set(beats) == {7}
    assert not any(t.name == "nas-heartbeat" for t in threading.enumerate())
