"""The Optuna study of a search: its storage, its settings checks, the trial parameters (the architecture axes as
integers) and attributes, the labels taken, and the plan of what a (resumed) run still has to do."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

from nas.architecture import KIND_AXIS, short_label as label_of
from nas.errors import ConfigError
from nas.search import liveness  # HEARTBEAT_S, GRACE_S: read there at call time, where a test shortens them
from nas.search.liveness import _fail_dead_trials
from nas.search.per_layer import DIGEST
from nas.search.preparation import SHORT, retrain_config, storage_url
from nas.space import AXES, RetrainSpec, SearchSpace, row_axes


def study_storage(url: str):
    """The Optuna database, with heartbeats on: a driver records one for each trial it runs (`_Heartbeat`), which is
    how a later driver tells a dead driver's trial from another driver's live one."""
    import optuna

    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9; they are its way to do this
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=liveness.HEARTBEAT_S, grace_period=liveness.GRACE_S)


def open_study(space: SearchSpace, root: str | Path = "trials", url: str | None = None, storage=None):
    """The space's Optuna study (made on first use), in `storage` or the database at `url` (default: the space's)."""
    import optuna

    storage = storage or study_storage(url or storage_url(space, root))
    s = space.search
    # NSGA-II's first generation is random: a population of a quarter of the trials leaves room for the others.
    sampler = optuna.samplers.NSGAIISampler(seed=s.seed, population_size=max(4, min(50, s.max_trials // 4))) \
        if s.sampler == "nsga2" else optuna.samplers.TPESampler(seed=s.seed)
    study = optuna.create_study(study_name=space.study, storage=storage, directions=s.directions,
                                load_if_exists=True, sampler=sampler)
    made = study.metric_names  # None: a new study
    if [d.name.lower() for d in study.directions] != s.directions or made not in (None, list(s.objectives)):
        raise ConfigError(f"search.objectives={s.objectives}: study {space.study} was made with objectives "
                          f"{made or len(study.directions)}; give the space another study_name")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(space.search.objectives))  # the dashboard's names for the objectives
    return study


def _retrain_settings(space: SearchSpace) -> dict[str, Any]:
    """What decides each stage's runs, by the space's field: all that a resumed run's checkpoint must match (its
    DistillConfig but how often it evaluates and checkpoints), the sequence length and the teacher cache's K."""
    out = {"seq_len": space.seq_len, "short_retrain.teacher_topk": space.short_retrain.teacher_topk}
    spec_fields = {f.name for f in dataclasses.fields(RetrainSpec)} | {"seed"}
    for section in ("short_retrain", "full_retrain"):
        cfg = dataclasses.asdict(retrain_config(getattr(space, section), space.seq_len, space.search.seed, 1))
        out |= {"search.seed" if k == "seed" else f"{section}.{k}": v for k, v in cfg.items()
                if k in spec_fields and k not in ("eval_every", "checkpoint_every")}
    return out


def _check_study(space: SearchSpace, study) -> None:
    """A study holds the runs of one set of retrain settings (`_retrain_settings`), which its losses compare: a
    re-run under others is refused, saying what changed, before anything runs. So is a study whose axes are
    categorical parameters (made before they were integers), which Optuna cannot extend."""
    import optuna

    now, before = _retrain_settings(space), study.user_attrs.get("retrain_settings")
    changed = [f"{k}={v} (was {before.get(k)})" for k, v in now.items() if before is not None and before.get(k) != v]
    if changed:
        raise ConfigError(f"{', '.join(changed)}: study {space.study} holds runs trained with the earlier settings; "
                          f"set them back, or give the space another study_name to search under the new ones")
    made = next((t for t in study.get_trials(deepcopy=False) if t.distributions), None)
    if made and any(isinstance(d, optuna.distributions.CategoricalDistribution) for d in made.distributions.values()):
        raise ConfigError(f"study_name: study {space.study} was made by an earlier nas, whose axes Optuna cannot "
                          f"extend; give the space another study_name")
    study.set_user_attr("retrain_settings", now)


def _loss(trial) -> float | None:
    """A finished trial's validation loss (its first objective)."""
    return trial.values[0] if trial.values else None


def _objectives(space: SearchSpace, row: dict[str, Any], loss: float) -> float | list[float]:
    """What a trial tells Optuna: its loss, and with several objectives its figures for the others."""
    if len(space.search.objectives) == 1:
        return loss
    return [loss, *(float(row[k]) for k in space.search.objectives[1:])]


def _enqueue(study, row: dict[str, Any]) -> None:
    """Queue a candidate for the next `ask`, its label beside it (what a resumed run reads as queued)."""
    study.enqueue_trial(_params(row), user_attrs={"enqueued": row["label"]})


def _stage(trial) -> str:
    return trial.user_attrs.get("stage", SHORT)


def _label(trial) -> str | None:
    axes = _axes(trial.params)
    return _label_of(trial.params) if set(AXES) <= set(axes) else None


def _label_of(params: dict[str, Any]) -> str:
    """A candidate's label from its Optuna parameters (`_params`)."""
    digest = params.get(DIGEST)
    return label_of(_axes(params)) + (f"-P{int(digest):06x}" if digest else "")


def _params(row: dict[str, Any]) -> dict[str, int]:
    """A candidate's Optuna parameters: its axes, less the depth where the layers kept of each kind are axes (the
    depth is their sum: as a parameter of its own, a sampler would propose depths they disagree with)."""
    axes = row_axes(row)
    if any(k.startswith(KIND_AXIS) for k in axes):
        del axes["num_hidden_layers"]
    if DIGEST in row:
        axes[DIGEST] = int(row[DIGEST])
    return axes


def _axes(params: dict[str, Any]) -> dict[str, Any]:
    """A candidate's axes from its Optuna parameters (`_params`): the depth added back as the sum of the kinds'."""
    kinds = [v for k, v in params.items() if k.startswith(KIND_AXIS)]
    return {**params, "num_hidden_layers": sum(kinds)} if kinds and "num_hidden_layers" not in params else params


def _distributions(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each parameter over this run's candidates: integers from the least value to the largest, in steps of their
    greatest common difference. Not a categorical over those values: Optuna refuses to change a categorical's
    choices within a study, and they change whenever the budget, the axes or a cap does, while an integer
    distribution's range may differ from one run of a study to the next (Optuna checks its kind and log scale
    only; tests/test_search_driver.py holds it to that). The dashboard reads integer axes in numeric order."""
    import optuna

    values: dict[str, set[int]] = {}
    for row in rows.values():
        for k, v in _params(row).items():
            values.setdefault(k, set()).add(v)
    return {k: optuna.distributions.IntDistribution(min(v), max(v), step=math.gcd(*(x - min(v) for x in v)) or 1)
            for k, v in values.items()}


def _taken(study) -> dict[str, str]:
    """The short-retrain labels not to train again, with why: finished, stopped by ASHA, or running (here or under
    another driver)."""
    import optuna

    state = optuna.trial.TrialState
    taken: dict[str, str] = {}
    for t in study.get_trials(deepcopy=False, states=(state.COMPLETE, state.RUNNING, state.PRUNED)):
        label = t.user_attrs.get("label")
        if label is None or _stage(t) != SHORT:  # an infeasible proposal, a promotion, or not accepted yet
            continue
        if t.state == state.COMPLETE:
            taken[label] = f"duplicate: {label} was trained in trial {t.number}"
        elif t.state == state.RUNNING:
            taken.setdefault(label, f"duplicate: {label} is training in trial {t.number}")
        elif t.user_attrs.get("stopped_by") == "asha":
            taken.setdefault(label, f"duplicate: {label} was stopped by ASHA in trial {t.number}")
    return taken


def _plan(space: SearchSpace, study, labels: list[str]) -> tuple[str, list[str], int]:
    """(sampler, labels to enqueue, number of trials still to run), resuming what the study already holds."""
    import optuna

    _fail_dead_trials(study)
    taken = _taken(study)
    # Candidates a killed run enqueued but never started: the next run's Tune trials take them first.
    waiting = [t.user_attrs["enqueued"] for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
               if "enqueued" in t.user_attrs]
    sampler = space.search.sampler
    if sampler == "auto":  # (a per-layer search trains each of the program's solutions)
        sampler = "grid" if space.per_layer or len(labels) <= space.search.max_trials else "tpe"
    if sampler == "grid":
        remaining = [label for label in labels if label not in taken]
        return sampler, [label for label in remaining if label not in waiting], len(remaining)
    return sampler, [], max(0, space.search.max_trials - len(taken))
