"""Faults proven by killing processes: `nas search` (the CLI, a private Ray on loopback) on the tiny space, with
a trial worker, a Ray Train worker or the driver killed by SIGKILL, ends with the same losses as an undisturbed
run, and an interrupted retrain resumes from its newest checkpoint rather than from step 1. The 2-worker run with a
killed Train worker is also the test of a search whose trials and promotion are Ray Train jobs of two workers.

Each `nas search` started costs a private Ray and a parent's preparation: the undisturbed run is shared by the
tests that compare against it, and one run has its trial worker killed and then its driver killed twice (after a
trial, then during the promotion)."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pandas
import psutil
import pytest
import yaml
from transformers import AutoModelForCausalLM

from conftest import ROOT, tiny_space

pytestmark = [pytest.mark.slow, pytest.mark.ray]
NAS = [sys.executable, "-m", "nas.cli"]
STEP_TOKENS = 4 * 32  # batch 4 x seq_len 32
ONE = {"num_hidden_layers": [3], "num_attention_heads": [6], "intermediate_size": [40], "hidden_size": [48]}
# Two candidates, not the tiny space's four: the driver is killed after one finished and the rerun does the other;
# each trial more is a Ray worker's start-up and 40 steps on every undisturbed and disturbed run.
TWO = {**ONE, "hidden_size": [48, 36]}
# The best candidate promoted to 200 steps of full distillation with a checkpoint every 10. Its steps take a few ms
# each, and the promotion runs on in Ray for a moment after the driver is killed: at 40 steps it once finished
# before the test stopped Ray, leaving nothing to resume.
PROMOTED = {"promote": 1, "full_retrain": {"tokens": STEP_TOKENS * 200, "reports": 2,
                                           "checkpoint_tokens": STEP_TOKENS * 10}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("faults")
    return folder, tiny_tokenizer


def _space(inputs, name, **overrides):
    folder, tokenizer = inputs
    # 40 steps per trial with a checkpoint every 5, one trial at a time: long enough to be caught mid-run.
    settings = {"axes": TWO, "promote": 0,
                "short_retrain": {"tokens": STEP_TOKENS * 40, "reports": 2, "checkpoint_tokens": STEP_TOKENS * 5},
                "resources": {"max_concurrent": 1}, "search": {"retries": 2}, **overrides}
    spec = tiny_space(folder / "inputs", tokenizer, name=name, **settings)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, folder / "runs"


def _start(space_file, root):
    env = {**os.environ, "NAS_CACHE": str(ROOT / ".cache")}
    env.pop("RAY_ADDRESS", None)
    # Its own process group: the test can end the driver's Ray processes too after killing the driver.
    return subprocess.Popen([*NAS, "search", str(space_file), "--root", str(root)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc, timeout=900):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _kill_driver(proc):
    """Kill the driver, then its private Ray; returns what the driver had printed."""
    proc.send_signal(signal.SIGKILL)  # the driver alone, as a crash would
    proc.wait()
    os.killpg(proc.pid, signal.SIGKILL)  # then the private Ray it had started
    return proc.communicate(timeout=60)[0]


def _study(root, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / name / 'study.db'}")


def _losses(root, name, stage="short_retrain"):
    return {t.user_attrs["label"]: t.value for t in _study(root, name).get_trials()
            if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("stage") == stage}


def _undisturbed(inputs, name, **overrides):
    space_file, root = _space(inputs, name, **overrides)
    _finish(_start(space_file, root))
    return root


@pytest.fixture(scope="module")
def reference(inputs):
    """The undisturbed run's losses: of both trials, and of the best one's promotion."""
    root = _undisturbed(inputs, "undisturbed", **PROMOTED)
    return _losses(root, "undisturbed"), _losses(root, "undisturbed", "full_distillation")


def _completed(db) -> int:
    """Completed trials, read without Optuna (which would race the driver to create the schema)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _checkpointed(folder):
    """A run folder below `folder` (a trial's, or a promotion's) that holds a complete checkpoint and has logged a
    step past it, but has not finished."""
    for run in folder.glob("L*"):
        steps = [int(p.parent.name.split("-")[1]) for p in run.glob("checkpoint/step-*/state.json")]
        if steps and not (run / "result.json").exists() and _logged_steps(run) and _logged_steps(run)[-1] > steps[0]:
            return run
    return None


def _logged_steps(run):
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def _wait_for_checkpoint(proc, folder):
    deadline = time.time() + 600
    while (run := _checkpointed(folder)) is None:
        assert time.time() < deadline and proc.poll() is None, "no run was caught between checkpoints"
        time.sleep(0.02)
    return run


def _assert_resumed(run, steps):
    """Every step logged once, and one resume, from a checkpoint past step 1."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumes = [r["resumed_at_step"] for r in records if "resumed_at_step" in r]
    assert len(resumes) == 1 and resumes[0] >= 5, resumes
    after = records[[i for i, r in enumerate(records) if "resumed_at_step" in r][0] + 1]
    assert after["step"] == resumes[0] + 1 > 1  # the first step logged after the restart
    assert _logged_steps(run) == list(range(1, steps + 1))


def test_killed_trial_worker_and_twice_killed_driver_redo_nothing_and_match_the_undisturbed_run(inputs, reference):
    """A trial's worker is killed between checkpoints: the trial is retried from its newest checkpoint. Once that
    trial has finished the driver is killed: the rerun trains only the other; killed again while it promotes the
    best, the third run resumes the promotion from its newest checkpoint. The losses are the undisturbed run's."""
    short, full = reference
    space_file, root = _space(inputs, "driver-killed", **PROMOTED)
    proc = _start(space_file, root)
    retried = _wait_for_checkpoint(proc, root / "driver-killed")
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "ImplicitFunc" in " ".join(p.cmdline())]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGKILL)
    deadline = time.time() + 600
    while not ((retried / "result.json").exists() and _completed(root / "driver-killed" / "study.db")):
        assert time.time() < deadline and proc.poll() is None, "the retried trial did not finish"
        time.sleep(0.2)
    assert f"[retry] {retried.name} failed" in _kill_driver(proc)
    _assert_resumed(retried, 40)
    done = _losses(root, "driver-killed")
    stamps = {label: (root / "driver-killed" / label / "result.json").stat().st_mtime_ns for label in done}

    proc = _start(space_file, root)
    run = _wait_for_checkpoint(proc, root / "driver-killed" / "promoted")
    out = _kill_driver(proc)
    assert f", {len(short) - len(done)} trials to run (grid)" in out
    assert stamps == {label: (root / "driver-killed" / label / "result.json").stat().st_mtime_ns for label in done}

    _finish(_start(space_file, root))
    _assert_resumed(run, 200)
    states = {t.state for t in _study(root, "driver-killed").get_trials()}
    assert not states & {optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING}
    assert _losses(root, "driver-killed") == pytest.approx(short, rel=1e-6)
    assert _losses(root, "driver-killed", "full_distillation") == pytest.approx(full, rel=1e-5)


# One candidate of the undisturbed run's two, whose trial and promotion each run on 2 Ray Train workers; under
# ASHA, which stops a trial on its final report: the trial trained to the end still writes result.json.
SHARDED = {"axes": ONE, "resources": {"max_concurrent": 1, "workers_per_trial": 2}}


def test_train_worker_killed_in_a_two_worker_trial_resumes_and_matches_one_worker(inputs, reference):
    """Tune over Train: the trial is a 2-worker Ray Train job reporting to Optuna, its promotion on 2 workers too.
    One of its workers is killed between checkpoints: the job resumes from the newest, and the trial ends with the
    loss the undisturbed 1-worker run had for the same candidate (2 shards sum in another order: rel 1e-4)."""
    space_file, root = _space(inputs, "sharded-killed", **SHARDED, promote=1, full_retrain={"workers": 2},
                              search={"retries": 2, "asha": True})
    proc = _start(space_file, root)
    run = _wait_for_checkpoint(proc, root / "sharded-killed")
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "RayTrainWorker" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGKILL)
    out = _finish(proc)
    _assert_resumed(run, 40)
    losses = _losses(root, "sharded-killed")
    assert losses == pytest.approx({label: reference[0][label] for label in losses}, rel=1e-4)

    trials = _study(root, "sharded-killed").get_trials()
    short = [t for t in trials if t.user_attrs.get("stage") == "short_retrain"]
    assert len(short) == 1 and all(t.state.name == "COMPLETE" for t in short)
    assert len(pandas.read_csv(root / "sharded-killed" / "summary.csv")) == 1
    [t] = short
    evals = [json.loads(line) for line in (run / "metrics.jsonl").open() if "val_loss" in line]
    assert t.intermediate_values == {e["tokens"]: e["val_loss"] for e in evals}  # rank 0's reports
    result = json.loads((run / "result.json").read_text())
    assert result["workers"] == 2 and result["val_loss"] == t.value
    full = [t for t in trials if t.user_attrs.get("stage") == "full_distillation"]
    assert len(full) == 1
    promoted = root / "sharded-killed" / "promoted" / full[0].user_attrs["label"]
    assert json.loads((promoted / "result.json").read_text())["workers"] == 2
    AutoModelForCausalLM.from_pretrained(promoted / "model")
    assert any(line.startswith("[promoted 1/1]") for line in out.splitlines())
