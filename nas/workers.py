"""One distillation on N Ray Train workers: a `TorchTrainer` whose workers each run `nas.distill.Distiller` under
the process group Ray Train sets up (gloo on CPU, nccl on CUDA), so the student and teacher are FSDP2-sharded
across them. Ray Train's `FailureConfig` restarts a run whose worker died; the Distiller then resumes from its
newest complete DCP checkpoint in the output folder, which must be one folder every worker reaches.

Used by `nas distill --workers N`, by search trials with `resources.workers_per_trial > 1` (Tune over Train:
rank 0's evaluations are reported to the trial) and by promotion with `full_retrain.workers > 1`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from nas.distill import DistillConfig, Distiller
from nas.errors import TrainingError
from nas.teacher_cache import TeacherTopK


@dataclass
class DistillInputs:
    """What one worker trains with; built on the worker, on its device."""

    student: nn.Module
    teacher: nn.Module | None
    train: Tensor
    val: Tensor
    layer_map: list[int] | None = None
    topk: TeacherTopK | None = None


@dataclass(frozen=True)
class DistillJob:
    """A distillation to run anywhere: `build(device)` makes the inputs (a picklable, module-level function or a
    partial of one), `cfg` the loop's settings, `out` the output folder (shared by all workers)."""

    build: Callable[[torch.device], DistillInputs]
    cfg: DistillConfig
    out: str
    save_model: bool = True
    threads: int = 1


def run_here(job: DistillJob, device: torch.device, on_eval: Callable[[dict], None] | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Run the job in this process (one worker, or one of N under an initialised process group)."""
    torch.set_num_threads(max(1, job.threads))
    inputs = job.build(device)
    distiller = Distiller(inputs.student, inputs.teacher, inputs.train, inputs.val, job.out, job.cfg,
                          inputs.layer_map, inputs.topk)
    distiller.on_eval = on_eval
    return distiller.run(progress=progress, save_model=job.save_model)


def _worker_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    job: DistillJob = config["job"]
    # Every worker reports (Ray Train expects all to); the Tune callback forwards rank 0's to the trial.
    run_here(job, ray.train.torch.get_device(), on_eval=lambda record: ray.train.report(record))


def run_on_workers(job: DistillJob, workers: int, gpus_per_worker: float = 0, cpus_per_worker: float = 1,
                   max_failures: int = 1, storage_path: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Run the job on `workers` Ray Train workers (Ray must be initialised) and return its result.json.

    Inside a Ray Tune trial, rank 0's evaluations are reported to the trial as they happen."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    callbacks = []
    if _in_tune_session():
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    trainer = TorchTrainer(
        _worker_loop, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name or f"distill-{int(time.time() * 1000)}",
                             storage_path=storage_path or str(Path(job.out).resolve() / ".ray_train"),
                             failure_config=FailureConfig(max_failures=max_failures), callbacks=callbacks))
    trainer.fit()
    result = Path(job.out) / "result.json"
    if not result.exists():
        raise TrainingError(f"{job.out}: the {workers} workers finished without writing result.json")
    return json.loads(result.read_text())

