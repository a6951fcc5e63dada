"""The report of a study: the summary table, pareto.png/json, curves.png, the dashboard's contour plot, the
winner, and its export (`nas export`)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from nas.architecture import FIGURES, Architecture
from nas.errors import NasError
from nas.families import Parent
from nas.files import atomic_dir, write_json
from nas.parents import parent_config
from nas.search.per_layer import ABSENT, DIGEST, LEVELS, strips
from nas.search.preparation import FULL, METRIC, SHORT
from nas.search.study import _axes, _label, _loss, _stage, open_study
from nas.space import SearchSpace, row_axes
from nas.storage import RunStorage


def summarize(space: SearchSpace, root: str | Path = "trials"):
    """A table of every trial (architecture, params, losses, tokens, wall time) saved as parquet, CSV and plots."""
    import optuna
    import pandas as pd

    study = open_study(space, root)
    storage = RunStorage(root, space.study)
    trials = study.get_trials(deepcopy=False)
    complete = optuna.trial.TrialState.COMPLETE
    promoted = {_label(t): _loss(t) for t in trials if _stage(t) == FULL and t.state == complete}
    rows = []
    for t in trials:
        if _stage(t) == FULL:
            continue
        label = _label(t)
        # The label's run, on the trial that trained it (not on a duplicate proposal of it)
        result = (storage.read_json(f"{label}/result.json") or {}) if label and t.state == complete else {}
        rows.append({"trial": t.number, "state": t.state.name, "label": label,
                     **_axes(t.params), **{k: t.user_attrs.get(k) for k in FIGURES},
                     "share_of_parent": t.user_attrs.get("share_of_parent"), METRIC: _loss(t),
                     "val_kd": result.get("val_kd"), "tokens": result.get("tokens"),
                     "wall_s": result.get("wall_s") or (t.duration.total_seconds() if t.duration else None),
                     "promoted_val_loss": promoted.get(label), "note": t.user_attrs.get("pruned_reason")})
    # Candidates outside the speed budget: measured, never trained.
    trained = {r["label"] for r in rows}  # (a re-run under a tighter budget can exclude a trained one: listed once)
    rows += [{"state": "INFEASIBLE", "label": r["label"], **row_axes(r), **{k: r.get(k) for k in FIGURES},
              "share_of_parent": r.get("share_of_parent"), "note": r["infeasible"]}
             for r in storage.read_json("infeasible.json") or [] if r["label"] not in trained]
    _add_strips(space, storage, rows)
    frame = pd.DataFrame(rows)
    # Figures that do not apply to this search (a dense parent's active count, speed without a speed budget).
    frame = frame.drop(columns=[k for k in FIGURES if k != "params" and frame[k].isna().all()])
    parent = storage.read_json("parent.json") or {}
    # By label and stage: a promoted candidate has its short retrain's curve and its full distillation's (read
    # from the trials' metrics.jsonl where the study keeps no intermediate values: a multi-objective one).
    # A proposal pruned as a duplicate has no curve, and does not replace the curve of the trial that trained.
    several, curves = len(space.search.objectives) > 1, {}
    for t in trials:
        curve = sorted(t.intermediate_values.items()) or (_evals(storage, f"promoted/{_label(t)}" if _stage(t) == FULL
                                                                 else _label(t)) if several and t.state == complete else [])
        if curve and _label(t):
            curves[(_label(t), _stage(t))] = curve
    with tempfile.TemporaryDirectory() as tmp:  # written whole, then each replaces the run folder's in one step
        out = Path(tmp)
        frame.to_parquet(out / "summary.parquet", index=False)
        frame.to_csv(out / "summary.csv", index=False)
        _plot_pareto(frame, parent, out, space.search.objectives[1] if len(space.search.objectives) > 1 else "params",
                     space.search.directions[1] if len(space.search.objectives) > 1 else "minimize")
        _plot_curves(curves, parent, out / "curves.png")
        names = ["summary.parquet", "summary.csv", "pareto.png", "pareto.json", "curves.png"]
        if space.per_layer is not None:
            _plot_layers(frame, out / "layers.png")
            names.append("layers.png")
        for name in names:
            storage.upload(out / name, name)
    _save_contour(study)
    return frame


def _save_contour(study) -> None:
    """Optuna's contour plot of the short retrains, saved in the study for the dashboard's overview page. The
    dashboard's own contour orders a categorical axis's values as strings (1024 before 768) and, with pruned
    trials in the study, draws points in the wrong cells; Optuna's places numeric choices on a numeric axis and
    reads finished trials only."""
    import optuna
    from optuna_dashboard import save_plotly_graph_object

    short = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
             if _stage(t) == SHORT]
    varied = [k for k in short[0].params if len({t.params[k] for t in short}) > 1] if short else []
    if len(short) < 2 or len(varied) < 2:
        return
    # In memory: the short retrains alone, no promotions.
    finished = optuna.create_study(directions=[d.name.lower() for d in study.directions])
    finished.add_trials(short)
    figure = optuna.visualization.plot_contour(finished, params=varied, target=_loss, target_name=METRIC)
    save_plotly_graph_object(study, figure, graph_object_id="contour")


def _pareto_front(points: list[tuple[float, float]], direction: str = "minimize") -> list[int]:
    """The indices of the (x, loss) points no other point beats on both (x minimised, or maximised), in the order
    of x; of equal points, the first. One rule for pareto.json and the promotion ("front")."""
    sign = 1 if direction == "minimize" else -1
    front, best = [], float("inf")
    for i in sorted(range(len(points)), key=lambda i: (sign * points[i][0], points[i][1], i)):
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


#: The x axis of pareto.png by the search's second objective (size when it has none): label, scale.
_AXES = {"params": ("parameters (M)", 1e-6), "active_params": ("active parameters (M)", 1e-6),
         "memory_bytes": ("memory: weights and KV cache (GiB)", 2**-30),
         "latency_ms": ("decode latency (ms a token, measured)", 1.0),
         "prefill_ms": ("prefill latency (ms, measured)", 1.0), "throughput": ("throughput (tokens/s, measured)", 1.0)}


def _plot_pareto(frame, parent: dict[str, Any], out: Path, x: str = "params", direction: str = "minimize") -> None:
    """pareto.png: validation loss against `x` (the second objective, else size) with the front, and pareto.json:
    the same points and front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame[frame["state"] == "COMPLETE"]
    name, scale = _AXES[x]
    if "device_name" in done and done["device_name"].notna().any():
        name = name.replace("measured", f"measured on {', '.join(sorted(set(done['device_name'].dropna())))}")
    fig, ax = plt.subplots(figsize=(8, 5))
    points = list(zip(done[x] * scale, done[METRIC])) if len(done) else []
    front = [points[i] for i in _pareto_front(points, direction)]
    if len(done):
        ax.scatter(done[x] * scale, done[METRIC], label="short retrain", color="tab:blue")
        for _, r in done.iterrows():
            ax.annotate(r["label"], (r[x] * scale, r[METRIC]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.step(*zip(*front), where="post", color="tab:blue", alpha=0.5, label="Pareto front")
        promoted = done[done["promoted_val_loss"].notna()]
        if len(promoted):
            ax.scatter(promoted[x] * scale, promoted["promoted_val_loss"], marker="*", s=220, color="red",
                       label="promoted: full distillation")
    if parent.get("val_loss") is not None:
        ax.axhline(parent["val_loss"], color="gray", linestyle="--", label=f"parent ({parent['params'] / 1e6:.1f}M)")
    ax.set_xlabel(name)
    ax.set_ylabel("validation loss")
    ax.set_title(f"candidates: {name.split(' (')[0]} vs validation loss")
    write_json(out / "pareto.json", {"x": x, "x_label": name, "y": METRIC, "direction": direction,
                                     "points": [{"label": r["label"], "x": float(r[x]), METRIC: float(r[METRIC])}
                                                for _, r in done.iterrows()],
                                     "front": [[float(a) / scale, float(b)] for a, b in front]})
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=100)
    plt.close(fig)


def _add_strips(space: SearchSpace, storage: RunStorage, rows: list[dict[str, Any]]) -> None:
    """In a per-layer search, each trained candidate's widths a layer as text (`per_layer.strips`): "kv_heads" and
    "mlp" columns of one character a parent layer, per-layer and uniform candidates alike."""
    if space.per_layer is None:
        return
    parent = Parent.of(parent_config(space.parent)).architecture
    for row in rows:
        arch = storage.read_json(f"{row['label']}/architecture.json") if row["state"] == "COMPLETE" else None
        row.update(strips(Architecture.from_dict(arch), parent) if arch else {"kv_heads": None, "mlp": None})


def _plot_layers(frame, path: Path) -> None:
    """layers.png: a heat strip of each trained candidate's KV heads and MLP width a layer (the strips' characters
    as shades: a lighter cell is narrower, white a skipped block or dropped layer), best loss first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = frame[frame["kv_heads"].notna()].sort_values(METRIC)
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.35 * max(1, len(done))), squeeze=False)
    for ax, column, title, scale in ((axes[0][0], "kv_heads", "KV heads a layer", "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
                                     (axes[0][1], "mlp", "MLP width a layer (eighths of the parent's)", " " + LEVELS)):
        cells = np.array([[scale.find(c) if c != ABSENT else 0 for c in text] for text in done[column]] or [[0]])
        ax.imshow(cells, cmap="Blues", aspect="auto", vmin=0)
        ax.set_yticks(range(len(done)), [f"{r['label']} ({r[METRIC]:.3f})" for _, r in done.iterrows()], fontsize=7)
        ax.set_xlabel("parent layer")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _evals(storage: RunStorage, rel: str) -> list[tuple[int, float]]:
    """A run's validation curve (tokens, loss): the evaluation lines of its metrics.jsonl."""
    lines = (storage.read_text(f"{rel}/metrics.jsonl") or "").splitlines()
    evals = [json.loads(line) for line in lines if '"val_loss"' in line]
    return [(int(e["tokens"]), float(e["val_loss"])) for e in evals]


def _plot_curves(curves: dict[tuple[str, str], list[tuple[int, float]]], parent: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for (label, stage), points in sorted(curves.items()):
        x, y = zip(*points)
        ax.plot(x, y, marker="o", linestyle="--" if stage == FULL else "-",
                label=f"{label}{' (full)' if stage == FULL else ''}")
    if parent.get("val_loss") is not None:
        ax.axhline(parent["val_loss"], color="gray", linestyle=":", label="parent")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss during retraining")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _strips_beside_uniform(study, run: RunStorage, arch, parent_spec: str) -> dict[str, Any]:
    """best.json's view of a per-layer search's winner: its widths a layer (`strips`), and the best uniform
    candidate's (a trial without a layer table) beside them, where the search trained any."""
    parent = Parent.of(parent_config(parent_spec)).architecture
    out: dict[str, Any] = {"strips": strips(arch, parent)}
    try:
        label, losses = winner(study, lambda t: t.params.get(DIGEST) == 0)
    except NasError:  # no uniform candidate was trained
        return out
    uniform = run.read_json(f"{'promoted/' if losses['stage'] == FULL else ''}{label}/architecture.json")
    out["uniform_winner"] = {"label": label, "val_loss": losses["val_loss"], "stage": losses["stage"],
                             "strips": strips(Architecture.from_dict(uniform), parent)}
    return out


def winner(study, among: Callable[[Any], bool] = lambda t: True) -> tuple[str, dict[str, Any]]:
    """The best candidate (of those `among`): lowest full-distillation loss among promoted ones, else lowest
    short-retrain loss."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if among(t)]
    if not complete:
        raise NasError(f"study {study.study_name!r} has no completed trial yet")
    full = [t for t in complete if _stage(t) == FULL]
    best = min(full or complete, key=_loss)
    counts = {k: best.user_attrs[k] for k in FIGURES if k in best.user_attrs}
    return _label(best), {"val_loss": _loss(best), "stage": _stage(best), "params": None, **counts}


def export_best(study_name: str, storage: str, out: str | Path, checkpoint: str | Path | None = None,
                root: str | Path = "trials") -> dict[str, Any]:
    """Write the winner's Architecture (+ params, losses, parent) as JSON; optionally its checkpoint."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=optuna.storages.RDBStorage(storage))
    except KeyError:
        raise NasError(f"--study {study_name}: no such study in {storage}") from None
    label, losses = winner(study)
    run = RunStorage(root, study_name)
    rel = f"promoted/{label}" if losses["stage"] == FULL else label
    arch = run.read_json(f"{rel}/architecture.json")
    if arch is None:
        raise NasError(f"--root {root}: {run.uri}/{rel}/architecture.json is missing; give the run folder of this study")
    best = {**Architecture.from_dict(arch).to_dict(), **losses, "label": label, "parent": study.user_attrs.get("parent")}
    if any(DIGEST in t.params for t in study.get_trials(deepcopy=False)):  # a per-layer search
        best |= _strips_beside_uniform(study, run, Architecture.from_dict(arch), best["parent"])
    write_json(out, best)
    if checkpoint:
        if not run.exists(f"promoted/{label}/model"):
            raise NasError(f"--checkpoint: {label} was not promoted to full distillation, so it has no checkpoint; "
                           f"raise `promote` in the search space and re-run `nas search`")
        with atomic_dir(checkpoint) as tmp:
            shutil.copytree(run.fetch(f"promoted/{label}/model"), tmp, dirs_exist_ok=True)
            (tmp / "architecture.json").write_text(json.dumps(best, indent=2) + "\n")
    return best
