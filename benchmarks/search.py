"""`nas-bench search`: the demo search's wall time, Ray/Optuna overhead against a plain loop of the same trials,
ASHA against exhaustive short retraining."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from benchmarks.common import DEMO_SPACE, RESULTS


def run() -> dict[str, Any]:
    import optuna

    from nas.search import prepare, replay_trial, run_search, storage_url
    from nas.space import load_space

    space = load_space(DEMO_SPACE)
    root = RESULTS / "search-trials"
    out: dict[str, Any] = {}
    start = time.perf_counter()
    frame = run_search(space, root)
    out["demo_wall_s"] = time.perf_counter() - start
    done = frame[frame["state"] == "COMPLETE"]
    out["trials"] = int(len(done))
    out["ray_trial_wall_s"] = float(done["wall_s"].sum())
    study = optuna.load_study(study_name=space.study, storage=storage_url(space, root))
    out["ray_trial_durations_s"] = float(sum(t.duration.total_seconds() for t in study.trials if t.duration))
    out["exhaustive_winner"] = done.loc[done["val_loss"].idxmin(), "label"]

    shared = prepare(space, RESULTS / "plain-loop")
    plain = []
    for label in shared.rows:
        t0 = time.perf_counter()
        replay_trial(shared, label)
        plain.append(time.perf_counter() - t0)
    out["plain_loop_trial_s"] = sum(plain)
    out["ray_overhead_per_trial_s"] = (out["ray_trial_durations_s"] - sum(plain)) / len(plain)
    out["ray_overhead_share"] = out["ray_trial_durations_s"] / sum(plain) - 1

    asha = dataclasses.replace(space, name="smollm2-135m-demo-asha",
                               search=dataclasses.replace(space.search, asha=True),
                               short_retrain=dataclasses.replace(space.short_retrain, reports=4), promote=0)
    start = time.perf_counter()
    asha_frame = run_search(asha, root)
    out["asha_wall_s"] = time.perf_counter() - start
    asha_done = asha_frame[asha_frame["state"] == "COMPLETE"]
    out["asha_winner"] = asha_done.loc[asha_done["val_loss"].idxmin(), "label"]
    asha_tokens = 0
    stopped = asha_frame["note"].fillna("").str.startswith("stopped by ASHA")
    for label in asha_frame[(asha_frame["state"] == "COMPLETE") | stopped]["label"]:
        metrics = (root / asha.study / label / "metrics.jsonl").read_text().splitlines()
        asha_tokens += max(json.loads(line).get("tokens", 0) for line in metrics)
    out["asha_retrain_tokens"] = asha_tokens
    out["exhaustive_retrain_tokens"] = int(done["tokens"].fillna(0).sum()) or \
        len(done) * space.short_retrain.tokens
    out["same_winner"] = out["asha_winner"] == out["exhaustive_winner"]
    out["goal_ray_overhead_share"] = 0.10
    return out
