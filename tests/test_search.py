"""The search service end to end: a real local Ray, a real sqlite Optuna study, a tiny random Llama parent."""

import json
import re
import shutil
import sys

import ray.cloudpickle as cloudpickle
import optuna
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_space
from nas.architecture import Architecture
from nas.families import family_of
from nas.search import TRIAL_FILES, export_best, label_of, run_search, run_trial, storage_url
from nas.space import AXES, parse_space

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/

FAILING = "L3-H6-KV2-M40-E48"


def failing_trial(config, shared, report=None):
    if label_of(config) == FAILING:
        raise RuntimeError("injected failure")
    return run_trial(config, shared, report)


@pytest.fixture(scope="module")
def space(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("search")
    return parse_space(tiny_space(root, tiny_tokenizer)), root


def _trials(space, root, stage="short_retrain"):
    trials = optuna.load_study(study_name=space.study, storage=storage_url(space, root)).get_trials()
    return [t for t in trials if stage is None or t.user_attrs.get("stage") == stage]


def _label(trial):
    return trial.user_attrs["label"]


@pytest.fixture(scope="module")
def searched(ray_session, space):
    space, root = space
    lines = []

    def in_the_driver(*args, **kwargs):
        raise AssertionError("the search driver loaded the parent's weights")

    # Ray workers import nas.search afresh: only this (the driver) process has the trap. Set where each lookup is:
    # the parent's work (`preparation`) and a retrain's parent (`trials`).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("nas.search.preparation.load_parent", in_the_driver)
        patch.setattr("nas.search.trials.load_parent", in_the_driver)
        frame = run_search(space, root, trial_fn=failing_trial, echo=lines.append)
    return space, root, frame, lines


def test_search_records_trials_promotes_exports_and_resumes(searched):
    space, root, frame, lines = searched
    trials = _trials(space, root)
    labels = {_label(t) for t in trials}
    assert len(labels) >= 4 and FAILING in labels
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {_label(t) for t in complete} == labels - {FAILING}
    assert all(t.value > 0 for t in complete)
    assert [t.state for t in trials if _label(t) == FAILING] == [optuna.trial.TrialState.FAIL]
    # Progress: a start line, one line per trial (n/N), one per promotion.
    assert lines[0].startswith(f"tiny: {len(labels)} feasible candidates, {len(labels)} trials to run (grid)")
    assert any(line.startswith("watch: optuna-dashboard sqlite:///") for line in lines)
    assert sorted(line.split()[0] for line in lines if re.match(r"\[\d+/\d+\] ", line)) == \
        sorted(f"[{n}/{len(labels)}]" for n in range(1, len(labels) + 1))
    assert any(FAILING in line and "FAILED" in line for line in lines)
    assert sum(line.startswith("[promoted 1/1]") for line in lines) == 1

    folder = root / space.study
    config = AutoModelForCausalLM.from_pretrained(space.parent).config
    steps = [32 * 4 * 1, 32 * 4 * 2, 32 * 4 * 3]  # tokens at each report: 3 steps, reports=2 -> every step
    for t in complete:  # the fixed artifact contract of a trial, and what the dashboard reads
        files = sorted(p.name for p in (folder / _label(t)).iterdir())
        assert files == sorted(TRIAL_FILES), files
        result = json.loads((folder / _label(t) / "result.json").read_text())
        assert result["val_loss"] == pytest.approx(t.value)
        assert set(t.params) == set(AXES) and label_of(t.params) == _label(t)
        arch = Architecture.from_dict(json.loads((folder / _label(t) / "architecture.json").read_text()))
        assert t.user_attrs["params"] == family_of(config).num_parameters(config, arch)
        assert t.user_attrs["share_of_parent"] == pytest.approx(t.user_attrs["params"] / sum(
            p.numel() for p in AutoModelForCausalLM.from_pretrained(space.parent).parameters()))
        assert sorted(t.intermediate_values) == steps  # indexed by training tokens, each once
        assert t.intermediate_values[steps[-1]] == pytest.approx(t.value)
    assert (folder / "summary.parquet").exists() and (folder / "summary.csv").exists()
    assert (folder / "pareto.png").stat().st_size > 1000 and (folder / "curves.png").stat().st_size > 1000
    assert set(frame["label"]) == labels

    best_short = min(complete, key=lambda t: t.value)
    promoted = folder / "promoted" / _label(best_short)
    child = AutoModelForCausalLM.from_pretrained(promoted / "model")
    arch = json.loads((promoted / "architecture.json").read_text())
    config = AutoModelForCausalLM.from_pretrained(space.parent).config
    assert sum(p.numel() for p in child.parameters()) == arch["params"]
    assert arch["params"] == family_of(config).num_parameters(config, Architecture.from_dict(arch))
    with torch.no_grad():
        assert torch.isfinite(child(input_ids=torch.tensor([[5, 6, 7]])).logits).all()

    [full] = _trials(space, root, "full_distillation")  # the promoted loss, recorded on a trial of its own
    assert _label(full) == _label(best_short) and full.params == best_short.params
    assert full.value == pytest.approx(json.loads((promoted / "result.json").read_text())["val_loss"])
    assert max(full.intermediate_values) == 32 * 4 * 4

    best = export_best(space.study, storage_url(space, root), root / "best.json", root / "ckpt", root=root)
    assert best["label"] == _label(best_short) and best["stage"] == "full_distillation"
    assert json.loads((root / "best.json").read_text()) == best
    assert {k: best[k] for k in ("hidden_size", "intermediate_size", "layers")} == \
        {k: arch[k] for k in ("hidden_size", "intermediate_size", "layers")}
    assert best["parent"] == space.parent
    assert AutoModelForCausalLM.from_pretrained(root / "ckpt").config.hidden_size == arch["hidden_size"]

    # Re-running the same search repeats no finished trial (only the failed one is tried again).
    run_search(space, root, trial_fn=failing_trial)
    again = _trials(space, root)
    finished = [_label(t) for t in again if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(finished) == sorted(_label(t) for t in complete)
    assert len(again) == len(trials) + 1
    assert len(_trials(space, root, "full_distillation")) == 1  # the promotion is not redone


def test_dashboard_shows_the_axes_in_a_browser(searched):
    """optuna-dashboard on the search's study, looked at in headless Chromium: the trials carry their axes and
    label, and the slice plot over num_hidden_layers has a point per finished trial."""
    from playwright.sync_api import sync_playwright

    if not shutil.which("chromium"):
        pytest.skip("Chromium is missing: apt-get install chromium (scripts/setup.sh does)")
    from dashboard_screenshot import CHROMIUM_ARGS, chromium, dashboard, show_slice, study_id

    space, root, _, _ = searched
    complete = [t for t in _trials(space, root, None) if t.state == optuna.trial.TrialState.COMPLETE]
    with dashboard(storage_url(space, root)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        sid = study_id(url, space.study)
        page.goto(f"{url}/dashboard/studies/{sid}/trials")
        page.get_by_text("Parameter", exact=True).first.wait_for()
        text = page.locator("main").inner_text()
        assert all(axis in text for axis in AXES) and "label" in text and "share_of_parent" in text
        plot = show_slice(page, url, sid)
        assert plot.locator(".scatterlayer .point").count() == len(complete)
        assert "val_loss" in page.locator("main").inner_text() and "Objective 0" not in page.locator("main").inner_text()
        # The saved contour (the study's overview page): every axis numeric, its ticks in increasing order.
        page.goto(f"{url}/dashboard/studies/{sid}")
        # (the overview draws its plots one after another: on a loaded machine the contour comes seconds later)
        axes = page.wait_for_function("""() => {
            const axes = [...document.querySelectorAll('.js-plotly-plot')]
                .filter(p => (p.layout?.title?.text || '').includes('Contour') && p._fullLayout)
                .flatMap(p => Object.keys(p._fullLayout).filter(k => /^[xy]axis\\d*$/.test(k)).map(k => p._fullLayout[k]))
                .filter(a => a.title?.text).map(a => ({type: a.type, title: a.title.text,
                                                       ticks: (a._vals || []).map(v => v.x)}));
            return axes.length ? axes : null;
        }""", timeout=60_000).json_value()
        browser.close()
    varied = {k for k in AXES if len({t.params[k] for t in complete if t.user_attrs["stage"] == "short_retrain"}) > 1}
    assert {a["title"] for a in axes} == varied
    assert all(a["type"] == "linear" and a["ticks"] == sorted(a["ticks"]) for a in axes), axes


def test_tpe_prunes_infeasible_proposals_and_writes_to_a_uri_run_folder(ray_session, tmp_path, tiny_tokenizer):
    """TPE proposes axis combinations outside the budget: they are recorded as pruned with the reason and never
    trained. The run folder is a file:// URI (written through pyarrow, as s3:// would be), with the teacher cache
    filled by two Ray tasks."""
    spec = tiny_space(tmp_path / "inputs", tiny_tokenizer, name="tpe", promote=0,
                      axes={"num_hidden_layers": [4, 3, 2], "hidden_size": [48, 36, 24]},
                      budget={"fraction": 0.6, "tolerance": 0.1}, search={"sampler": "tpe", "max_trials": 3},
                      storage=f"sqlite:///{tmp_path / 'study.db'}",
                      short_retrain={"teacher_topk": 16, "checkpoint_tokens": 4 * 32},
                      resources={"cache_workers": 2})
    space, root = parse_space(spec), f"file://{tmp_path / 'runs'}"
    run_search(space, root)
    trials = optuna.load_study(study_name="tpe", storage=spec["storage"]).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(complete) == 3
    folders = {p.name for p in (tmp_path / "runs" / "tpe").iterdir()
               if p.is_dir() and p.name not in ("ray_results", "tokens", "teacher_topk")}
    cache = json.loads((tmp_path / "runs" / "tpe" / "teacher_topk" / "index.json").read_text())
    assert cache["k"] == 16 and all((tmp_path / "runs" / "tpe" / "teacher_topk" / s).exists() for s in cache["shards"])
    assert folders == {t.user_attrs["label"] for t in complete}  # pruned proposals were never trained
    assert len({t.user_attrs["label"] for t in complete}) == 3  # no label trained twice; repeats did not count
    for t in pruned:
        reason = t.user_attrs["pruned_reason"]
        assert "outside the budget" in reason or "not a valid child" in reason or reason.startswith("duplicate: ")
        assert label_of(t.params) not in folders or reason.startswith("duplicate: ")
    # Every step checkpointed into the URI folder; a finished trial keeps none there.
    assert not list((tmp_path / "runs" / "tpe").glob("*/checkpoint"))
    assert (tmp_path / "runs" / "tpe" / "summary.csv").exists() and (tmp_path / "runs" / "tpe" / "pareto.png").exists()


def test_asha_stopped_trials_are_pruned_with_their_curves_and_not_retrained(ray_session, tmp_path, tiny_tokenizer):
    spec = tiny_space(tmp_path / "inputs", tiny_tokenizer, name="asha", promote=0, search={"asha": True},
                      resources={"max_concurrent": 1})
    space = parse_space(spec)
    frame = run_search(space, tmp_path)
    trials = _trials(space, tmp_path)
    final = spec["short_retrain"]["tokens"]
    stopped = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert stopped and all(t.user_attrs["stopped_by"] == "asha" for t in stopped)
    for t in stopped:  # its curve is kept, short of the end, and it has no result
        assert t.intermediate_values and max(t.intermediate_values) < final
        assert t.user_attrs["pruned_reason"].startswith("stopped by ASHA after")
        assert not (tmp_path / "asha" / _label(t) / "result.json").exists()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(max(t.intermediate_values) == final for t in complete)
    for t in complete:  # trained to the end, and finished: its 'finished' marker, a re-run's to reuse
        assert json.loads((tmp_path / "asha" / _label(t) / "result.json").read_text())["val_loss"] == \
            pytest.approx(t.value)
    assert set(frame[frame["state"] == "COMPLETE"]["label"]) == {_label(t) for t in complete}
    assert set(frame[frame["state"] == "PRUNED"]["label"]) == {_label(t) for t in stopped}

    lines = []
    run_search(space, tmp_path, echo=lines.append)  # the resume trains nothing: stopped trials are not redone
    assert lines[0].startswith(f"asha: {len(trials)} feasible candidates, 0 trials to run (grid)")
    assert [(t.number, t.state) for t in _trials(space, tmp_path)] == [(t.number, t.state) for t in trials]


def test_a_study_re_runs_under_a_tighter_budget_that_promotes_and_under_other_axes(ray_session, tmp_path,
                                                                                 tiny_tokenizer):
    """A search with promote 0; then the same study under a tighter budget (other values of hidden_size are
    feasible) with promote 1, whose candidates were all trained: it promotes the best of them, and the study holds
    that full distillation; then under another axes list, which trains its new candidate."""
    spec = tiny_space(tmp_path / "inputs", tiny_tokenizer, name="rerun", promote=0)
    run_search(parse_space(spec), tmp_path)
    tighter = parse_space({**spec, "promote": 1, "budget": {"fraction": 0.6, "tolerance": 0.1}})
    run_search(tighter, tmp_path)
    short = {_label(t): t for t in _trials(tighter, tmp_path) if t.state == optuna.trial.TrialState.COMPLETE}
    from nas.space import enumerate_candidates, space_config

    feasible = {r["label"] for r in enumerate_candidates(tighter, space_config(tighter))}
    assert feasible < set(short)  # (nothing new to train: the promotion alone ran)
    [full] = _trials(tighter, tmp_path, "full_distillation")
    best = min(feasible, key=lambda label: short[label].value)
    assert full.state == optuna.trial.TrialState.COMPLETE and _label(full) == best
    assert full.value == pytest.approx(json.loads((tmp_path / "rerun" / "promoted" / best / "result.json")
                                                  .read_text())["val_loss"])
    other = parse_space({**spec, "promote": 1, "axes": {"num_hidden_layers": [3], "intermediate_size": [60, 40],
                                                         "hidden_size": [36]}})  # a value no earlier run had
    run_search(other, tmp_path)
    labels = {r["label"] for r in enumerate_candidates(other, space_config(other))}
    done = {_label(t) for t in _trials(other, tmp_path) if t.state == optuna.trial.TrialState.COMPLETE}
    assert labels <= done and len(_trials(other, tmp_path, "full_distillation")) >= 1


_DRIVER = """
import json, sys
import yaml
from nas.search import init_ray, prepare
from nas.space import parse_space
from nas.workers import resident_bytes
init_ray(None, __import__("pathlib").Path(sys.argv[1]), num_cpus=1)
for path in sys.argv[2:]:
    shared = prepare(parse_space(yaml.safe_load(open(path))), sys.argv[1])
    print(json.dumps({"peak": resident_bytes(peak=True), "train_rows": len(shared.train_rows)}))
"""


@pytest.mark.ray  # its driver process starts a Ray
def test_driver_memory_does_not_grow_with_the_corpus(tmp_path, tiny_tokenizer):
    """`prepare` (tokenising, sharing the shards, importance and the teacher cache in a Ray task) in a fresh driver
    process on a corpus of 12 MB, then in the same process on one of 60 MB: the driver's peak memory grows by less
    than half of what holding the larger corpus would add (its text alone is 48 MB more; its 32M more token ids
    64 MB as uint16). One process: the second peak is the high-water mark over both, and two processes' peaks
    differ by up to 20 MiB from run to run."""
    import subprocess

    import yaml

    text = (tiny_space.__globals__["WIKITEXT"] / "valid.txt").read_text()
    spaces = []
    for mb in (12, 60):
        corpus = tmp_path / f"corpus-{mb}.txt"
        with corpus.open("w") as f:
            for _ in range(mb * 2**20 // len(text) + 1):
                f.write(text)
        spec = tiny_space(tmp_path / "inputs", tiny_tokenizer, name=f"c{mb}", data=str(corpus),
                          short_retrain={"teacher_topk": 8})
        spaces.append(tmp_path / f"c{mb}.yaml")
        spaces[-1].write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path / "runs"), *map(str, spaces)],
                         capture_output=True, text=True, env={**__import__("os").environ,
                                                               "NAS_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    peaks = dict(zip((12, 60), map(json.loads, out.stdout.strip().splitlines()[-2:]), strict=True))
    for mb in peaks:
        assert (tmp_path / "runs" / f"c{mb}" / "teacher_topk" / "index.json").exists()
    rows = {mb: json.loads((tmp_path / "runs" / f"c{mb}" / "tokens" / "index.json").read_text())["rows"] for mb in peaks}
    assert rows[60] > 4.5 * rows[12]  # the larger corpus really is tokenised whole
    growth = peaks[60]["peak"] - peaks[12]["peak"]
    # Below the larger corpus's text alone (45.8 MiB more), with room for what the second run allocates anew (seen:
    # 21.5 MiB; a driver holding the corpus would grow by both).
    assert growth < 40 * 2**20, (growth / 2**20, peaks)
