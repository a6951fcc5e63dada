"""The search service (paper §2.3, best practice #9): importance once, a Ray Tune run over the feasible
candidates with Optuna choosing them, promotion of the best to full distillation, a study summary.

Ray and Optuna sit behind this module only; a trial is a plain function of its `arch` label and the shared
inputs, so it can be replayed from its parameters alone (`replay_trial`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from nas.architecture import Architecture
from nas.data import load_tokens, split
from nas.distill import DistillConfig, Distiller
from nas.errors import ConfigError, NasError
from nas.files import atomic_dir, write_json
from nas.importance import ImportanceSettings, Importances, cached_importance, select_layers
from nas.parents import load_parent, parent_config, resolve_parent
from nas.prune import prune
from nas.space import SearchSpace, architecture_of, enumerate_candidates, infeasible_hint
from nas.teacher_cache import TeacherTopK, cached_topk

log = logging.getLogger(__name__)

METRIC = "val_loss"
TRIAL_FILES = ("architecture.json", "metrics.jsonl", "result.json")


def study_dir(space: SearchSpace, root: str | Path = "trials") -> Path:
    return Path(root).resolve() / space.study


def storage_url(space: SearchSpace, root: str | Path = "trials") -> str:
    return space.storage or f"sqlite:///{study_dir(space, root) / 'study.db'}"


@dataclass
class Shared:
    """What every trial reads: passed once through Ray's object store."""

    space: SearchSpace
    rows: dict[str, dict[str, Any]]
    importances: Importances
    train: torch.Tensor
    val: torch.Tensor
    topk: TeacherTopK | None
    folder: str
    nas_cache: str


def prepare(space: SearchSpace, root: str | Path = "trials") -> Shared:
    """Step 1: candidates, data and importance (computed once, cached in the study folder)."""
    config = parent_config(space.parent)
    rows = enumerate_candidates(space, config)
    if not rows:
        raise ConfigError(f"{space.name}: {infeasible_hint(space, config)}")
    folder = study_dir(space, root)
    folder.mkdir(parents=True, exist_ok=True)
    parent, tokenizer = load_parent(space.parent)
    tokens = load_tokens(space.data, tokenizer, space.seq_len, space.text_field,
                         min_sequences=space.importance.samples + 2)
    calibration = tokens[: space.importance.samples]
    train, val = split(tokens[space.importance.samples:], space.val_fraction, space.search.seed)
    imp = space.importance
    settings = ImportanceSettings(seq_agg=imp.seq_agg, batch_agg=imp.batch_agg, neuron_source=imp.neuron_source,
                                  head_source=imp.head_source, drop_samples=imp.drop_samples,
                                  block_sizes=_block_sizes(space, config))
    importances = cached_importance(parent, calibration, folder / "importance.safetensors", settings)
    train = train[: _sequences_needed(space)]
    topk = None
    if space.short_retrain.teacher_topk:
        topk = cached_topk(parent, train, space.short_retrain.teacher_topk, folder / "teacher_topk.safetensors")
    return Shared(space, {r["label"]: r for r in rows}, importances, train, val[:16], topk, str(folder),
                  os.environ.get("NAS_CACHE", ""))


def _block_sizes(space: SearchSpace, config: Any) -> tuple[int, ...]:
    if space.importance.layer_method != "block":
        return ()
    return tuple(sorted({config.num_hidden_layers - n for n in space.axes.num_hidden_layers} - {0}))


def _sequences_needed(space: SearchSpace) -> int:
    r = max(space.short_retrain, space.full_retrain, key=lambda x: x.tokens)
    return max(r.batch_size * r.grad_accum, r.tokens // space.seq_len)


def retrain_config(spec, seq_len: int, seed: int) -> DistillConfig:
    cfg = DistillConfig(tokens=spec.tokens, batch_size=spec.batch_size, grad_accum=spec.grad_accum, lr=spec.lr,
                        warmup_steps=spec.warmup_steps, seed=seed, checkpoint_every=0)
    return dataclasses.replace(cfg, eval_every=max(1, cfg.steps(seq_len) // spec.reports))


def _device(space: SearchSpace) -> torch.device:
    return torch.device("cuda" if space.resources.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")


def build_candidate(shared: Shared, label: str, device: torch.device | None = None):
    """(teacher, child, arch) for a label: the parent, and the child pruned from it with the shared scores."""
    if shared.nas_cache:
        os.environ.setdefault("NAS_CACHE", shared.nas_cache)
    space = shared.space
    teacher, _ = load_parent(space.parent, device or _device(space))
    layers = select_layers(shared.importances, int(shared.rows[label]["num_hidden_layers"]),
                           space.importance.layer_method)
    arch = architecture_of(shared.rows[label], teacher.config, layers)
    child = prune(teacher, shared.importances, arch).float()
    return teacher, child, arch


def run_trial(config: dict[str, Any], shared: Shared, report: Callable[[dict], None] | None = None) -> dict:
    """One trial: prune the candidate, distil it briefly, report validation loss at intervals."""
    from ray import tune

    report = report or tune.report
    torch.set_num_threads(max(1, shared.space.resources.cpus_per_trial))
    label = config["arch"]
    teacher, child, arch = build_candidate(shared, label)
    out = Path(shared.folder) / label
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "architecture.json", {**arch.to_dict(), "params": shared.rows[label]["params"]})
    cfg = retrain_config(shared.space.short_retrain, shared.space.seq_len, shared.space.search.seed)
    distiller = Distiller(child, teacher, shared.train, shared.val, out, cfg, list(arch.layers), shared.topk)
    distiller.on_eval = lambda m: report({METRIC: m["val_loss"], "val_kd": m.get("val_kd"), "step": m["step"]})
    result = distiller.run(progress=False, save_model=False)
    # A trial finished by an earlier, killed run returns its saved result: report it so Optuna records it.
    report({METRIC: result["val_loss"], "val_kd": result.get("val_kd"), "step": result["steps"]})
    return result


def replay_trial(shared: Shared, label: str) -> dict:
    """Run one trial in this process, outside Ray and Optuna (debugging, benchmarks)."""
    return run_trial({"arch": label}, shared, report=lambda m: None)


def promote(shared: Shared, label: str) -> dict:
    """Full distillation of one promoted candidate into `promoted/<label>/model` (a stock HF checkpoint)."""
    torch.set_num_threads(max(1, shared.space.resources.cpus_per_trial))
    teacher, child, arch = build_candidate(shared, label)
    out = Path(shared.folder) / "promoted" / label
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "architecture.json", {**arch.to_dict(), "params": shared.rows[label]["params"]})
    cfg = retrain_config(shared.space.full_retrain, shared.space.seq_len, shared.space.search.seed)
    result = Distiller(child, teacher, shared.train, shared.val, out, cfg, list(arch.layers), None).run(progress=False)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(resolve_parent(shared.space.parent)).save_pretrained(out / "model")
    return {"label": label, **result}


# -- Ray and Optuna adapters ------------------------------------------------------------------------

def init_ray(address: str | None, folder: Path, num_cpus: int | None = None) -> None:
    """Connect to a cluster, or start a local Ray bound to loopback with its files in the run folder."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not address:
        # Ray reads this when `ray_constants` is imported (and its agents when they start): with it off, every
        # Ray process takes the loopback address as the node's and never binds another interface's.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return
    env = {"env_vars": {k: os.environ[k] for k in ("NAS_CACHE", "HF_HUB_OFFLINE") if k in os.environ}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
        return
    ray_constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before the variable was set
    temp = folder / "ray"
    if len(str(temp)) > 60:
        # Ray's Unix socket paths must stay under 107 bytes; a deep run folder would overflow them.
        temp = Path(tempfile.gettempdir()) / f"nas-ray-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"
        log.warning("run folder path is long; Ray's temporary files go to %s", temp)
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", _temp_dir=str(temp), runtime_env=env, log_to_driver=False)


def open_study(space: SearchSpace, root: str | Path = "trials", url: str | None = None):
    import optuna

    storage = optuna.storages.RDBStorage(url or storage_url(space, root))
    return optuna.create_study(study_name=space.study, storage=storage, direction="minimize", load_if_exists=True)


def _label(trial) -> str | None:
    return trial.params.get("arch")


def _plan(space: SearchSpace, study, labels: list[str]) -> tuple[str, list[str], int]:
    """(sampler, labels to enqueue, number of trials still to run), resuming what the study already holds."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # A run that was killed left these behind; record them as failed so they are tried again.
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    done = {_label(t) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    sampler = space.search.sampler
    if sampler == "auto":
        sampler = "grid" if len(labels) <= space.search.max_trials else "tpe"
    if sampler == "grid":
        remaining = [label for label in labels if label not in done]
        return sampler, remaining, len(remaining)
    return sampler, [], max(0, space.search.max_trials - len(done))


def run_search(space: SearchSpace, root: str | Path = "trials", address: str | None = None,
               trial_fn: Callable = run_trial) -> "Any":
    """The whole job; re-running it resumes (finished trials and promotions are not redone)."""
    shared = prepare(space, root)
    folder = Path(shared.folder)
    init_ray(address, folder)
    study = open_study(space, root)
    study.set_user_attr("parent", space.parent)
    study.set_user_attr("architectures", {label: dict(row) for label, row in shared.rows.items()})
    sampler, enqueue, n_trials = _plan(space, study, list(shared.rows))
    log.info("%d feasible candidates; %s sampler; %d trials to run", len(shared.rows), sampler, n_trials)
    if n_trials:
        _tune(space, shared, study, enqueue, n_trials, folder, trial_fn)
    _promote_best(space, shared, study)
    return summarize(space, root)


def _tune(space: SearchSpace, shared: Shared, study, enqueue: list[str], n_trials: int, folder: Path,
          trial_fn: Callable) -> None:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    labels = list(shared.rows)
    searcher = OptunaSearch(space={"arch": optuna.distributions.CategoricalDistribution(labels)}, metric=METRIC,
                            mode="min", points_to_evaluate=[{"arch": label} for label in enqueue] or None,
                            sampler=optuna.samplers.TPESampler(seed=space.search.seed),
                            study_name=space.study, storage=study._storage, seed=space.search.seed)
    scheduler = ASHAScheduler(grace_period=1, reduction_factor=2, max_t=space.short_retrain.reports + 1) \
        if space.search.asha else FIFOScheduler()
    res = space.resources
    trainable = tune.with_resources(tune.with_parameters(trial_fn, shared=shared),
                                    {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=n_trials, metric=METRIC,
                                    mode="min", max_concurrent_trials=res.max_concurrent),
        run_config=tune.RunConfig(name=f"tune-{int(time.time())}", storage_path=str(folder / "ray_results"),
                                  failure_config=tune.FailureConfig(max_failures=space.search.retries), verbose=0),
    )
    tuner.fit()


def _promote_best(space: SearchSpace, shared: Shared, study) -> None:
    import optuna
    import ray

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    best = sorted(complete, key=lambda t: t.value)[: space.promote]
    if not best:
        return
    res = space.resources
    task = ray.remote(promote).options(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial)
    results = ray.get([task.remote(shared, _label(t)) for t in best])
    study.set_user_attr("promoted", {r["label"]: {k: v for k, v in r.items() if k != "label"} for r in results})


# -- summary and export -----------------------------------------------------------------------------

def summarize(space: SearchSpace, root: str | Path = "trials"):
    """A table of every trial (architecture, params, losses, tokens, wall time) saved as parquet, CSV and a plot."""
    import pandas as pd

    study = open_study(space, root)
    folder = study_dir(space, root)
    archs = study.user_attrs.get("architectures", {})
    promoted = study.user_attrs.get("promoted", {})
    rows = []
    for t in study.get_trials(deepcopy=False):
        label = _label(t)
        result_file = folder / str(label) / "result.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        rows.append({"trial": t.number, "state": t.state.name, "label": label, **archs.get(label, {}),
                     METRIC: t.value, "val_kd": result.get("val_kd"), "tokens": result.get("tokens"),
                     "wall_s": result.get("wall_s") or (t.duration.total_seconds() if t.duration else None),
                     "promoted_val_loss": promoted.get(label, {}).get("val_loss")})
    frame = pd.DataFrame(rows)
    frame.to_parquet(folder / "summary.parquet", index=False)
    frame.to_csv(folder / "summary.csv", index=False)
    _plot(frame, folder / "pareto.png")
    return frame


def _plot(frame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame[frame["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(done):
        ax.scatter(done["params"] / 1e6, done[METRIC], label="short retrain")
        best = done.loc[done[METRIC].idxmin()]
        ax.scatter([best["params"] / 1e6], [best[METRIC]], marker="*", s=250, color="red",
                   label=f"winner {best['label']}")
        ax.legend(fontsize=8)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def winner(study) -> tuple[str, dict[str, Any]]:
    """The best candidate: lowest full-distillation loss among promoted ones, else lowest short-retrain loss."""
    import optuna

    promoted = study.user_attrs.get("promoted", {})
    if promoted:
        label = min(promoted, key=lambda k: promoted[k]["val_loss"])
        return label, {"val_loss": promoted[label]["val_loss"], "stage": "full_distillation"}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise NasError(f"study {study.study_name!r} has no completed trial yet")
    best = min(complete, key=lambda t: t.value)
    return _label(best), {"val_loss": best.value, "stage": "short_retrain"}


def export_best(study_name: str, storage: str, out: str | Path, checkpoint: str | Path | None = None,
                root: str | Path = "trials") -> dict[str, Any]:
    """Write the winner's Architecture (+ params, losses, parent) as JSON; optionally its checkpoint."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=optuna.storages.RDBStorage(storage))
    except KeyError:
        raise NasError(f"--study {study_name}: no such study in {storage}") from None
    label, losses = winner(study)
    folder = Path(root).resolve() / study_name
    arch_file = (folder / "promoted" / label / "architecture.json") if losses["stage"] == "full_distillation" \
        else folder / label / "architecture.json"
    arch = json.loads(arch_file.read_text())
    row = study.user_attrs.get("architectures", {}).get(label, {})
    best = {**Architecture.from_dict(arch).to_dict(), "params": row.get("params"),
            **losses, "label": label, "parent": study.user_attrs.get("parent")}
    write_json(out, best)
    if checkpoint:
        source = folder / "promoted" / label / "model"
        if not source.exists():
            raise NasError(f"--checkpoint: {label} was not promoted to full distillation, so it has no checkpoint; "
                           f"raise `promote` in the search space and re-run `nas search`")
        import shutil

        with atomic_dir(checkpoint) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            (tmp / "architecture.json").write_text(json.dumps(best, indent=2) + "\n")
    return best
