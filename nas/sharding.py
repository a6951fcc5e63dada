"""What the KD loop needs to run on N processes: FSDP2 sharding, cross-worker means, DCP checkpoints, and the
final gathered HF checkpoint. With one process (no process group) every function is the plain-module case, so
`nas.distill.Distiller` has one code path for 1 and N workers.

Checkpoint layout (a shared folder every worker reaches):
    checkpoint/step-000020/    .metadata + *.distcp (torch.distributed.checkpoint: model and optimizer, sharded),
                               trainer.pt (scheduler), rng-<rank>.pt, state.json (written last)
    checkpoint/.step-000040.tmp/   a checkpoint being written: never read; renamed into place when complete
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

STEP_DIR = re.compile(r"step-(\d+)")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded() -> bool:
    return rank_and_world()[1] > 1


def shard(model: nn.Module, trainable: bool) -> nn.Module:
    """FSDP2 over the data-parallel group: each decoder layer is one unit, the rest (embeddings, final norm, LM
    head, tied or not) the root unit. On CUDA, bf16 compute with fp32 master weights and fp32 gradient
    reduction; on CPU fp32. A frozen model (the teacher) is sharded the same way, without gradients."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    on_cuda = next(model.parameters()).device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if on_cuda and trainable \
        else MixedPrecisionPolicy()
    if not trainable:
        model.requires_grad_(False)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def mean_across_workers(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over workers (each worker saw an equal share of the batch)."""
    if not is_sharded():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)  # a sum: gloo has no average
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def sum_across_workers(t: torch.Tensor) -> torch.Tensor:
    """The sum of a (detached) tensor over workers; itself on one worker. It stays on its device: the model's,
    which is the backend's (CUDA for nccl, the CPU for gloo)."""
    if not is_sharded():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def max_across_workers(value: int) -> int:
    if not is_sharded():
        return value
    t = torch.tensor([value], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if is_sharded():
        dist.barrier()


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters and optimizer state this worker holds (its shards when sharded)."""
    def size(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    state = sum(size(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return sum(size(p) for p in model.parameters()) + state


# -- checkpoints ------------------------------------------------------------------------------------

def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (its state.json exists), or None. Temporary folders are never chosen."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if STEP_DIR.fullmatch(p.name) and (p / "state.json").exists()]
    return max(done, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)), default=None)


def save_checkpoint(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write step `step` (collective: every worker calls it), then make it the latest in one rename."""
    rank, _ = rank_and_world()
    final = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp), no_dist=not is_sharded())
    torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
    barrier()
    if rank == 0:
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **meta}))
        _fsync_dir(tmp)
        os.replace(tmp, final)
        for old in folder.iterdir():
            if old != final and STEP_DIR.fullmatch(old.name):
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, with this or another worker count; returns the trainer
    state. Model and optimizer are resharded by DCP to the current workers."""
    rank, _ = rank_and_world()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path), no_dist=not is_sharded())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng-{rank}.pt"
    if rng.exists():  # absent when resuming with more workers than wrote it
        _set_rng_state(torch.load(rng, weights_only=True))
    return torch.load(path / "trainer.pt", weights_only=True)


def _rng_state() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


# -- the final model --------------------------------------------------------------------------------

def save_hf_model(model: nn.Module, folder: Path, model_class: type) -> None:
    """Write `model` as a stock HF checkpoint on rank 0 (gathering the shards when sharded: collective)."""
    if not is_sharded():
        model.save_pretrained(folder)
        return
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank_and_world()[0] == 0:
        from nas.loader import build, is_per_layer

        with torch.device("meta"):  # a per-layer child's layers differ from its class's stock ones
            plain = build(model.config) if is_per_layer(model.config) else model_class(model.config)
        plain.load_state_dict(full, assign=True, strict=False)
        plain.tie_weights()
        plain.save_pretrained(folder)
