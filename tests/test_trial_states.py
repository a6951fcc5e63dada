"""What a resumed search makes of the trials a study already holds (real sqlite Optuna studies, no Ray): a dead
driver's trials are failed, another live driver's are left running and their labels not trained again, and bad
spaces are refused before Ray starts."""

import os
import socket
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from conftest import tiny_space
from nas.errors import ConfigError, UnsupportedModelError
from nas.search import open_study, run_search, study_storage
from nas.search.liveness import DRIVER, _pid_space, _process_start
from nas.search.study import _distributions, _plan
from nas.space import AXES, enumerate_candidates, parse_space, space_config


@pytest.fixture
def space(tmp_path, tiny_tokenizer):
    return parse_space(tiny_space(tmp_path / "inputs", tiny_tokenizer, name="states"))


def _ask(study, space, label, driver):
    """A trial as a driver leaves it once it has started training `label` (with no driver: as a driver killed
    before naming itself leaves it)."""
    rows = {r["label"]: r for r in enumerate_candidates(space, space_config(space))}
    study.enqueue_trial({k: rows[label][k] for k in AXES})
    trial = study.ask(_distributions(rows))
    for key, value in (("label", label), ("stage", "short_retrain"), ("driver", driver)):
        if value is not None:
            trial.set_user_attr(key, value)
    return trial


def test_resume_fails_dead_drivers_trials_and_leaves_live_ones(space, tmp_path):
    labels = [r["label"] for r in enumerate_candidates(space, space_config(space))]
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = study_storage(url)
    study = open_study(space, storage=storage)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = f"{socket.gethostname()}:{_pid_space()}:{ended.pid}:{_process_start(ended.pid)}"
    ended.wait()
    live_here = _ask(study, space, labels[0], DRIVER)  # this process: alive
    storage.record_heartbeat(live_here._trial_id)
    _ask(study, space, labels[1], dead)
    elsewhere = _ask(study, space, labels[2], "another-host:1:1")  # alive as far as its heartbeat says
    storage.record_heartbeat(elsewhere._trial_id)
    study.tell(_ask(study, space, labels[3], DRIVER), 1.0)

    sampler, enqueue, n = _plan(space, study, labels)
    states = {t.user_attrs["label"]: t.state for t in study.get_trials()}
    assert states == {labels[0]: optuna.trial.TrialState.RUNNING, labels[1]: optuna.trial.TrialState.FAIL,
                      labels[2]: optuna.trial.TrialState.RUNNING, labels[3]: optuna.trial.TrialState.COMPLETE}
    # Neither the finished label nor the two still training elsewhere is run again; the dead one is.
    assert (sampler, enqueue, n) == ("grid", [labels[1]], 1)

    # Once the other host's driver has sent no heartbeat for the grace period, its trial is failed too.
    stale = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=1)
    time.sleep(2.5)
    storage.record_heartbeat(live_here._trial_id)
    _plan(space, optuna.load_study(study_name=space.study, storage=stale), labels)
    states = {t.user_attrs["label"]: t.state for t in study.get_trials()}
    assert states[labels[2]] == optuna.trial.TrialState.FAIL
    assert states[labels[0]] == optuna.trial.TrialState.RUNNING


def test_a_trial_whose_driver_died_before_naming_itself_is_failed_once_no_other_driver_lives(space, tmp_path):
    labels = [r["label"] for r in enumerate_candidates(space, space_config(space))]
    study = open_study(space, storage=study_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = f"{socket.gethostname()}:{_pid_space()}:{ended.pid}:{_process_start(ended.pid)}"
    ended.wait()
    study.set_user_attr(f"driver {dead}", "2026-01-01T00:00:00")  # as the dead driver registered itself
    unnamed = _ask(study, space, labels[0], driver=None)
    _plan(space, study, labels)
    assert study.get_trials()[unnamed.number].state == optuna.trial.TrialState.FAIL

    # While a driver on another host may be between asking and naming itself, a young unnamed trial may be its.
    study.set_user_attr("driver another-host:1:1", "2026-01-01T00:00:00")
    young = _ask(study, space, labels[1], driver=None)
    _plan(space, study, labels)
    assert study.get_trials()[young.number].state == optuna.trial.TrialState.RUNNING


def _refused_before_ray(spec, tmp_path, error):
    import ray

    with pytest.raises(error) as info:
        run_search(parse_space(spec), tmp_path / "runs")
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()
    return str(info.value)


@pytest.mark.no_ray
def test_an_unknown_family_is_refused_before_ray_starts(tmp_path, tiny_tokenizer):
    from transformers import GPT2Config

    spec = tiny_space(tmp_path / "inputs", tiny_tokenizer, name="gpt2")
    GPT2Config(n_embd=48, n_layer=2, n_head=6, vocab_size=320).save_pretrained(tmp_path / "gpt2")
    message = _refused_before_ray({**spec, "parent": str(tmp_path / "gpt2")}, tmp_path, UnsupportedModelError)
    assert "gpt2" in message and "llama" in message


@pytest.mark.no_ray
def test_a_budget_no_candidate_meets_is_refused_before_ray_starts(tmp_path, tiny_tokenizer):
    spec = tiny_space(tmp_path / "inputs", tiny_tokenizer, name="tiny-budget", budget={"fraction": 0.05})
    assert "no candidate within budget" in _refused_before_ray(spec, tmp_path, ConfigError)


def test_space_enums_are_checked_at_load_all_at_once(tmp_path, tiny_tokenizer):
    spec = tiny_space(tmp_path / "inputs", tiny_tokenizer, importance={"seq_agg": "median", "sampling": "shuffled"},
                      val_sequences=0)
    with pytest.raises(ConfigError) as info:
        parse_space(spec)
    message = str(info.value)
    assert message.startswith("space: 3 problem(s)")
    assert "importance.seq_agg='median': must be one of 'mean', 'l2', 'var'" in message
    assert "importance.sampling='shuffled'" in message and "val_sequences=0" in message


def test_nas_search_on_a_bad_space_prints_one_line_and_starts_nothing(tmp_path, tiny_tokenizer):
    spec = tiny_space(tmp_path / "inputs", tiny_tokenizer, importance={"head_source": "heads"})
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    proc = subprocess.run([sys.executable, "-m", "nas.cli", "search", str(tmp_path / "space.yaml"), "--root",
                           str(tmp_path / "runs")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "importance.head_source='heads'" in proc.stderr
    assert not list((tmp_path / "tmp").iterdir()) and not (tmp_path / "runs").exists()  # no Ray session folder
