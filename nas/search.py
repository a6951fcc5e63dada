"""The search service (paper §2.3, best practice #9): importance once, a Ray Tune run over the feasible
candidates with Optuna choosing them, promotion of the best to full distillation, a study summary.

Ray and Optuna sit behind this module only. An Optuna trial's parameters are the architecture axes
(`nas.space.AXES`, a family's unit axes, the layers kept of each kind, whose sum is the depth), as integers so
that a study re-runs after any change to its space (`_distributions`), and so the dashboard's slice, contour and
importance plots read them; its user attributes hold the candidate's label, exact parameter count (and active
count), share of the parent and stage. A trial is a plain function of those axes and the shared inputs, so it can
be replayed from its parameters alone (`replay_trial`). A study holds one set of retrain settings (`_check_study`).

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
promotion is a trial of stage full_distillation, RUNNING while it trains: the claim on its label (`_claim`).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from ray import tune
from ray.tune.search import Searcher

from nas import sharding
from nas.architecture import FIGURES, KIND_AXIS, short_label as label_of
from nas.data import load_tokens, shuffled_rows, validation_size
from nas.distill import DistillConfig
from nas.errors import ConfigError, NasError
from nas.files import atomic_dir, write_json
from nas.importance import ImportanceSettings, Importances, cached_importance, lm_loss
from nas.latency import measure_candidates
from nas.parents import load_parent, parent_config, resolve_parent
from nas.plan import Cluster, Stage, block_sizes, check_fits, checkpoint_tokens, plan, retrain_gpus
from nas.prune import prune
from nas.space import AXES, MEASURED, RetrainSpec, SearchSpace, architecture_of, candidate_problem, enumerate_candidates, \
    infeasible_hint, kept_layers, row_axes
from nas.storage import RunStorage, is_uri
from nas.teacher_cache import ShardPlan, TopKShards, publish, topk_plan, write_part
from nas.tokens import TokenSet
from nas.workers import DistillInputs, DistillJob, run_here, run_on_workers

log = logging.getLogger(__name__)

METRIC = "val_loss"
TRIAL_FILES = ("architecture.json", "metrics.jsonl", "result.json")
SHORT, FULL = "short_retrain", "full_distillation"
HEARTBEAT_S = 30  # a driver records the heartbeat of each trial it runs this often
GRACE_S = 120  # a RUNNING trial whose heartbeat is older belongs to a dead driver
REJECTIONS = 20  # proposals in a row that are no free candidate, after which the searcher picks one itself


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
    train_rows: np.ndarray  # rows of the run folder's `tokens/` shards, as many as the full retrain reads
    val: torch.Tensor
    has_topk: bool
    nas_cache: str
    checkpoint_tokens: dict[str, int]  # by stage: SHORT, FULL

    def train_tokens(self, stage: str) -> TokenSet:
        """A stage's training sequences, read from the run folder's shards (a local copy of them on a URI root): the
        short retrains read the first ones only, which are all the teacher cache covers."""
        rows = self.train_rows if stage == FULL else self.train_rows[:_sequences_needed(self.space.short_retrain,
                                                                                       self.space.seq_len)]
        return TokenSet(self.storage.fetch("tokens"), rows)


def candidates(space: SearchSpace) -> tuple[Any, list[dict[str, Any]]]:
    """The parent's config (its family checked) and the feasible candidates, or the one-line reason there are none."""
    config = parent_config(space.parent)
    rows = enumerate_candidates(space, config)
    if not rows:
        raise ConfigError(f"{space.name}: {infeasible_hint(space, config)}")
    missing = [k for k in space.search.objectives[1:] if k not in MEASURED and k not in rows[0]]
    if missing:  # a dense parent has no active count of its own
        raise ConfigError(f"search.objectives: {', '.join(missing)} does not apply to this parent (every parameter "
                          f"is active in a dense model); use params")
    return config, rows


def prepare(space: SearchSpace, root: str | Path = "trials", stages: list[Stage] | None = None,
            echo: Callable[[str], None] = lambda line: None) -> Shared:
    """Step 1: candidates, data, importance and the teacher cache (computed once, kept in the run folder).
    `stages`: the plan checked against the cluster (default: planned for one 8-GPU node), which sizes the
    checkpoint intervals the space leaves unset.

    This process reads only the parent's config and tokenizer: the work on its weights runs in a Ray task when
    Ray is up (on a GPU node when trials take GPUs), else here."""
    from transformers import AutoTokenizer

    config, rows = candidates(space)
    stages = {s.name: s for s in stages or plan(space, config)}
    storage = RunStorage(root, space.study)
    if space.budget.speed_caps or set(MEASURED) & set(space.search.objectives):
        # Measured before anything is trained; those outside the budget are recorded, and never trained.
        rows, outside = measure_candidates(space, config, rows, storage, echo)
        storage.write_json("infeasible.json", outside)
        for row in outside:
            echo(f"[infeasible] {row['label']}: {row['infeasible']}")
        if not rows:
            raise ConfigError(f"{space.name}: no candidate is within the speed budget ({outside[0]['label']}: "
                              f"{outside[0]['infeasible']}; all {len(outside)} in {storage.uri}/infeasible.json)")
    tokenizer = AutoTokenizer.from_pretrained(resolve_parent(space.parent))
    imp = space.importance
    tokens = load_tokens(space.data, tokenizer, space.seq_len, space.text_field, min_sequences=imp.samples + 2)
    _share_tokens(storage, tokens)
    # Calibration sequences: a seeded sample of the whole corpus (or its first ones); then, from the rest in a seeded
    # order, the validation sequences and after them the training ones. The order is computed for the positions
    # drawn only (no array of the corpus's rows), and each part is a prefix of its own, so what is drawn for one
    # part does not depend on how much another takes.
    n, seed, drawn = len(tokens), space.search.seed, imp.sampling == "random"
    calibration = np.sort(shuffled_rows(n, 0, imp.samples, seed)) if drawn else np.arange(imp.samples)

    def rest(start: int, count: int) -> np.ndarray:
        """Rows `start` .. of the seeded order of those after calibration."""
        if drawn:
            return shuffled_rows(n, imp.samples + start, count, seed)
        return imp.samples + shuffled_rows(n - imp.samples, start, count, seed)

    n_val = validation_size(n - imp.samples, space.val_fraction)
    if n_val < space.val_sequences:
        raise ConfigError(f"val_sequences={space.val_sequences}: the validation split ({space.val_fraction:g} of "
                          f"{space.data}) has only {n_val} sequences; lower val_sequences or raise val_fraction")
    needed = max(_sequences_needed(spec, space.seq_len) for spec in (space.short_retrain, space.full_retrain))
    val = tokens[rest(0, space.val_sequences)]
    train = tokens.select(rest(n_val, min(needed, n - imp.samples - n_val)))  # (the training part may be short)
    nas_cache = os.environ.get("NAS_CACHE", "")
    short_rows = train.rows[:_sequences_needed(space.short_retrain, space.seq_len)]
    args = (space, storage, calibration, short_rows, val, nas_cache)
    parts = space.resources.cache_workers if space.short_retrain.teacher_topk else 1
    import ray

    if ray.is_initialized():
        # The parent's work, and the other parts of the teacher cache, as tasks queued together (so they wait for
        # resources in turn rather than one holding them while waiting for another).
        res = space.resources
        options = {"num_cpus": res.cpus_per_trial, "num_gpus": parent_gpus(space)}
        plans = ray.get([ray.remote(parent_work).options(**options).remote(*args, parts),
                         *[ray.remote(cache_part).options(**options).remote(space, storage, short_rows, part, parts,
                                                                            nas_cache) for part in range(1, parts)]])
    else:
        plans = [parent_work(*args)]  # one process: all of the cache
    if plans[0] is not None:
        if any(p != plans[0] for p in plans):
            raise NasError(f"parent {space.parent}: its tasks loaded different weights (did it change during the "
                           f"run?); re-run the search")
        publish(storage, "teacher_topk", plans[0])
    intervals = {stage: spec.checkpoint_tokens or checkpoint_tokens(stages[name], spec, space.seq_len)
                 for stage, name, spec in ((SHORT, "short_retrain", space.short_retrain),
                                           (FULL, "full_distillation", space.full_retrain))}
    return Shared(space, {r["label"]: r for r in rows}, storage, train.rows, val, bool(space.short_retrain.teacher_topk),
                  nas_cache, intervals)


def parent_work(space: SearchSpace, storage: RunStorage, calibration_rows: np.ndarray, train_rows: np.ndarray,
                val: torch.Tensor, nas_cache: str, cache_parts: int = 1) -> ShardPlan | None:
    """Everything that needs the parent's weights, once: importance scores, part 1 of `cache_parts` of the
    teacher's top-K cache over `train_rows` (the short retrains' sequences, when the space asks for one: its plan is
    returned) and the parent's own validation loss, each kept in the run folder (and reused from there when it
    matches)."""
    parent = _spread_parent(space, nas_cache)
    config = parent_config(space.parent)
    folder = storage.fetch("tokens")
    imp = space.importance
    settings = ImportanceSettings(seq_agg=imp.seq_agg, batch_agg=imp.batch_agg, neuron_source=imp.neuron_source,
                                  head_source=imp.head_source, drop_samples=imp.drop_samples,
                                  block_sizes=block_sizes(space, config))
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


def _sequences_needed(spec: RetrainSpec, seq_len: int) -> int:
    return max(spec.batch_size * spec.grad_accum, spec.tokens // seq_len)


def retrain_config(spec: RetrainSpec, seq_len: int, seed: int, checkpoint_tokens: int) -> DistillConfig:
    cfg = DistillConfig(tokens=spec.tokens, batch_size=spec.batch_size, grad_accum=spec.grad_accum, lr=spec.lr,
                        warmup_steps=spec.warmup_steps, seed=seed, grad_checkpointing=spec.grad_checkpointing)
    step_tokens = cfg.batch_size * cfg.grad_accum * seq_len
    return dataclasses.replace(cfg, eval_every=max(1, cfg.steps(seq_len) // spec.reports),
                               checkpoint_every=max(1, checkpoint_tokens // step_tokens))


def final_tokens(spec: RetrainSpec, seq_len: int) -> int:
    """The training tokens of a retrain run to its end (whole steps)."""
    step_tokens = spec.batch_size * spec.grad_accum * seq_len
    return max(1, spec.tokens // step_tokens) * step_tokens


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
    config = parent_config(shared.space.parent)
    layers = kept_layers(shared.rows[label], config, importances, shared.space.importance.layer_method)
    return architecture_of(shared.rows[label], config, layers)


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
    return DistillInputs(child, teacher, shared.train_tokens(FULL if promoted else SHORT), shared.val,
                         list(arch.layers), topk)


def _retrain(shared: Shared, label: str, rel: str, spec, on_eval: Callable[[dict], None], promoted: bool,
             report_to_tune: bool = False) -> dict:
    """Prune `label` and distil it into the run folder's `rel`; a finished one (its result.json) is not redone, and
    an interrupted one resumes from its newest checkpoint there (`checkpoint/`, written every
    `Shared.checkpoint_tokens`). One worker trains here; more run as a Ray Train job (`nas.workers`) whose folder
    must be shared by them."""
    storage = shared.storage
    done = storage.read_json(f"{rel}/result.json")
    if done is not None:
        return done
    res = shared.space.resources
    workers = spec.workers if promoted else res.workers_per_trial
    stage = FULL if promoted else SHORT
    with storage.workdir(rel) as out:
        arch = _architecture(shared, label, Importances.load(storage.fetch("importance.safetensors")))
        counts = {k: shared.rows[label][k] for k in FIGURES if k in shared.rows[label]}
        write_json(out / "architecture.json", {**arch.to_dict(), **counts})
        remote = storage.local is None
        if remote:
            _restore_checkpoint(storage, rel, out)
        job = DistillJob(functools.partial(candidate_inputs, shared, label, promoted),
                         retrain_config(spec, shared.space.seq_len, shared.space.search.seed,
                                        shared.checkpoint_tokens[stage]), str(out),
                         save_model=promoted, threads=res.cpus_per_trial,
                         on_checkpoint=functools.partial(_upload_checkpoint, storage, rel) if remote else None)
        gpus = retrain_gpus(res, workers, promoted)
        if workers == 1:
            result = run_here(job, torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"), on_eval)
        else:
            result = run_on_workers(job, workers, gpus, res.cpus_per_trial, shared.space.search.retries,
                                    storage_path=f"{storage.uri}/ray_train", name=f"{rel.replace('/', '-')}-{int(time.time())}",
                                    report_to_tune=report_to_tune)
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
    """Copy a finished run folder to a remote run folder, `result.json` (the 'finished' marker) last, then drop the
    checkpoints it no longer needs."""
    if storage.local is not None:
        return
    for path in sorted(out.iterdir()):
        if path.name != "result.json":
            storage.upload(path, f"{rel}/{path.name}")
    storage.upload(out / "result.json", f"{rel}/result.json")
    storage.remove(f"{rel}/checkpoint")


def _restore_checkpoint(storage: RunStorage, rel: str, out: Path) -> None:
    """Into a URI run's scratch folder: the newest complete checkpoint an interrupted attempt uploaded, and its log."""
    steps = [name for name in storage.listdir(f"{rel}/checkpoint")
             if sharding.STEP_DIR.fullmatch(name) and storage.exists(f"{rel}/checkpoint/{name}/state.json")]
    if steps:
        newest = max(steps, key=lambda name: int(sharding.STEP_DIR.fullmatch(name).group(1)))
        storage.download(f"{rel}/checkpoint/{newest}", out / "checkpoint" / newest)
        if storage.exists(f"{rel}/metrics.jsonl"):
            storage.download(f"{rel}/metrics.jsonl", out / "metrics.jsonl")


def _upload_checkpoint(storage: RunStorage, rel: str, out: Path) -> None:
    """After each checkpoint of a run in a URI run folder's scratch folder: copy up the log so far (a resume drops
    what it holds past its checkpoint), then the checkpoint (its state.json, the 'complete' marker, last), then drop
    the older one there."""
    newest = sharding.latest_checkpoint(out / "checkpoint")
    storage.upload(out / "metrics.jsonl", f"{rel}/metrics.jsonl")
    storage.upload(newest, f"{rel}/checkpoint/{newest.name}")
    for name in storage.listdir(f"{rel}/checkpoint"):
        if name != newest.name:
            storage.remove(f"{rel}/checkpoint/{name}")


def run_trial(config: dict[str, Any], shared: Shared, report: Callable[[dict], None] | None = None) -> None:
    """One trial: prune the candidate with these axes, distil it briefly, report validation loss by tokens. The
    final evaluation is reported once result.json is written: on its last report ASHA stops a trial that reached
    its end, which would leave the one trained to the end without its 'finished' marker."""
    in_tune = report is None
    report = report or tune.report
    final = final_tokens(shared.space.short_retrain, shared.space.seq_len)

    def on_eval(m: dict) -> None:
        if m["tokens"] < final:
            report({METRIC: m["val_loss"], "val_kd": m.get("val_kd"), "tokens": m["tokens"], "step": m["step"]})

    label = label_of(_axes(config))
    result = _retrain(shared, label, label, shared.space.short_retrain, on_eval, False, report_to_tune=in_tune)
    report({METRIC: result["val_loss"], "val_kd": result.get("val_kd"), "tokens": result["tokens"],
            "step": result["steps"]})


def replay_trial(shared: Shared, label: str) -> None:
    """Run one trial in this process, outside Ray and Optuna (debugging, benchmarks)."""
    run_trial(_params(shared.rows[label]), shared, report=lambda m: None)


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

    # In case Ray was imported before the variable was set (this module imports it). Private, and kept: Ray has no
    # public setting for a loopback-only node, and without it a private Ray binds the machine's other interfaces.
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray's Unix socket paths (temp dir + ~65 bytes of session name) must stay under 107 bytes, which a run folder
    # deep in a file system would overflow: its files go to a short folder named for the run folder.
    temp = Path(tempfile.gettempdir()) / f"nas-ray-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"
    env = {"env_vars": {k: os.environ[k] for k in ("NAS_CACHE", "HF_HUB_OFFLINE") if k in os.environ}}
    # ERROR: its notice that token authentication is on concerns clusters, not this private, loopback-only one.
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", _temp_dir=str(temp), runtime_env=env, log_to_driver=False,
             logging_level=logging.ERROR)
    return "a private Ray on 127.0.0.1"


def study_storage(url: str):
    """The Optuna database, with heartbeats on: a driver records one for each trial it runs (`_Heartbeat`), which is
    how a later driver tells a dead driver's trial from another driver's live one."""
    import optuna

    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9; they are its way to do this
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


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
    return label_of(axes) if set(AXES) <= set(axes) else None


def _params(row: dict[str, Any]) -> dict[str, int]:
    """A candidate's Optuna parameters: its axes, less the depth where the layers kept of each kind are axes (the
    depth is their sum: as a parameter of its own, a sampler would propose depths they disagree with)."""
    axes = row_axes(row)
    if any(k.startswith(KIND_AXIS) for k in axes):
        del axes["num_hidden_layers"]
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


# -- who runs a trial: this driver, another live one, or a dead one ---------------------------------------------

def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), None if there is no such
    process: with the pid, it names a process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_space() -> str:
    """Which processes a pid names here: this boot of the kernel and this pid namespace (containers that share a
    hostname each have their own); empty where /proc does not say (macOS: the hostname names the machine)."""
    try:
        return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}.{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


DRIVER = f"{socket.gethostname()}:{_pid_space()}:{os.getpid()}:{_process_start(os.getpid())}"


def _dead_driver(driver: str) -> bool:
    """Whether `driver` (a trial's "driver" attribute) is a process of this machine and pid namespace that has
    ended. Another's (or one named in an earlier form) is judged by its heartbeat alone."""
    parts = driver.rsplit(":", 3)
    if len(parts) != 4 or parts[:2] != [socket.gethostname(), _pid_space()]:
        return False
    pid, start = int(parts[2]), parts[3]
    if not Path("/proc/self/stat").exists():  # no /proc (macOS): the pid alone says it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False
    return _process_start(pid) != start


def _register_driver(study) -> None:
    """Name this driver in the study before it asks for any trial (one key per driver, so drivers never overwrite
    each other): a trial is made by `study.ask` before its "driver" attribute can be set, and the list says whose
    such a trial can be."""
    study.set_user_attr(f"driver {DRIVER}", datetime.datetime.now().isoformat(timespec="seconds"))


def _fail_dead_trials(study) -> None:
    """Record as failed the RUNNING trials whose driver is gone: at once when it was a process of this machine,
    else once their heartbeat is older than GRACE_S (Optuna's `fail_stale_trials`). One that names no driver (its
    driver was killed between asking for it and naming itself) is failed at once when every other driver of the
    study is a dead process of this machine, else once it is GRACE_S old. Live trials of another driver on the
    same study are left alone."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    now = datetime.datetime.now()
    others = [key.split(" ", 1)[1] for key in study.user_attrs if key.startswith("driver ")]
    others_gone = all(_dead_driver(d) for d in others if d != DRIVER)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        driver = t.user_attrs.get("driver")
        orphan = driver is None and (others_gone or (now - t.datetime_start).total_seconds() > GRACE_S)
        if orphan or driver is not None and _dead_driver(driver):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


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


class _Heartbeat:
    """Records the heartbeat of this driver's running trials every HEARTBEAT_S seconds, in a thread (Optuna's own
    heartbeat runs only inside `study.optimize`, which Tune does not use)."""

    def __init__(self, storage, trial_ids: Callable[[], list[int]]):
        self.storage, self.trial_ids, self.stop = storage, trial_ids, threading.Event()
        self.thread = threading.Thread(target=self._beat, name="nas-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:  # (the ids too are read from the database)
                for trial_id in self.trial_ids():
                    self.storage.record_heartbeat(trial_id)
            except Exception as e:  # a locked or dropped database: the next beat tries again
                log.warning("heartbeats not recorded: %s", e)

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _plan(space: SearchSpace, study, labels: list[str]) -> tuple[str, list[str], int]:
    """(sampler, labels to enqueue, number of trials still to run), resuming what the study already holds."""
    import optuna

    _fail_dead_trials(study)
    taken = _taken(study)
    # Candidates a killed run enqueued but never started: the next run's Tune trials take them first.
    waiting = [t.user_attrs["enqueued"] for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
               if "enqueued" in t.user_attrs]
    sampler = space.search.sampler
    if sampler == "auto":
        sampler = "grid" if len(labels) <= space.search.max_trials else "tpe"
    if sampler == "grid":
        remaining = [label for label in labels if label not in taken]
        return sampler, [label for label in remaining if label not in waiting], len(remaining)
    return sampler, [], max(0, space.search.max_trials - len(taken))


def run_search(space: SearchSpace, root: str | Path = "trials", address: str | None = None,
               trial_fn: Callable = run_trial, echo: Callable[[str], None] = lambda line: None) -> "Any":
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


def this_machine(space: SearchSpace) -> Cluster:
    """This machine, as the plan check sees the private Ray it would start here: its GPUs (a GPU's memory from
    `resources.gpu_memory_gb`) and its memory."""
    return Cluster(nodes=1, gpus_per_node=torch.cuda.device_count(), gpu_memory_gb=space.resources.gpu_memory_gb)


def ray_cluster(space: SearchSpace) -> Cluster:
    """The cluster Ray reaches, as the plan check sees it: its nodes and the most GPUs on one; a GPU's memory from
    `resources.gpu_memory_gb`, a node's from this machine."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = max((int(n["Resources"].get("GPU", 0)) for n in nodes), default=0)
    return Cluster(nodes=max(1, len(nodes)), gpus_per_node=gpus, gpu_memory_gb=space.resources.gpu_memory_gb)


class Progress(tune.Callback):
    """One line per finished trial: n/N, label, params, val loss, tokens, trial time, elapsed, ETA."""

    def __init__(self, total: int, rows: dict[str, dict[str, Any]], final: int, echo: Callable[[str], None]):
        self.total, self.rows, self.final, self.echo = total, rows, final, echo
        self.done, self.start = 0, time.time()

    def line(self, trial, what: str) -> None:
        self.done += 1
        elapsed = time.time() - self.start
        eta = elapsed / self.done * max(0, self.total - self.done)
        label = label_of(_axes(trial.config))
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
        self.echo(f"[retry] {label_of(_axes(trial.config))} failed (failure {trial.num_failures}); retrying")


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
        label = label_of(axes)
        if label in self.rows:
            return taken.get(label)
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
                    row = self.rows[label_of(_axes(params))]
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


# -- summary and export -----------------------------------------------------------------------------

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
        for name in ("summary.parquet", "summary.csv", "pareto.png", "pareto.json", "curves.png"):
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


def winner(study) -> tuple[str, dict[str, Any]]:
    """The best candidate: lowest full-distillation loss among promoted ones, else lowest short-retrain loss."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
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
