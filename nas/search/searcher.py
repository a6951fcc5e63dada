"""Ray Tune over the study: the searcher that turns Optuna's proposals into Tune trials (`ArchitectureSearch`),
the progress lines, and the Tune run itself (`_tune`) with ASHA."""

from __future__ import annotations

import itertools
import os
import time
import warnings
from typing import Any, Callable

import numpy as np
from ray import tune
from ray.tune.search import Searcher

from nas.architecture import FIGURES
from nas.parents import parent_config
from nas.search.liveness import DRIVER, _Heartbeat
from nas.search.preparation import METRIC, SHORT, Shared, final_tokens, retrain_config
from nas.search.study import DIGEST, _axes, _distributions, _enqueue, _label_of, _objectives, _taken
from nas.space import MEASURED, SearchSpace, candidate_problem

REJECTIONS = 20  # proposals in a row that are no free candidate, after which the searcher picks one itself


class Progress(tune.Callback):
    """One line per finished trial: n/N, label, params, val loss, tokens, trial time, elapsed, ETA."""

    def __init__(self, total: int, rows: dict[str, dict[str, Any]], final: int, echo: Callable[[str], None]):
        self.total, self.rows, self.final, self.echo = total, rows, final, echo
        self.done, self.start = 0, time.time()

    def line(self, trial, what: str) -> None:
        self.done += 1
        elapsed = time.time() - self.start
        eta = elapsed / self.done * max(0, self.total - self.done)
        label = _label_of(trial.config)
        r = trial.last_result or {}
        self.echo(f"[{self.done}/{self.total}] {label} {self.rows[label]['params'] / 1e6:.1f}M {what} "
                  f"{_fmt(r.get(METRIC), '.4f')}, {_fmt(r.get('tokens'), ',')} tokens, "
                  f"{_fmt(r.get('time_total_s'), '.0f')} s; elapsed {elapsed:.0f} s, ETA {eta:.0f} s")

    def on_trial_complete(self, iteration, trials, trial, **info):
        stopped = (trial.last_result or {}).get("tokens", self.final) < self.final
        self.line(trial, "stopped by ASHA; val loss" if stopped else "val loss")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.line(trial, "FAILED after retries; last val loss")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.echo(f"[retry] {_label_of(trial.config)} failed (failure {trial.num_failures}); retrying")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class ArchitectureSearch(Searcher):
    """Ray Tune's search algorithm over Optuna's ask-and-tell: one Optuna trial per Tune trial, its parameters the
    architecture axes, its intermediate values indexed by training tokens. A proposal that is no candidate (outside
    the budget, not a valid child) or whose label is taken (`_taken`) is recorded as pruned with the reason and never
    trained, and does not use up a Tune trial; a trial ASHA stops is recorded as pruned, with its curve."""

    def __init__(self, space: SearchSpace, rows: dict[str, dict[str, Any]], study, storage, enqueue: list[str],
                 outside: set[str] = frozenset()):
        super().__init__(metric=METRIC, mode="min")
        self.space, self.rows, self.study, self.storage, self.outside = space, rows, study, storage, outside
        self.config = parent_config(space.parent)
        self.final = final_tokens(space.short_retrain, space.seq_len)
        self.distributions = _distributions(rows)
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.live: dict[str, Any] = {}  # Tune trial id -> its Optuna trial
        self.ids: dict[str, int] = {}  # Tune trial id -> its Optuna trial's id in the storage (for heartbeats)
        self.reported: dict[str, set[int]] = {}
        self.rng = np.random.default_rng(space.search.seed)
        for label in enqueue:
            _enqueue(study, rows[label])

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the metric, mode and space are this searcher's own

    def live_trial_ids(self) -> list[int]:
        return list(self.ids.values())

    def _problem(self, params: dict[str, int], taken: dict[str, str]) -> str | None:
        """Why a proposal is not trained (None: it is a free candidate)."""
        axes = _axes(params)
        label = _label_of(params)
        if label in self.rows:
            return taken.get(label)
        if params.get(DIGEST):
            return "not among this run's per-layer candidates (the assembly's solutions)"
        return candidate_problem(self.space, self.config, axes) or \
            ("measured outside the speed budget (infeasible.json)" if label in self.outside else
             "not among this run's candidates (not in the product of its axes' values)")

    def suggest(self, trial_id: str):
        import optuna

        with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize": ours is _Heartbeat
            warnings.simplefilter("ignore", UserWarning)
            for attempt in itertools.count():
                taken = _taken(self.study)  # afresh: another driver may take a label at any time
                free = sorted(set(self.rows) - set(taken))
                if not free:
                    return Searcher.FINISHED
                if attempt >= REJECTIONS:
                    # TPE keeps proposing taken or infeasible ones: a free one at random, until one is this driver's
                    # (each lost to another driver leaves one fewer free)
                    _enqueue(self.study, self.rows[free[self.rng.integers(len(free))]])
                trial = self.study.ask(self.distributions)
                storage_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
                self.storage.record_heartbeat(storage_id)
                trial.set_user_attr("driver", DRIVER)
                params = trial.params
                problem = self._problem(params, taken)
                if problem is None:
                    row = self.rows[_label_of(params)]
                    for key in ("label", *FIGURES, "share_of_parent"):
                        if key in row:
                            trial.set_user_attr(key, row[key])
                    trial.set_user_attr("stage", SHORT)
                    self.live[trial_id], self.ids[trial_id] = trial, storage_id
                    return params
                trial.set_user_attr("pruned_reason", problem)
                self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._report(trial_id, self.live[trial_id], result)

    def _report(self, trial_id: str, trial, result: dict) -> None:
        # A retried trial reports again the evaluations its checkpoint had passed: each is recorded once. (Optuna
        # keeps no intermediate values in a multi-objective study: its curves are in the trials' metrics.jsonl.)
        tokens, reported = int(result["tokens"]), self.reported.setdefault(trial_id, set())
        if tokens not in reported and len(self.space.search.objectives) == 1:
            reported.add(tokens)
            trial.report(result[METRIC], tokens)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        trial, _ = self.live.pop(trial_id, None), self.ids.pop(trial_id, None)
        if trial is None:
            return
        if error or not result or METRIC not in result:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            return
        # The result ASHA stopped a trial on (the last one, at the end too) never reached on_trial_result.
        self._report(trial_id, trial, result)
        if result["tokens"] < self.final:
            trial.set_user_attr("stopped_by", "asha")
            trial.set_user_attr("pruned_reason", f"stopped by ASHA after {result['tokens']:,} of {self.final:,} tokens")
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
        else:
            row = self.rows[trial.user_attrs["label"]]
            self.study.tell(trial, _objectives(self.space, row, result[METRIC]), skip_if_finished=True)


def _tune(space: SearchSpace, shared: Shared, study, storage, enqueue: list[str], n_trials: int, trial_fn: Callable,
          echo: Callable[[str], None]) -> None:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's console table off (verbose=0 below); nas prints its own lines
    # ASHA's rungs in training tokens: the first report's, then doubling up to the end (a retried or resumed trial
    # reports later tokens from its first report on, which a count of reports would misplace).
    cfg = retrain_config(space.short_retrain, space.seq_len, space.search.seed, 1)
    first = cfg.eval_every * cfg.batch_size * cfg.grad_accum * space.seq_len
    scheduler = ASHAScheduler(time_attr="tokens", grace_period=first, reduction_factor=2,
                              max_t=final_tokens(space.short_retrain, space.seq_len)) \
        if space.search.asha else FIFOScheduler()
    res = space.resources
    # A multi-worker trial only waits on its Ray Train job, whose workers ask for the CPUs and GPUs themselves.
    # Tune needs some resource to place a trial: one byte of memory, which (unlike a sliver of a CPU) never keeps
    # a worker group's whole CPUs from fitting on a node.
    resources = {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial} if res.workers_per_trial == 1 \
        else {"cpu": 0, "memory": 1}
    trainable = tune.with_resources(tune.with_parameters(trial_fn, shared=shared), resources)
    measured = space.budget.speed_caps or set(MEASURED) & set(space.search.objectives)
    outside = {r["label"] for r in shared.storage.read_json("infeasible.json") or []} if measured else set()
    search = ArchitectureSearch(space, shared.rows, study, storage, enqueue, outside)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=n_trials, metric=METRIC,
                                    mode="min", max_concurrent_trials=res.max_concurrent,
                                    reuse_actors=True),  # a trial worker keeps its loaded parent for the next
        run_config=tune.RunConfig(name=f"tune-{int(time.time())}", storage_path=f"{shared.storage.uri}/ray_results",
                                  failure_config=tune.FailureConfig(max_failures=space.search.retries), verbose=0,
                                  callbacks=[Progress(n_trials, shared.rows, search.final, echo)]),
    )
    with _Heartbeat(storage, search.live_trial_ids):
        tuner.fit()
