"""Faults proven by killing processes: `nas search` (the CLI, a private Ray on loopback) on the tiny space, with
a trial worker or the driver killed by SIGKILL, ends with the same losses as an undisturbed run."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import psutil
import pytest
import yaml

from conftest import ROOT, tiny_space

pytestmark = pytest.mark.slow
NAS = [sys.executable, "-m", "nas.cli"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("faults")
    return folder, tiny_tokenizer


def _space(inputs, name):
    folder, tokenizer = inputs
    # 40 steps per trial, one trial at a time: long enough to be caught mid-run.
    spec = tiny_space(folder / "inputs", tokenizer, name=name, promote=0,
                      short_retrain={"tokens": 4 * 32 * 40, "reports": 2},
                      resources={"max_concurrent": 1}, search={"retries": 2})
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


def _study(root, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / name / 'study.db'}")


def _losses(root, name):
    return {t.user_attrs["label"]: t.value for t in _study(root, name).get_trials()
            if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("stage") == "short_retrain"}


@pytest.fixture(scope="module")
def reference(inputs):
    space_file, root = _space(inputs, "undisturbed")
    _finish(_start(space_file, root))
    return _losses(root, "undisturbed")


def _completed(db) -> int:
    """Completed trials, read without Optuna (which would race the driver to create the schema)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _running_label(folder):
    """A trial folder whose training has started (metrics written) but not finished."""
    for trial in folder.glob("L*"):
        if (trial / "metrics.jsonl").exists() and not (trial / "result.json").exists():
            return trial.name
    return None


def test_trial_worker_killed_is_retried_with_the_same_loss(inputs, reference):
    space_file, root = _space(inputs, "worker-killed")
    proc = _start(space_file, root)
    deadline, label = time.time() + 600, None
    while label is None:
        assert time.time() < deadline and proc.poll() is None, "no trial was caught mid-run"
        label = _running_label(root / "worker-killed")
        time.sleep(0.05)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "ImplicitFunc" in " ".join(p.cmdline())]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGKILL)
    out = _finish(proc)
    assert f"[retry] {label} failed" in out
    steps = [json.loads(line).get("step") for line in (root / "worker-killed" / label / "metrics.jsonl").open()]
    assert steps.count(1) == 2  # the killed attempt's lines, then the retry's from step 1
    assert _losses(root, "worker-killed") == pytest.approx(reference, rel=1e-6)


def test_driver_killed_and_rerun_resumes_without_redoing_trials(inputs, reference):
    space_file, root = _space(inputs, "driver-killed")
    proc = _start(space_file, root)
    deadline = time.time() + 600
    while not _completed(root / "driver-killed" / "study.db"):
        assert time.time() < deadline and proc.poll() is None, "no trial finished"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # the driver alone, as a crash would
    proc.wait()
    os.killpg(proc.pid, signal.SIGKILL)  # then the private Ray it had started
    done = _losses(root, "driver-killed")
    stamps = {label: (root / "driver-killed" / label / "result.json").stat().st_mtime_ns for label in done}

    out = _finish(_start(space_file, root))
    assert f", {len(reference) - len(done)} trials to run (grid)" in out
    assert stamps == {label: (root / "driver-killed" / label / "result.json").stat().st_mtime_ns for label in done}
    states = {t.state for t in _study(root, "driver-killed").get_trials()}
    assert not states & {optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING}
    assert _losses(root, "driver-killed") == pytest.approx(reference, rel=1e-6)
