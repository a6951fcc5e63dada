"""Run preparation (step 1 of a search): the feasible candidates, the token shards, and the parent's work
(importance scores, the teacher's top-K cache, its own validation loss), computed once into the run folder; and
`Shared`, what every trial reads. Also the retrain settings each stage's runs follow."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from nas.data import load_tokens, shuffled_rows, validation_size
from nas.distill import DistillConfig
from nas.engine_latency import engine_problem
from nas.errors import ConfigError, NasError
from nas.families import Parent
from nas.importance import Importances, ImportanceSettings, cached_importance, lm_loss
from nas.latency import measure_candidates
from nas.parents import load_parent, parent_config, resolve_parent
from nas.plan import Stage, block_sizes, checkpoint_tokens, plan
from nas.search.block_latency import TIMED, block_latency
from nas.search.per_layer import ASSEMBLY, DIGEST, SCORES, assemble_candidates, block_widths, cached_block_scores
from nas.space import MEASURED, RetrainSpec, SearchSpace, enumerate_candidates, infeasible_hint, per_layer_problem
from nas.storage import RunStorage, is_uri
from nas.teacher_cache import ShardPlan, publish, topk_plan, write_part
from nas.tokens import TokenSet

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
    if space.per_layer is not None and (problem := per_layer_problem(space, Parent.of(config))):
        raise ConfigError(f"{space.name}: {problem}")
    if problem := engine_problem(space, config):  # before any work, not at the first timing
        raise ConfigError(f"{space.name}: {problem}")
    # A per-layer search's own candidates come from its block scores (`prepare`); the axes' uniform ones are
    # candidates beside them where it asks (`per_layer.uniform`), with no layer table (digest 0).
    uniform = space.per_layer is None or space.per_layer.uniform
    rows = enumerate_candidates(space, config) if uniform else []
    if not rows and uniform:
        raise ConfigError(f"{space.name}: {infeasible_hint(space, config)}")
    if space.per_layer is not None:
        rows = [{**row, DIGEST: 0} for row in rows]
    missing = [k for k in space.search.objectives[1:] if k not in MEASURED and rows and k not in rows[0]]
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
        if not rows and space.per_layer is None:  # (a per-layer search's own candidates are timed below)
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
    calibration = calibration_rows(space, n)

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
    if space.per_layer is not None:
        scores = storage.read_json(SCORES)
        echo(f"[per-layer] block scores of {scores['variants']} variants on {scores['tokens']:,} tokens: "
             f"{scores['seconds']:.0f} s")
        assembled = _per_layer_rows(space, config, scores["scores"], storage, echo)
        rows = [*assembled, *(r for r in rows if r["label"] not in {a["label"] for a in assembled})]
    intervals = {stage: spec.checkpoint_tokens or checkpoint_tokens(stages[name], spec, space.seq_len)
                 for stage, name, spec in ((SHORT, "short_retrain", space.short_retrain),
                                           (FULL, "full_distillation", space.full_retrain))}
    return Shared(space, {r["label"]: r for r in rows}, storage, train.rows, val, bool(space.short_retrain.teacher_topk),
                  nas_cache, intervals)


def _per_layer_rows(space: SearchSpace, config: Any, scores: dict[str, dict[str, float]], storage: RunStorage,
                    echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """The assembly program's children; under a speed budget, the program caps their summed measured block costs
    (`block_latency`), and each is then timed whole: one over a cap is left out (into infeasible.json), and the
    measured figures go beside the predicted ones in per_layer.json."""
    if not space.budget.speed_caps:
        return assemble_candidates(space, config, scores, storage, echo)
    latency = block_latency(space, config, block_widths(space, Parent.of(config)), storage, echo)
    rows, outside = measure_candidates(space, config, assemble_candidates(space, config, scores, storage, echo,
                                                                          latency), storage, echo)
    for row in outside:
        echo(f"[infeasible] {row['label']}: {row['infeasible']} (measured whole; predicted within)")
    storage.write_json("infeasible.json", [*(storage.read_json("infeasible.json") or []), *outside])
    program = storage.read_json(ASSEMBLY)
    measured = {r["label"]: r for r in rows + outside}
    for solution in program["solutions"]:
        solution["measured"] = {k: measured[solution["label"]][k] for k in TIMED}
    storage.write_json(ASSEMBLY, program)
    if not rows:
        raise ConfigError(f"{space.name}: no per-layer child is within the speed budget when timed whole "
                          f"({outside[0]['label']}: {outside[0]['infeasible']}); the block costs' sum predicted "
                          f"it within: see {storage.uri}/{ASSEMBLY}")
    return rows


def calibration_rows(space: SearchSpace, n: int) -> np.ndarray:
    """The rows of the `n` tokenised sequences that importance (and block scores) read: a seeded sample of the
    whole corpus, or its first ones."""
    imp = space.importance
    if imp.sampling == "random":
        return np.sort(shuffled_rows(n, 0, imp.samples, space.search.seed))
    return np.arange(imp.samples)


def importance_settings(space: SearchSpace, config: Any) -> ImportanceSettings:
    """The space's importance settings (part of the importance's and so of the block scores' key)."""
    imp = space.importance
    return ImportanceSettings(seq_agg=imp.seq_agg, batch_agg=imp.batch_agg, neuron_source=imp.neuron_source,
                              head_source=imp.head_source, drop_samples=imp.drop_samples,
                              block_sizes=block_sizes(space, config))


def parent_work(space: SearchSpace, storage: RunStorage, calibration_at: np.ndarray, train_rows: np.ndarray,
                val: torch.Tensor, nas_cache: str, cache_parts: int = 1) -> ShardPlan | None:
    """Everything that needs the parent's weights, once: importance scores, a per-layer search's block scores,
    part 1 of `cache_parts` of the teacher's top-K cache over `train_rows` (the short retrains' sequences, when the
    space asks for one: its plan is returned) and the parent's own validation loss, each kept in the run folder (and
    reused from there when it matches)."""
    parent = _spread_parent(space, nas_cache)
    config = parent_config(space.parent)
    folder = storage.fetch("tokens")
    settings = importance_settings(space, config)
    calibration = TokenSet(folder, calibration_at)[:]
    _kept_in(storage, "importance.safetensors", lambda path: cached_importance(parent, calibration, path, settings))
    if space.per_layer is not None:
        cached_block_scores(parent, Importances.load(storage.fetch("importance.safetensors")), calibration, space,
                            storage)
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
