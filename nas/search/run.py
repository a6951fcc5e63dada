"""The whole search (`nas search`): check the space and plan, start Ray, prepare, run the trials, promote, report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from nas.errors import ConfigError
from nas.plan import check_fits
from nas.search.cluster import init_ray, ray_cluster, this_machine
from nas.search.liveness import _register_driver
from nas.search.preparation import candidates, prepare, storage_url
from nas.search.promotion import _promote_best
from nas.search.report import summarize
from nas.search.searcher import _tune
from nas.search.study import _check_study, _plan, open_study, study_storage
from nas.search.trials import run_trial
from nas.space import SearchSpace
from nas.storage import RunStorage, is_uri


def run_search(space: SearchSpace, root: str | Path = "trials", address: str | None = None,
               trial_fn: Callable = run_trial, echo: Callable[[str], None] = lambda line: None) -> Any:
    """The whole job; re-running it resumes (finished trials and promotions are not redone, interrupted ones go on
    from their checkpoints)."""
    url = storage_url(space, root)
    if is_uri(str(root)) and max(space.resources.workers_per_trial, space.full_retrain.workers) > 1:
        # Every worker writes its checkpoint shards into the run's folder, so it must be one path they all reach.
        raise ConfigError(f"--root {root}: retrains on several workers (resources.workers_per_trial, "
                          f"full_retrain.workers) need a run folder on a filesystem every node mounts, not a URI")
    import ray

    config, _ = candidates(space)  # the family and the budget, before Ray starts
    # A private Ray would run on this machine: the plan is checked against it before anything starts.
    private = not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())
    stages = check_fits(space, config, this_machine(space)) if private else None
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    storage = study_storage(url)
    study = open_study(space, storage=storage)
    _check_study(space, study)  # before Ray starts and `prepare` rewrites the teacher cache
    reached = init_ray(address, Path(RunStorage(root, space.study).uri))
    stages = stages or check_fits(space, config, ray_cluster(space))
    shared = prepare(space, root, stages, echo)
    study.set_user_attr("parent", space.parent)
    _register_driver(study)
    sampler, enqueue, n_trials = _plan(space, study, list(shared.rows))
    echo(f"{space.name}: {len(shared.rows)} feasible candidates, {n_trials} trials to run ({sampler}) on {reached}")
    echo(f"run folder {shared.storage.uri}; study {space.study} in {url}")
    echo(f"watch: optuna-dashboard {url}")
    if n_trials:
        _tune(space, shared, study, storage, enqueue, n_trials, trial_fn, echo)
    _promote_best(space, shared, study, storage, echo)
    return summarize(space, root)
