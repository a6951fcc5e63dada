"""The search as a service on a real cluster: `ray start` head + second node on 127.0.0.1 with token
authentication, `ray job submit ... -- nas search`, the study in a real PostgreSQL, the run folder as a URI."""

import json
import time
import urllib.request

import optuna
import pytest
import yaml
from transformers import AutoModelForCausalLM

from conftest import ROOT, tiny_space
from nas.cli import main
from dashboard_screenshot import dashboard, study_id
from nas.space import AXES, enumerate_candidates, parse_space
from services import RayCluster, have_postgres, postgres

pytestmark = [pytest.mark.slow, pytest.mark.ray]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}


@pytest.fixture(scope="module")
def database():
    if not have_postgres():
        pytest.skip("PostgreSQL's server programs are missing: apt-get install postgresql (scripts/setup.sh does)")
    with postgres() as url:
        yield url


@pytest.fixture(scope="module")
def cluster():
    # One cluster for the module (each start is two `ray start`s and a job agent, ~10 s): the trials test runs
    # first, on node_b; the kill test, which ends node_b's raylet and retries on the head, runs last.
    cluster = RayCluster(env={"NAS_CACHE": str(ROOT / ".cache")}).start()
    yield cluster
    cluster.stop()
    assert not cluster.processes()  # exactly this cluster's processes, and all of them, are gone


def _job(tmp_path, tiny_tokenizer, database, name, **overrides):
    """A job folder holding the space file (its study in PostgreSQL); returns (folder, space, root URI)."""
    spec = tiny_space(tmp_path / "inputs", tiny_tokenizer, name=name, storage=database, **overrides)
    job = tmp_path / "job"
    job.mkdir()
    (job / "space.yaml").write_text(yaml.safe_dump(spec))
    return job, parse_space(spec), f"file://{tmp_path / 'runs'}"


def _short_trials(database, name):
    study = optuna.load_study(study_name=name, storage=database)
    return [t for t in study.get_trials() if t.user_attrs.get("stage") == "short_retrain"]


def _run(cluster, job, root, extra_env=None):
    # The job's runtime env sets env_vars of its own: nas must join the cluster without touching it.
    proc = cluster.submit("nas", "search", "space.yaml", "--root", root, working_dir=job,
                          runtime_env={"env_vars": {"NAS_CACHE": str(ROOT / ".cache"), **(extra_env or {})}})
    return proc


def _wait_for_a_trial_on_node_b(cluster, proc, timeout=600):
    """Until a trial has written its first metrics line in node_b's scratch folder (its node's TMPDIR, so a reused
    idle worker does not count)."""
    deadline = time.time() + timeout
    while not any(p.stat().st_size for p in cluster.scratch_b.glob("nas-*/metrics.jsonl")):
        assert time.time() < deadline and proc.poll() is None, "no trial started on node_b"
        time.sleep(0.1)


def test_ray_job_runs_trials_on_the_second_node_into_postgres(cluster, database, tmp_path, tiny_tokenizer):
    # The head's CPU is held meanwhile: the job's driver runs on the head and every trial on node_b, so the run
    # folder is written from the other node (the kill test below runs trials on the head too).
    job, space, root = _job(tmp_path, tiny_tokenizer, database, "cluster",
                            short_retrain={"tokens": 4 * 32 * 40, "reports": 2})
    node_b = cluster.node_id(cluster.node_b_raylet())
    with cluster.hold_head():
        out, _ = _run(cluster, job, root).communicate(timeout=900)
    assert "succeeded" in out, out[-4000:]
    labels = {r["label"] for r in enumerate_candidates(space, AutoModelForCausalLM.from_pretrained(space.parent).config)}
    assert "trials to run (grid) on cluster" in out and "[4/4]" in out

    trials = _short_trials(database, "cluster")
    assert sorted(t.user_attrs["label"] for t in trials) == sorted(labels)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    runs = tmp_path / "runs" / "cluster"  # the file:// run folder, written through pyarrow
    nodes = set()
    for label in labels:
        assert sorted(p.name for p in (runs / label).iterdir()) == ["architecture.json", "metrics.jsonl", "result.json"]
        nodes.add(json.loads((runs / label / "result.json").read_text())["node"])
    assert nodes == {node_b}
    assert (runs / "summary.parquet").exists() and (runs / "best.json").exists()
    assert cluster.listening_addresses() <= LOOPBACK

    # Export from the shared database and the URI run folder, on the submitting machine.
    assert main(["export", "--study", "cluster", "--storage", database, "--root", root, "--out",
                 str(tmp_path / "best.json"), "--checkpoint", str(tmp_path / "ckpt")]) == 0
    best = json.loads((tmp_path / "best.json").read_text())
    assert best == {k: v for k, v in json.loads((runs / "best.json").read_text()).items()}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").config.hidden_size == best["hidden_size"]

    # optuna-dashboard reads the same PostgreSQL study: every trial, with the architecture axes as parameters.
    with dashboard(database) as url:
        detail = json.loads(urllib.request.urlopen(f"{url}/api/studies/{study_id(url, 'cluster')}?after=0",
                                                   timeout=60).read())
    shown = [t for t in detail["trials"] if t["state"] == "Complete"]
    assert len(shown) == len(labels) + 1  # the short retrains and the promoted full distillation
    assert all({p["name"] for p in t["params"]} == set(AXES) for t in shown)

    # Re-submitting resumes against PostgreSQL: nothing is trained again.
    again, _ = _run(cluster, job, root).communicate(timeout=600)
    assert "succeeded" in again and "0 trials to run" in again, again[-3000:]
    assert len(_short_trials(database, "cluster")) == len(trials)


def test_killed_node_trial_is_retried_on_the_head(cluster, database, tmp_path, tiny_tokenizer):
    # While the head's CPU is held, the trials can only start on node_b: its raylet is killed once one is training
    # there (its first metrics line), then the head is freed for the retry and the other trials.
    job, space, root = _job(tmp_path, tiny_tokenizer, database, "cluster-kill",
                            short_retrain={"tokens": 4 * 32 * 100, "reports": 4}, search={"retries": 2})
    raylet = cluster.node_b_raylet()
    node_b = cluster.node_id(raylet)
    with cluster.hold_head() as release:
        proc = _run(cluster, job, root)
        _wait_for_a_trial_on_node_b(cluster, proc)
        raylet.kill()
        release()
    out, _ = proc.communicate(timeout=900)
    assert "succeeded" in out, out[-4000:]
    trials = _short_trials(database, "cluster-kill")
    complete = [t.user_attrs["label"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == len(set(complete)) == 4
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    retried = [line.split()[1] for line in out.splitlines() if line.startswith("[retry] ")]
    assert retried, out[-4000:]
    for label in retried:  # the killed node's trial finished on the head
        result = json.loads((tmp_path / "runs" / "cluster-kill" / label / "result.json").read_text())
        assert result["node"] != node_b
