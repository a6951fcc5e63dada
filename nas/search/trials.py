"""Trials: prune a candidate from the parent and distil it into its run folder (a short retrain, or the full
distillation of a promoted one), resuming from its newest checkpoint, copied up and down for a URI run folder.
`run_trial` is the function Ray Tune runs (Ray pickles it by this module's path)."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from ray import tune

from nas import sharding
from nas.architecture import FIGURES
from nas.files import write_json
from nas.importance import Importances
from nas.parents import load_parent, parent_config, resolve_parent
from nas.plan import retrain_gpus
from nas.prune import prune
from nas.search.preparation import FULL, METRIC, SHORT, Shared, final_tokens, retrain_config
from nas.search.study import _label_of, _params
from nas.space import SearchSpace, architecture_of, kept_layers
from nas.storage import RunStorage
from nas.teacher_cache import TopKShards
from nas.workers import DistillInputs, DistillJob, run_here, run_on_workers


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
            # A trial's final evaluation is held back: `run_trial` reports it once result.json is written.
            result = run_on_workers(job, workers, gpus, res.cpus_per_trial, shared.space.search.retries,
                                    storage_path=f"{storage.uri}/ray_train",
                                    name=f"{rel.replace('/', '-')}-{int(time.time())}", report_to_tune=report_to_tune,
                                    held_from=final_tokens(spec, shared.space.seq_len) if report_to_tune else None)
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

    label = _label_of(config)
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
