"""The search service (paper §2.3, best practice #9): importance once, a Ray Tune run over the feasible
candidates with Optuna choosing them, promotion of the best to full distillation, a study summary.

Ray and Optuna sit behind this module only. An Optuna trial's parameters are the architecture axes
(`nas.space.AXES`), so the dashboard's slice, contour and importance plots read them; its user attributes
hold the candidate's label, exact parameter count, share of the parent and stage. A trial is a plain function
of those axes and the shared inputs, so it can be replayed from its parameters alone (`replay_trial`).

Files live in the run folder (`nas.storage.RunStorage`: a local path or a URI every node reaches):
    importance.safetensors, teacher_topk/               computed once (in Ray tasks), read by every trial
    tokens/                                             the token shards trials read their training sequences from
    <label>/{architecture.json, metrics.jsonl, result.json}   one folder per trial
    promoted/<label>/{..., model/}                      full distillation of the promoted candidates
    summary.{parquet,csv}, pareto.png, curves.png, best.json
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from nas.architecture import short_label as label_of
from nas.data import load_tokens, split
from nas.distill import DistillConfig
from nas.errors import ConfigError, NasError
from nas.files import atomic_dir, write_json
from nas.importance import ImportanceSettings, Importances, cached_importance, lm_loss, select_layers
from nas.parents import load_parent, parent_config, resolve_parent
from nas.plan import Cluster, check_fits
from nas.prune import prune
from nas.space import AXES, SearchSpace, architecture_of, candidate_problem, enumerate_candidates, infeasible_hint, \
    space_config
from nas.storage import RunStorage, is_uri
from nas.teacher_cache import ShardPlan, TopKShards, publish, topk_plan, write_part
from nas.tokens import TokenSet
from nas.workers import DistillInputs, DistillJob, run_here, run_on_workers

log = logging.getLogger(__name__)

METRIC = "val_loss"
TRIAL_FILES = ("architecture.json", "metrics.jsonl", "result.json")
SHORT, FULL = "short_retrain", "full_distillation"


def storage_url(space: SearchSpace, root: str | Path = "trials") -> str:
    """The Optuna database: `storage:` from the space, else SQLite in a local run folder."""
    if space.storage:
        return space.storage
    if is_uri(str(root)):
        raise ConfigError(f"storage: the run folder {root} is not a local path, so the study cannot be SQLite there; "
                          f"set `storage:` in the space to a database every node reaches (postgresql://...)")
    return f"sqlite:///{Path(root).resolve() / space.study / 'study.db'}"


@dataclass
class Shared:
    """What every trial reads: small, passed once through Ray's object store. The caches and the token shards stay
    in the run folder, which every node reaches; trials read the training sequences from the shards by row."""

    space: SearchSpace
    rows: dict[str, dict[str, Any]]
    storage: RunStorage
    train_rows: np.ndarray  # rows of the run folder's `tokens/` shards
    val: torch.Tensor
    has_topk: bool
    nas_cache: str

    def train_tokens(self) -> TokenSet:
        """The training sequences, read from the run folder's shards (a local copy of them on a URI root)."""
        return TokenSet(self.storage.fetch("tokens"), self.train_rows)


def prepare(space: SearchSpace, root: str | Path = "trials") -> Shared:
    """Step 1: candidates, data, importance and the teacher cache (computed once, kept in the run folder).

    This process reads only the parent's config and tokenizer: the work on its weights runs in a Ray task when
    Ray is up (on a GPU node when trials take GPUs), else here."""
    from transformers import AutoTokenizer

    config = parent_config(space.parent)
    rows = enumerate_candidates(space, config)
    if not rows:
        raise ConfigError(f"{space.name}: {infeasible_hint(space, config)}")
    storage = RunStorage(root, space.study)
    tokenizer = AutoTokenizer.from_pretrained(resolve_parent(space.parent))
    tokens = load_tokens(space.data, tokenizer, space.seq_len, space.text_field,
                         min_sequences=space.importance.samples + 2)
    _share_tokens(storage, tokens)
    train, val = split(tokens.select(slice(space.importance.samples, None)), space.val_fraction, space.search.seed)
    train = train.select(slice(0, _sequences_needed(space)))
    calibration = np.arange(space.importance.samples)
    val = val[:16]
    nas_cache = os.environ.get("NAS_CACHE", "")
    args = (space, storage, calibration, train.rows, val, nas_cache)
    parts = space.resources.cache_workers if space.short_retrain.teacher_topk else 1
    import ray

    if ray.is_initialized():
        # The parent's work, and the other parts of the teacher cache, as tasks queued together (so they wait for
        # resources in turn rather than one holding them while waiting for another).
        res = space.resources
        options = {"num_cpus": res.cpus_per_trial, "num_gpus": parent_gpus(space)}
        plans = ray.get([ray.remote(parent_work).options(**options).remote(*args, parts),
                         *[ray.remote(cache_part).options(**options).remote(space, storage, train.rows, part, parts,
                                                                            nas_cache) for part in range(1, parts)]])
    else:
        plans = [parent_work(*args)]  # one process: all of the cache
    if plans[0] is not None:
        if any(p != plans[0] for p in plans):
            raise NasError(f"parent {space.parent}: its tasks loaded different weights (did it change during the "
                           f"run?); re-run the search")
        publish(storage, "teacher_topk", plans[0])
    return Shared(space, {r["label"]: r for r in rows}, storage, train.rows, val, bool(space.short_retrain.teacher_topk),
                  nas_cache)


def parent_work(space: SearchSpace, storage: RunStorage, calibration_rows: np.ndarray, train_rows: np.ndarray,
                val: torch.Tensor, nas_cache: str, cache_parts: int = 1) -> ShardPlan | None:
    """Everything that needs the parent's weights, once: importance scores, part 1 of `cache_parts` of the
    teacher's top-K cache (when the space asks for one: its plan is returned) and the parent's own validation
    loss, each kept in the run folder (and reused from there when it matches)."""
    parent = _spread_parent(space, nas_cache)
    config = parent_config(space.parent)
    folder = storage.fetch("tokens")
    imp = space.importance
    settings = ImportanceSettings(seq_agg=imp.seq_agg, batch_agg=imp.batch_agg, neuron_source=imp.neuron_source,
                                  head_source=imp.head_source, drop_samples=imp.drop_samples,
                                  block_sizes=_block_sizes(space, config))
    calibration = TokenSet(folder, calibration_rows)[:]
    _kept_in(storage, "importance.safetensors", lambda path: cached_importance(parent, calibration, path, settings))
    plan = _cache_part(parent, space, storage, train_rows, 0, cache_parts)
    if storage.read_json("parent.json") is None:  # the reference line of the plots
        storage.write_json("parent.json", {"parent": space.parent, "val_loss": lm_loss(parent, val),
                                           "params": sum(p.numel() for p in parent.parameters())})
    return plan


def cache_part(space: SearchSpace, storage: RunStorage, train_rows: np.ndarray, part: int, parts: int,
               nas_cache: str) -> ShardPlan:
    """Another part of the teacher cache, with a parent of its own (a Ray task beside `parent_work`)."""
    parent = _spread_parent(space, nas_cache)
    return _cache_part(parent, space, storage, train_rows, part, parts)


def _cache_part(parent, space: SearchSpace, storage: RunStorage, train_rows: np.ndarray, part: int,
                parts: int) -> ShardPlan | None:
    if not space.short_retrain.teacher_topk:
        return None
    train = TokenSet(storage.fetch("tokens"), train_rows)
    plan = topk_plan(parent, train, space.short_retrain.teacher_topk)
    write_part(parent, train, storage, "teacher_topk", plan, part, parts)
    return plan


def parent_gpus(space: SearchSpace) -> float:
    """GPUs of each task that runs the whole parent (importance, the teacher cache): `resources.parent_gpus`, else
    a trial's."""
    res = space.resources
    return res.parent_gpus or max(res.gpus_per_trial, res.gpus_per_worker)


def _spread_parent(space: SearchSpace, nas_cache: str):
    """The parent in a task of its own: on a GPU task, in bf16 and spread over the task's GPUs by accelerate (what
    does not fit is offloaded to the CPU); else on the CPU in fp32."""
    if nas_cache:
        os.environ.setdefault("NAS_CACHE", nas_cache)
    if parent_gpus(space) > 0 and torch.cuda.is_available():
        from nas.files import cache_dir

        return load_parent(space.parent, torch.device("cuda"), device_map="auto",
                           offload_folder=cache_dir() / "offload")[0]
    return load_parent(space.parent, torch.device("cpu"))[0]


def _share_tokens(storage: RunStorage, tokens: TokenSet) -> None:
    """Copy the token shards (tokenised into this node's cache) into the run folder, unless the same are there."""
    there = storage.read_json("tokens/index.json")
    if there is None or there.get("sha256") != tokens.index["sha256"]:
        storage.upload(tokens.folder, "tokens")


def _kept_in(storage: RunStorage, rel: str, load_or_compute: Callable[[Path], Any]) -> None:
    """Run a cache function (which reuses a matching file at its path, else recomputes it) on a file of the run
    folder: in place for a local folder, else on a local copy that is uploaded when it changed."""
    if storage.local is not None:
        load_or_compute(storage.local / rel)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(rel).name
        if storage.exists(rel):
            shutil.copyfile(storage.fetch(rel), path)
        before = path.stat().st_mtime_ns if path.exists() else None
        load_or_compute(path)
        if path.stat().st_mtime_ns != before:
            storage.upload(path, rel)


def _block_sizes(space: SearchSpace, config: Any) -> tuple[int, ...]:
    if space.importance.layer_method != "block":
        return ()
    return tuple(sorted({config.num_hidden_layers - n for n in space.axes.num_hidden_layers} - {0}))


def _sequences_needed(space: SearchSpace) -> int:
    r = max(space.short_retrain, space.full_retrain, key=lambda x: x.tokens)
    return max(r.batch_size * r.grad_accum, r.tokens // space.seq_len)


def retrain_config(spec, seq_len: int, seed: int) -> DistillConfig:
    cfg = DistillConfig(tokens=spec.tokens, batch_size=spec.batch_size, grad_accum=spec.grad_accum, lr=spec.lr,
                        warmup_steps=spec.warmup_steps, seed=seed, checkpoint_every=0,
                        grad_checkpointing=spec.grad_checkpointing)
    return dataclasses.replace(cfg, eval_every=max(1, cfg.steps(seq_len) // spec.reports))


def _device(space: SearchSpace) -> torch.device:
    return torch.device("cuda" if space.resources.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")


# The parent, kept loaded in a trial worker between trials (Tune reuses the worker: `reuse_actors`). Only an
# unsharded parent is kept: FSDP shards a module in place.
_PARENTS: dict[tuple[str, str], Any] = {}


def _parent(spec: str, device: torch.device, keep: bool):
    key = (spec, str(device))
    if key in _PARENTS:
        return _PARENTS[key]
    model, _ = load_parent(spec, device)
    if keep:
        _PARENTS.clear()
        _PARENTS[key] = model
    return model


def _architecture(shared: Shared, label: str, importances: Importances):
    """The label's Architecture, with the parent layers it keeps chosen from the importance scores."""
    layers = select_layers(importances, int(shared.rows[label]["num_hidden_layers"]),
                           shared.space.importance.layer_method)
    return architecture_of(shared.rows[label], parent_config(shared.space.parent), layers)


def build_candidate(shared: Shared, label: str, device: torch.device | None = None, keep_parent: bool = True):
    """(teacher, child, arch) for a label: the parent, and the child pruned from it with the stored scores."""
    if shared.nas_cache:
        os.environ.setdefault("NAS_CACHE", shared.nas_cache)
    teacher = _parent(shared.space.parent, device or _device(shared.space), keep_parent)
    importances = Importances.load(shared.storage.fetch("importance.safetensors"))
    arch = _architecture(shared, label, importances)
    return teacher, prune(teacher, importances, arch).float(), arch


def candidate_inputs(shared: Shared, label: str, promoted: bool, device: torch.device) -> DistillInputs:
    """What a retrain of `label` trains with, built where it runs (the trial's process or each Train worker)."""
    sharded = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    teacher, child, arch = build_candidate(shared, label, device, keep_parent=not sharded)
    # The teacher cache covers the short retrain's tokens; full distillation runs the teacher online.
    topk = TopKShards(shared.storage.fetch("teacher_topk")) if shared.has_topk and not promoted else None
    return DistillInputs(child, teacher, shared.train_tokens(), shared.val, list(arch.layers), topk)


def _retrain(shared: Shared, label: str, rel: str, spec, on_eval: Callable[[dict], None], promoted: bool) -> dict:
    """Prune `label` and distil it into the run folder's `rel`; a finished one (its result.json) is not redone.
    One worker trains here; more run as a Ray Train job (`nas.workers`) whose folder must be shared by them."""
    storage = shared.storage
    done = storage.read_json(f"{rel}/result.json")
    if done is not None:
        return done
    res = shared.space.resources
    workers = spec.workers if promoted else res.workers_per_trial
    with storage.workdir(rel) as out:
        arch = _architecture(shared, label, Importances.load(storage.fetch("importance.safetensors")))
        write_json(out / "architecture.json", {**arch.to_dict(), "params": shared.rows[label]["params"]})
        job = DistillJob(functools.partial(candidate_inputs, shared, label, promoted),
                         retrain_config(spec, shared.space.seq_len, shared.space.search.seed), str(out),
                         save_model=promoted, threads=res.cpus_per_trial)
        if workers == 1:
            result = run_here(job, _device(shared.space), on_eval)
        else:
            result = run_on_workers(job, workers, res.gpus_per_worker, res.cpus_per_trial, shared.space.search.retries,
                                    storage_path=f"{storage.uri}/ray_train", name=f"{rel.replace('/', '-')}-{int(time.time())}")
        if promoted:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(resolve_parent(shared.space.parent)).save_pretrained(out / "model")
        result = {**result, "node": _node()}
        write_json(out / "result.json", result)
        _publish(storage, out, rel)
    return result


def _node() -> str | None:
    """The Ray node a trial ran on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _publish(storage: RunStorage, out: Path, rel: str) -> None:
    """Copy a finished run folder to a remote run folder, `result.json` (the 'finished' marker) last."""
    if storage.local is not None:
        return
    for path in sorted(out.iterdir()):
        if path.name != "result.json":
            storage.upload(path, f"{rel}/{path.name}")
    storage.upload(out / "result.json", f"{rel}/result.json")


def run_trial(config: dict[str, Any], shared: Shared, report: Callable[[dict], None] | None = None) -> dict:
    """One trial: prune the candidate with these axes, distil it briefly, report validation loss by tokens."""
    report = report or tune.report
    reported = []

    def on_eval(m: dict) -> None:
        reported.append(m["tokens"])
        report({METRIC: m["val_loss"], "val_kd": m.get("val_kd"), "tokens": m["tokens"], "step": m["step"]})

    result = _retrain(shared, label_of(config), label_of(config), shared.space.short_retrain, on_eval, False)
    if not reported:  # finished by an earlier, killed run: report its result once so Optuna records it
        report({METRIC: result["val_loss"], "val_kd": result.get("val_kd"), "tokens": result["tokens"],
                "step": result["steps"]})
    return result


def replay_trial(shared: Shared, label: str) -> dict:
    """Run one trial in this process, outside Ray and Optuna (debugging, benchmarks)."""
    return run_trial(dict(zip(AXES, (shared.rows[label][k] for k in AXES))), shared, report=lambda m: None)


def promote(shared: Shared, label: str) -> dict:
    """Full distillation of one promoted candidate into `promoted/<label>/model` (a stock HF checkpoint)."""
    return {"label": label, **_retrain(shared, label, f"promoted/{label}", shared.space.full_retrain,
                                       lambda m: None, True)}


# -- Ray and Optuna adapters ------------------------------------------------------------------------

def init_ray(address: str | None, folder: Path, num_cpus: int | None = None) -> str:
    """Join a cluster (`--address`, or the one a Ray job or RAY_ADDRESS names), else start a private Ray on
    loopback for the run folder `folder`. Returns how Ray was reached."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return "this process's Ray"
    if address or os.environ.get("RAY_ADDRESS"):
        # Bare: inside a Ray job the job's own runtime env applies, and resources are the cluster's.
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return f"cluster {address or os.environ['RAY_ADDRESS']}"
    # Ray reads this when `ray_constants` is imported (and its agents when they start): with it off, every
    # Ray process takes the loopback address as the node's and never binds another interface's.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before the variable was set
    # Ray's Unix socket paths (temp dir + ~65 bytes of session name) must stay under 107 bytes, which a run folder
    # deep in a file system would overflow: its files go to a short folder named for the run folder.
    temp = Path(tempfile.gettempdir()) / f"nas-ray-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"
    env = {"env_vars": {k: os.environ[k] for k in ("NAS_CACHE", "HF_HUB_OFFLINE") if k in os.environ}}
    # ERROR: its notice that token authentication is on concerns clusters, not this private, loopback-only one.
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", _temp_dir=str(temp), runtime_env=env, log_to_driver=False,
             logging_level=logging.ERROR)
    return "a private Ray on 127.0.0.1"


def open_study(space: SearchSpace, root: str | Path = "trials", url: str | None = None):
    import optuna

    storage = optuna.storages.RDBStorage(url or storage_url(space, root))
    return optuna.create_study(study_name=space.study, storage=storage, direction="minimize", load_if_exists=True)


def _stage(trial) -> str:
    return trial.user_attrs.get("stage", SHORT)


def _label(trial) -> str | None:
    return label_of(trial.params) if set(AXES) <= set(trial.params) else None


def _choices(rows: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    return {name: sorted({int(r[name]) for r in rows.values()}) for name in AXES}


def _plan(space: SearchSpace, study, labels: list[str]) -> tuple[str, list[str], int]:
    """(sampler, labels to enqueue, number of trials still to run), resuming what the study already holds."""
    import optuna

    state = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        # A run that was killed left these behind; record them as failed so they are tried again.
        study._storage.set_trial_state_values(t._trial_id, state.FAIL)
    done = {_label(t) for t in study.get_trials(deepcopy=False, states=(state.COMPLETE,)) if _stage(t) == SHORT}
    # Candidates a killed run enqueued but never started: the next run's Tune trials take them first.
    waiting = [label_of(t.system_attrs["fixed_params"]) for t in study.get_trials(deepcopy=False, states=(state.WAITING,))
               if set(AXES) <= set(t.system_attrs.get("fixed_params", {}))]
    sampler = space.search.sampler
    if sampler == "auto":
        sampler = "grid" if len(labels) <= space.search.max_trials else "tpe"
    if sampler == "grid":
        remaining = [label for label in labels if label not in done]
        return sampler, [label for label in remaining if label not in waiting], len(remaining) + \
            len([w for w in waiting if w in done])
    return sampler, [], max(0, space.search.max_trials - len(done)) + len(waiting)


def run_search(space: SearchSpace, root: str | Path = "trials", address: str | None = None,
               trial_fn: Callable = run_trial, echo: Callable[[str], None] = lambda line: None) -> "Any":
    """The whole job; re-running it resumes (finished trials and promotions are not redone)."""
    url = storage_url(space, root)
    if is_uri(str(root)) and max(space.resources.workers_per_trial, space.full_retrain.workers) > 1:
        # Every worker writes its checkpoint shards into the run's folder, so it must be one path they all reach.
        raise ConfigError(f"--root {root}: retrains on several workers (resources.workers_per_trial, "
                          f"full_retrain.workers) need a run folder on a filesystem every node mounts, not a URI")
    reached = init_ray(address, Path(RunStorage(root, space.study).uri))
    check_fits(space, space_config(space), ray_cluster(space))
    shared = prepare(space, root)
    study = open_study(space, root)
    study.set_user_attr("parent", space.parent)
    sampler, enqueue, n_trials = _plan(space, study, list(shared.rows))
    echo(f"{space.name}: {len(shared.rows)} feasible candidates, {n_trials} trials to run ({sampler}) on {reached}")
    echo(f"run folder {shared.storage.uri}; study {space.study} in {url}")
    echo(f"watch: optuna-dashboard {url}")
    if n_trials:
        _tune(space, shared, study, enqueue, n_trials, trial_fn, echo)
    _promote_best(space, shared, study, echo)
    return summarize(space, root)


def ray_cluster(space: SearchSpace) -> Cluster:
    """The cluster Ray reaches, as the plan check sees it: its nodes and the most GPUs on one; a GPU's memory from
    `resources.gpu_memory_gb`, a node's from this machine."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = max((int(n["Resources"].get("GPU", 0)) for n in nodes), default=0)
    return Cluster(nodes=max(1, len(nodes)), gpus_per_node=gpus, gpu_memory_gb=space.resources.gpu_memory_gb)


class Progress(tune.Callback):
    """One line per finished trial: n/N, label, params, val loss, tokens, trial time, elapsed, ETA."""

    def __init__(self, total: int, rows: dict[str, dict[str, Any]], echo: Callable[[str], None]):
        self.total, self.rows, self.echo, self.done, self.start = total, rows, echo, 0, time.time()

    def line(self, trial, what: str) -> None:
        self.done += 1
        elapsed = time.time() - self.start
        eta = elapsed / self.done * max(0, self.total - self.done)
        label = label_of(trial.config)
        r = trial.last_result or {}
        self.echo(f"[{self.done}/{self.total}] {label} {self.rows[label]['params'] / 1e6:.1f}M {what} "
                  f"{_fmt(r.get(METRIC), '.4f')}, {_fmt(r.get('tokens'), ',')} tokens, "
                  f"{_fmt(r.get('time_total_s'), '.0f')} s; elapsed {elapsed:.0f} s, ETA {eta:.0f} s")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.line(trial, "val loss")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.line(trial, "FAILED after retries; last val loss")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.echo(f"[retry] {label_of(trial.config)} failed (failure {trial.num_failures}); retrying")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class _Axes:
    """Optuna's define-by-run space: one categorical parameter per architecture axis."""

    def __init__(self, choices: dict[str, list[int]]):
        self.choices = choices

    def __call__(self, trial) -> None:
        for name in AXES:
            trial.suggest_categorical(name, self.choices[name])


class ArchitectureSearch(OptunaSearch):
    """Ray Tune's OptunaSearch, adapted so that trials are architectures: infeasible proposals are recorded as
    pruned with the reason (never trained), feasible ones carry their label, parameter count and share as user
    attributes, and intermediate values are indexed by training tokens."""

    def __init__(self, space: SearchSpace, rows: dict[str, dict[str, Any]], study, enqueue: list[str]):
        import optuna

        super().__init__(space=_Axes(_choices(rows)), metric=METRIC, mode="min",
                         points_to_evaluate=[{k: rows[label][k] for k in AXES} for label in enqueue] or None,
                         sampler=optuna.samplers.TPESampler(seed=space.search.seed), study_name=space.study,
                         storage=study._storage)
        self.nas_space, self.nas_config, self.nas_rows = space, parent_config(space.parent), rows
        self.nas_reported: dict[str, set[int]] = {}

    def suggest(self, trial_id: str):
        import optuna

        for _ in range(1000):  # TPE may propose combinations outside the budget; record and skip them
            params = super().suggest(trial_id)
            trial = self._ot_trials[trial_id]
            problem = candidate_problem(self.nas_space, self.nas_config, params)
            if problem is None:
                row = self.nas_rows[label_of(params)]
                for key in ("label", "params", "share_of_parent"):
                    trial.set_user_attr(key, row[key])
                trial.set_user_attr("stage", SHORT)
                return params
            trial.set_user_attr("pruned_reason", problem)
            self._ot_study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            del self._ot_trials[trial_id]
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Tune hands a function trainable's last result over twice (as a result, then as the final one).
        tokens, reported = int(result["tokens"]), self.nas_reported.setdefault(trial_id, set())
        if tokens not in reported:
            reported.add(tokens)
            self._ot_trials[trial_id].report(result[METRIC], tokens)


def _tune(space: SearchSpace, shared: Shared, study, enqueue: list[str], n_trials: int, trial_fn: Callable,
          echo: Callable[[str], None]) -> None:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's console table off (verbose=0 below); nas prints its own lines
    scheduler = ASHAScheduler(grace_period=1, reduction_factor=2, max_t=space.short_retrain.reports + 1) \
        if space.search.asha else FIFOScheduler()
    res = space.resources
    # A multi-worker trial only waits on its Ray Train job, whose workers ask for the CPUs and GPUs themselves.
    # Tune needs some resource to place a trial: one byte of memory, which (unlike a sliver of a CPU) never keeps
    # a worker group's whole CPUs from fitting on a node.
    resources = {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial} if res.workers_per_trial == 1 \
        else {"cpu": 0, "memory": 1}
    trainable = tune.with_resources(tune.with_parameters(trial_fn, shared=shared), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ArchitectureSearch(space, shared.rows, study, enqueue),
                                    scheduler=scheduler,
                                    num_samples=n_trials, metric=METRIC, mode="min",
                                    max_concurrent_trials=res.max_concurrent,
                                    reuse_actors=True),  # a trial worker keeps its loaded parent for the next
        run_config=tune.RunConfig(name=f"tune-{int(time.time())}", storage_path=f"{shared.storage.uri}/ray_results",
                                  failure_config=tune.FailureConfig(max_failures=space.search.retries), verbose=0,
                                  callbacks=[Progress(n_trials, shared.rows, echo)]),
    )
    tuner.fit()


def _promote_best(space: SearchSpace, shared: Shared, study, echo: Callable[[str], None]) -> None:
    import optuna
    import ray

    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if _stage(t) == SHORT]
    best = sorted(complete, key=lambda t: t.value)[: space.promote]
    recorded = {_label(t) for t in study.get_trials(deepcopy=False) if _stage(t) == FULL}
    todo = [_label(t) for t in best if _label(t) not in recorded]
    if not todo:
        return
    res = space.resources
    echo(f"promoting {', '.join(todo)} to full distillation ({space.full_retrain.tokens:,} tokens each)")
    start = time.time()

    def done(n: int, result: dict) -> None:
        _record_promoted(study, shared, result)
        echo(f"[promoted {n}/{len(todo)}] {result['label']} val loss {result['val_loss']:.4f} "
             f"after {result['tokens']:,} tokens; elapsed {time.time() - start:.0f} s")

    if space.full_retrain.workers > 1:  # each one a Ray Train job of its own, in turn
        for n, label in enumerate(todo, 1):
            done(n, promote(shared, label))
        return
    task = ray.remote(promote).options(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial,
                                       max_retries=space.search.retries)
    pending = [task.remote(shared, label) for label in todo]
    while pending:
        ready, pending = ray.wait(pending)
        done(len(todo) - len(pending), ray.get(ready[0]))


def _record_promoted(study, shared: Shared, result: dict) -> None:
    """Record a full distillation as a trial of its own (Optuna freezes finished trials), stage 'full_distillation',
    with the candidate's axes as parameters and its validation curve by tokens."""
    import optuna

    label = result["label"]
    row = shared.rows[label]
    curve = shared.storage.read_text(f"promoted/{label}/metrics.jsonl") or ""
    evals = [json.loads(line) for line in curve.splitlines() if '"val_loss"' in line]
    choices = _choices(shared.rows)
    study.add_trial(optuna.trial.create_trial(
        params={k: int(row[k]) for k in AXES},
        distributions={k: optuna.distributions.CategoricalDistribution(choices[k]) for k in AXES},
        value=result["val_loss"], intermediate_values={int(e["tokens"]): e["val_loss"] for e in evals},
        user_attrs={"label": label, "params": row["params"], "share_of_parent": row["share_of_parent"], "stage": FULL}))


# -- summary and export -----------------------------------------------------------------------------

def summarize(space: SearchSpace, root: str | Path = "trials"):
    """A table of every trial (architecture, params, losses, tokens, wall time) saved as parquet, CSV and plots."""
    import pandas as pd

    study = open_study(space, root)
    storage = RunStorage(root, space.study)
    promoted = {_label(t): t.value for t in study.get_trials(deepcopy=False) if _stage(t) == FULL}
    rows = []
    for t in study.get_trials(deepcopy=False):
        if _stage(t) == FULL:
            continue
        label = _label(t)
        result = (storage.read_json(f"{label}/result.json") or {}) if label else {}
        rows.append({"trial": t.number, "state": t.state.name, "label": label,
                     **{k: t.params.get(k) for k in AXES}, "params": t.user_attrs.get("params"),
                     "share_of_parent": t.user_attrs.get("share_of_parent"), METRIC: t.value,
                     "val_kd": result.get("val_kd"), "tokens": result.get("tokens"),
                     "wall_s": result.get("wall_s") or (t.duration.total_seconds() if t.duration else None),
                     "promoted_val_loss": promoted.get(label), "note": t.user_attrs.get("pruned_reason")})
    frame = pd.DataFrame(rows)
    parent = storage.read_json("parent.json") or {}
    curves = {_label(t): (_stage(t), sorted(t.intermediate_values.items())) for t in study.get_trials(deepcopy=False)
              if t.intermediate_values}
    with storage.workdir("") as out:
        frame.to_parquet(out / "summary.parquet", index=False)
        frame.to_csv(out / "summary.csv", index=False)
        _plot_pareto(frame, parent, out / "pareto.png")
        _plot_curves(curves, parent, out / "curves.png")
        for name in ("summary.parquet", "summary.csv", "pareto.png", "curves.png"):
            storage.upload(out / name, name)
    return frame


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (params, loss) points no other point beats on both, by increasing params."""
    front, best = [], float("inf")
    for p, loss in sorted(points):
        if loss < best:
            front.append((p, loss))
            best = loss
    return front


def _plot_pareto(frame, parent: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame[frame["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(8, 5))
    if len(done):
        ax.scatter(done["params"] / 1e6, done[METRIC], label="short retrain", color="tab:blue")
        for _, r in done.iterrows():
            ax.annotate(r["label"], (r["params"] / 1e6, r[METRIC]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        front = _pareto_front(list(zip(done["params"] / 1e6, done[METRIC])))
        ax.step(*zip(*front), where="post", color="tab:blue", alpha=0.5, label="Pareto front")
        promoted = done[done["promoted_val_loss"].notna()]
        if len(promoted):
            ax.scatter(promoted["params"] / 1e6, promoted["promoted_val_loss"], marker="*", s=220, color="red",
                       label="promoted: full distillation")
    if parent.get("val_loss") is not None:
        ax.axhline(parent["val_loss"], color="gray", linestyle="--", label=f"parent ({parent['params'] / 1e6:.1f}M)")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("validation loss")
    ax.set_title("candidates: size vs validation loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(curves: dict[str, tuple[str, list[tuple[int, float]]]], parent: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, (stage, points) in sorted(curves.items()):
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


def winner(study) -> tuple[str, dict[str, Any]]:
    """The best candidate: lowest full-distillation loss among promoted ones, else lowest short-retrain loss."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise NasError(f"study {study.study_name!r} has no completed trial yet")
    full = [t for t in complete if _stage(t) == FULL]
    best = min(full or complete, key=lambda t: t.value)
    return _label(best), {"val_loss": best.value, "stage": _stage(best), "params": best.user_attrs.get("params")}


def export_best(study_name: str, storage: str, out: str | Path, checkpoint: str | Path | None = None,
                root: str | Path = "trials") -> dict[str, Any]:
    """Write the winner's Architecture (+ params, losses, parent) as JSON; optionally its checkpoint."""
    import optuna

    from nas.architecture import Architecture

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
    write_json(out, best)
    if checkpoint:
        if not run.exists(f"promoted/{label}/model"):
            raise NasError(f"--checkpoint: {label} was not promoted to full distillation, so it has no checkpoint; "
                           f"raise `promote` in the search space and re-run `nas search`")
        with atomic_dir(checkpoint) as tmp:
            shutil.copytree(run.fetch(f"promoted/{label}/model"), tmp, dirs_exist_ok=True)
            (tmp / "architecture.json").write_text(json.dumps(best, indent=2) + "\n")
    return best
