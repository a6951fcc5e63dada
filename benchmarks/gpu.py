"""`nas-bench gpu` (CUDA only): SmolLM2-135M on one GPU, trained as trials train there (bf16 autocast over fp32
master weights, the teacher in bf16):
  - the demo's trial time: `prepare` (importance, the teacher's top-K cache) and short-retrain trials of the demo
    space (search_spaces/smollm2-135m-demo.yaml) with a GPU a trial, run by `replay_trial` in this process, in a
    fresh run folder; the first trial pays for loading the parent onto the GPU and CUDA's warm-up, the second not;
  - the KD step's model FLOPs utilisation (MFU) with the teacher online, at the demo's micro-batch (4 x 128 tokens)
    and at a GPU-sized one: model FLOPs a token = 3 x the student's forward (forward and backward) + the teacher's
    forward (`nas.plan.forward_flops_per_token`, what `nas plan` sizes a retrain by), over the measured step time
    and the GPU's dense bf16 peak (`PEAK_BF16_TFLOPS`, by device name).
On one H100 (2026-12-06) it took about 66 s, 27 s of it `prepare` (docs/benchmarks.md, "On a GPU")."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import DEMO_SPACE
from nas.errors import ConfigError
from nas.plan import H100_BF16_TFLOPS, forward_flops_per_token

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets, by a fragment of
# torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3" is the SXM part); the first fragment found wins, so the
# more specific come first. Another GPU gets its step times and achieved TFLOP/s but no MFU.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", H100_BF16_TFLOPS),
                    ("H200", H100_BF16_TFLOPS), ("A100", 312.0))


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((peak for fragment, peak in PEAK_BF16_TFLOPS if fragment in device_name), None)


def kd_step(student, teacher, batch: int, seq_len: int, steps: int, peak: float | None) -> dict[str, Any]:
    """Seconds a KD step takes (the loop's work: the loss with the teacher online, backward, clipping, AdamW), best
    of `steps` after 3 warm-up steps, and what that is in model FLOPs."""
    from nas.distill import DistillConfig, Distiller

    # Random token ids: a step's time does not depend on which tokens it reads.
    train = torch.randint(teacher.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    # No intermediate-state loss: its cosine terms are not in the FLOPs counted.
    cfg = DistillConfig(tokens=batch * seq_len * steps, batch_size=batch, checkpoint_every=0, intermediate="off")
    idx = torch.arange(batch)
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        d = Distiller(student, teacher, train, train, tmp, cfg)

        def step() -> float:
            torch.cuda.synchronize()
            start = time.perf_counter()
            d.loss(idx)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(d.trained.parameters(), cfg.grad_clip)
            d.optimizer.step()
            d.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            return time.perf_counter() - start

        for _ in range(3):
            step()
        step_s = min(step() for _ in range(steps))
    per_token = 3 * forward_flops_per_token(student.config, seq_len) + forward_flops_per_token(teacher.config, seq_len)
    achieved = per_token * batch * seq_len / step_s / 1e12
    return {"batch": batch, "seq_len": seq_len, "step_s": step_s, "tokens_per_s": batch * seq_len / step_s,
            "model_flops_per_token": per_token, "achieved_tflops": achieved,
            "mfu": achieved / peak if peak else None, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def run(trials: int = 2, steps: int = 20, gpu_batch: tuple[int, int] = (16, 1024)) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise ConfigError("no CUDA device (torch.cuda.is_available() is False): this benchmark measures a GPU; run "
                          "it on a machine with one and a CUDA build of torch")
    from nas.search import build_candidate, prepare, replay_trial
    from nas.space import load_space

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_bf16_tflops(name)
    demo = load_space(DEMO_SPACE)
    space = dataclasses.replace(demo, resources=dataclasses.replace(demo.resources, gpus_per_trial=1))
    out: dict[str, Any] = {"device_name": name, "peak_bf16_tflops": peak}
    with tempfile.TemporaryDirectory() as root:  # a fresh run folder: nothing is reused from an earlier run
        start = time.perf_counter()
        shared = prepare(space, root)
        out["demo_prepare_s"] = time.perf_counter() - start
        labels = list(shared.rows)
        timings = {}
        for label in labels[:trials]:
            start = time.perf_counter()
            replay_trial(shared, label)
            result = shared.storage.read_json(f"{label}/result.json")
            timings[label] = {"trial_s": time.perf_counter() - start, "train_s": result["wall_s"],
                              "tokens_per_s": result["tokens_per_s"], "val_loss": result["val_loss"]}
        out["demo_trials"] = {"tokens": space.short_retrain.tokens, "batch": space.short_retrain.batch_size,
                              "seq_len": space.seq_len, "teacher": "cached top-K", **timings}
        teacher, student, _ = build_candidate(shared, labels[0], device)
    demo_shape = (space.short_retrain.batch_size, space.seq_len)
    out["kd_step"] = {"student": labels[0], "teacher": "online",
                      **{f"{b}x{s}": kd_step(student, teacher, b, s, steps, peak) for b, s in (demo_shape, gpu_batch)}}
    return out
