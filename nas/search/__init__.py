"""The search service (paper §2.3, best practice #9): importance once, a Ray Tune run over the feasible
candidates with Optuna choosing them, promotion of the best to full distillation, a study summary.

Ray and Optuna sit behind this package only. An Optuna trial's parameters are the architecture axes
(`nas.space.AXES`, a family's unit axes, the layers kept of each kind, whose sum is the depth), as integers so
that a study re-runs after any change to its space (`study._distributions`), and so the dashboard's slice, contour and
importance plots read them; its user attributes hold the candidate's label, exact parameter count (and active
count), share of the parent and stage. A trial is a plain function of those axes and the shared inputs, so it can
be replayed from its parameters alone (`trials.replay_trial`). A study holds one set of retrain settings
(`study._check_study`).

Files live in the run folder (`nas.storage.RunStorage`: a local path or a URI every node reaches):
    importance.safetensors, teacher_topk/               computed once (in Ray tasks), read by every trial
    tokens/                                             the token shards trials read their training sequences from
    <label>/{architecture.json, metrics.jsonl, result.json}   one folder per trial
    <label>/checkpoint/                                 while it trains: its newest DCP checkpoint, to resume from
    promoted/<label>/{..., model/}                      full distillation of the promoted candidates
    summary.{parquet,csv}, pareto.png, curves.png, best.json

Trial states: COMPLETE (trained to the end), PRUNED (never trained: no candidate, or its label is taken; or
stopped by ASHA, with its curve), FAIL (failed after its retries, or its driver died), RUNNING (its driver
records a heartbeat, so another driver on the same study leaves it running while that driver lives). A
promotion is a trial of stage full_distillation, RUNNING while it trains: the claim on its label (`promotion._claim`).

Modules, by job: `preparation` (run folder, parent work, `Shared`), `trials` (a retrain, its checkpoints),
`cluster` (Ray), `study` (Optuna study, parameters, settings, what to run), `liveness` (drivers, heartbeats),
`searcher` (Ray Tune), `promotion`, `report` (summary, plots, export), `run` (`run_search`, the whole job).
"""

from nas.architecture import short_label as label_of
from nas.search.cluster import init_ray
from nas.search.preparation import METRIC, TRIAL_FILES, Shared, prepare, retrain_config, storage_url
from nas.search.report import export_best, summarize, winner
from nas.search.run import run_search
from nas.search.study import open_study, study_storage
from nas.search.trials import build_candidate, candidate_inputs, promote, replay_trial, run_trial

__all__ = ["METRIC", "TRIAL_FILES", "Shared", "build_candidate", "candidate_inputs", "export_best", "init_ray",
           "label_of", "open_study", "prepare", "promote", "replay_trial", "retrain_config", "run_search", "run_trial",
           "storage_url", "study_storage", "summarize", "winner"]
