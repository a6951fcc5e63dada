"""Promotion: the best short retrains (by loss, or along the Pareto front) claimed in the study and distilled in
full, as Ray tasks or, on several workers, Ray Train jobs in turn."""

from __future__ import annotations

import time
from typing import Callable

from nas.architecture import FIGURES
from nas.plan import retrain_gpus
from nas.search.liveness import DRIVER, _Heartbeat, _fail_dead_trials
from nas.search.preparation import FULL, SHORT, Shared
from nas.search.report import _evals, _pareto_front
from nas.search.study import _distributions, _label, _loss, _objectives, _params, _stage
from nas.search.trials import promote
from nas.space import SearchSpace


def _promote_best(space: SearchSpace, shared: Shared, study, storage, echo: Callable[[str], None]) -> None:
    import optuna
    import ray

    # Candidates of this run only: a re-run under a tighter budget may have trained some it now excludes.
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if _stage(t) == SHORT and _label(t) in shared.rows]
    best = _front_picks(space, complete) if space.search.promotion == "front" else \
        sorted(complete, key=_loss)[: space.promote]
    claims = _claim(study, storage, shared, [_label(t) for t in best])
    if not claims:
        return
    todo = list(claims)
    res = space.resources
    echo(f"promoting {', '.join(todo)} to full distillation ({space.full_retrain.tokens:,} tokens each)")
    start = time.time()

    def done(n: int, result: dict) -> None:
        _record_promoted(study, storage, shared, claims.pop(result["label"]), result)
        echo(f"[promoted {n}/{len(todo)}] {result['label']} val loss {result['val_loss']:.4f} "
             f"after {result['tokens']:,} tokens; elapsed {time.time() - start:.0f} s")

    try:
        with _Heartbeat(storage, lambda: [storage_id for _, storage_id in list(claims.values())]):
            if space.full_retrain.workers > 1:  # each one a Ray Train job of its own, in turn
                for n, label in enumerate(todo, 1):
                    done(n, promote(shared, label))
                return
            task = ray.remote(promote).options(num_cpus=res.cpus_per_trial,
                                               num_gpus=retrain_gpus(res, 1, promoted=True),
                                               max_retries=space.search.retries)
            pending = [task.remote(shared, label) for label in todo]
            while pending:
                ready, pending = ray.wait(pending)
                done(len(todo) - len(pending), ray.get(ready[0]))
    finally:  # a promotion that failed gives up its claim (a re-run promotes it again, from its checkpoint)
        for number, _ in claims.values():
            study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def _claim(study, storage, shared: Shared, labels: list[str]) -> dict[str, tuple[int, int]]:
    """Claim the promotion of each label that no driver has promoted or is promoting, as a trial claims its label:
    a RUNNING full-distillation trial of this driver (failed by `_fail_dead_trials` once the driver is gone, and
    promoted again then). Of two drivers that claim one label at once, the earlier trial keeps it and the later is
    pruned. Returns label -> (trial number, id in the storage) of this driver's claims."""
    import optuna

    state = optuna.trial.TrialState
    _fail_dead_trials(study)

    def promotions() -> list:
        return [t for t in study.get_trials(deepcopy=False, states=(state.COMPLETE, state.RUNNING))
                if _stage(t) == FULL]

    held = {t.user_attrs.get("label") for t in promotions()}
    distributions = _distributions(shared.rows)
    for label in (label for label in labels if label not in held):
        row = shared.rows[label]
        study.add_trial(optuna.trial.create_trial(
            state=state.RUNNING, params=_params(row), distributions={k: distributions[k] for k in _params(row)},
            user_attrs={"label": label, **{k: row[k] for k in (*FIGURES, "share_of_parent") if k in row},
                        "stage": FULL, "driver": DRIVER}))
    study_id, claims, first = storage.get_study_id_from_name(study.study_name), {}, {}
    for t in sorted(promotions(), key=lambda t: t.number):
        label, mine = t.user_attrs.get("label"), t.state == state.RUNNING and t.user_attrs.get("driver") == DRIVER
        storage_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number) if mine else None
        if label in first and mine:  # another driver claimed it first
            storage.set_trial_user_attr(storage_id, "pruned_reason",
                                        f"duplicate: {label} is promoted in trial {first[label].number}")
            study.tell(t.number, state=state.PRUNED, skip_if_finished=True)
        elif label not in first:
            first[label] = t
            if mine and label not in held:
                storage.record_heartbeat(storage_id)
                claims[label] = (t.number, storage_id)
    return claims


def _front_picks(space: SearchSpace, trials: list) -> list:
    """`promote` trials spread along the Pareto front of loss against the second objective (all of it when it
    has no more points), from the lowest loss on."""
    front = [trials[i] for i in _pareto_front([(t.values[1], t.values[0]) for t in trials],
                                              space.search.directions[1])]
    front.sort(key=_loss)
    if len(front) <= space.promote:
        return front
    return [front[round(i * (len(front) - 1) / max(1, space.promote - 1))] for i in range(space.promote)]


def _record_promoted(study, storage, shared: Shared, claim: tuple[int, int], result: dict) -> None:
    """Record a full distillation on its claim (`_claim`): stage 'full_distillation', the candidate's axes as
    parameters, its validation curve by tokens."""
    number, storage_id = claim
    if len(shared.space.search.objectives) == 1:  # (Optuna keeps no intermediate values with several)
        for tokens, loss in _evals(shared.storage, f"promoted/{result['label']}"):
            storage.set_trial_intermediate_value(storage_id, tokens, loss)
    study.tell(number, _objectives(shared.space, shared.rows[result["label"]], result["val_loss"]))
