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

from nas import sharding
from nas.distill import DistillConfig, Distiller
from nas.errors import TrainingError
from nas.files import write_json
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
    partial of one), `cfg` the loop's settings, `out` the output folder (shared by all workers), `on_checkpoint`
    what rank 0 does with `out` after each checkpoint (picklable too; e.g. copy it to a URI run folder)."""

    build: Callable[[torch.device], DistillInputs]
    cfg: DistillConfig
    out: str
    save_model: bool = True
    threads: int = 1
    on_checkpoint: Callable[[Path], None] | None = None


def run_here(job: DistillJob, device: torch.device, on_eval: Callable[[dict], None] | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Run the job in this process (one worker, or one of N under an initialised process group)."""
    torch.set_num_threads(max(1, job.threads))
    if device.type == "cpu":
        unmap_large_allocations()
    start = resident_bytes(reset_peak=True)
    inputs = job.build(device)
    distiller = Distiller(inputs.student, inputs.teacher, inputs.train, inputs.val, job.out, job.cfg,
                          inputs.layer_map, inputs.topk)
    distiller.on_eval, distiller.on_checkpoint = on_eval, job.on_checkpoint
    result = distiller.run(progress=progress, save_model=job.save_model)
    if result.get("finished") and start is not None:
        # What building and training took on top of the process as it was (what `nas plan` predicts), the most
        # any worker took; it joins the result file rank 0 wrote.
        peak = sharding.max_across_workers(resident_bytes(peak=True) - start)
        result["peak_memory_bytes_per_worker"] = peak
        if distiller.rank == 0:
            write_json(Path(job.out) / "result.json", result)
    return result


def unmap_large_allocations(threshold: int = 128 * 1024) -> None:
    """Have glibc map every allocation above `threshold` bytes on its own and unmap it when freed. By default it
    raises that threshold as large blocks are freed and keeps later ones in its heaps, where a CPU training run's
    freed activations and FSDP's gathered layers stay resident (measured: +0.6 GiB a worker on SmolLM2)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def resident_bytes(peak: bool = False, reset_peak: bool = False) -> int | None:
    """This process's resident memory now (or its peak, VmHWM), from /proc; None where there is no /proc.
    `reset_peak` starts a new peak from now."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    if reset_peak:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # not allowed here: the peak then counts from the process's start
            pass
    key = "VmHWM:" if peak else "VmRSS:"
    line = next(line for line in status.read_text().splitlines() if line.startswith(key))
    return int(line.split()[1]) * 1024


def _worker_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    job: DistillJob = config["job"]
    held_from = config.get("held_from")

    def report(record: dict) -> None:
        # Every worker reports the same evaluations (Ray Train expects all to); the Tune callback forwards rank 0's
        # to the trial. Those from `held_from` tokens on are the caller's to report once its result is written: on
        # the final one ASHA stops the trial, before its marker would be written.
        if held_from is None or record["tokens"] < held_from:
            ray.train.report(record)

    run_here(job, ray.train.torch.get_device(), on_eval=report)


def run_on_workers(job: DistillJob, workers: int, gpus_per_worker: float = 0, cpus_per_worker: float = 1,
                   max_failures: int = 1, storage_path: str | None = None, name: str | None = None,
                   report_to_tune: bool = False, held_from: int | None = None) -> dict[str, Any]:
    """Run the job on `workers` Ray Train workers (Ray must be initialised) and return its result.json.

    With `report_to_tune` (the caller is a Ray Tune trial), rank 0's evaluations are reported to the trial as they
    happen, but for those at `held_from` tokens or later, which the caller reports itself."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    callbacks = []
    if report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    trainer = TorchTrainer(
        _worker_loop, train_loop_config={"job": job, "held_from": held_from},
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

