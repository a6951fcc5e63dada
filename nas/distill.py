"""Knowledge-distillation retraining of a pruned student (paper §3), as one explicit, resumable loop.

Output folder:
    model/          the student as a stock HF checkpoint (written at the end, atomically)
    metrics.jsonl   one JSON line per logged step and per evaluation; a resumed run first drops the lines after
                    its checkpoint's step and writes {"resumed_at_step": N}, so every step is logged once
    checkpoint/     model, optimizer, scheduler, RNG and step (DCP, sharded; `nas.sharding`), for resuming
                    (removed when done)
    result.json     final figures; its presence means the run finished and is not redone
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from nas import losses, sharding
from nas.errors import ConfigError, TrainingError
from nas.families import family_of, logit_map
from nas.files import atomic_dir, atomic_path, write_json
from nas.teacher_cache import TeacherTopK, TopKShards

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run. Defaults follow the paper's best practices: KD only, forward KL, T = 1.

    Attributes:
        tokens: training tokens in total (steps = tokens / (batch_size * grad_accum * seq_len)).
        lr: peak learning rate, reached after `warmup_steps`, then cosine decay to `lr * min_lr_ratio`.
        kd: "forward" or "reverse" KL on logits, or "none" for plain cross-entropy training.
        ce_weight: weight of next-token cross-entropy added to the KD loss (paper: 0 is best).
        intermediate: "auto" adds the intermediate-state loss when the student dropped more than
            `depth_threshold` of the teacher's layers (§3); "on" / "off" force it.
        eval_every / checkpoint_every: in optimizer steps; 0 means only at the end. An evaluation on the way
            gives the validation loss (what a search ranks by); the final one adds the KL to the teacher, whose
            forward would otherwise double the cost of every evaluation. Neither changes what is trained, so a
            checkpoint resumes under other values of them.
        loss_chunk_tokens: tokens whose logits exist at once in the loss (`nas.losses.logit_losses`).
    """

    tokens: int = 16_384
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    kd: str = "forward"
    ce_weight: float = 0.0
    intermediate: str = "auto"
    depth_threshold: float = 0.25
    eval_every: int = 0
    checkpoint_every: int = 20
    seed: int = 0
    grad_checkpointing: bool = False
    loss_chunk_tokens: int = 1024

    def __post_init__(self) -> None:
        problems = []
        if self.kd not in ("forward", "reverse", "none"):
            problems.append(f"kd={self.kd!r}: must be 'forward', 'reverse' or 'none'")
        if self.intermediate not in ("auto", "on", "off"):
            problems.append(f"intermediate={self.intermediate!r}: must be 'auto', 'on' or 'off'")
        for key in ("tokens", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                problems.append(f"{key}={getattr(self, key)}: must be >= 1")
        if self.kd == "none" and self.ce_weight <= 0:
            problems.append("kd='none' needs ce_weight > 0 (otherwise there is no loss)")
        if problems:
            raise ConfigError("; ".join(problems))

    def steps(self, seq_len: int) -> int:
        return max(1, self.tokens // (self.batch_size * self.grad_accum * seq_len))


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warm-up to 1, then cosine decay to `floor` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def sample_indices(step: int, micro: int, cfg: DistillConfig, n: int) -> Tensor:
    """Which training sequences feed (step, micro-batch): seeded epoch permutations, so a resumed run
    sees exactly the data an uninterrupted one would."""
    start = (step * cfg.grad_accum + micro) * cfg.batch_size
    positions = torch.arange(start, start + cfg.batch_size)
    out = torch.empty_like(positions)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        sel = positions.div(n, rounding_mode="floor") == epoch
        out[sel] = perm[positions[sel] % n]
    return out


def uses_intermediate(cfg: DistillConfig, student_layers: int, teacher_layers: int) -> bool:
    if cfg.intermediate != "auto":
        return cfg.intermediate == "on"
    return 1 - student_layers / teacher_layers > cfg.depth_threshold


@contextlib.contextmanager
def capture_states(model: nn.Module, layers: list[int]) -> Iterator[list[Tensor]]:
    """Collect [embeddings, outputs of `layers`...] after the model's final norm (paper §3). The same for every
    layer kind: a hybrid's recurrent layers hand on their residual stream as attention layers do."""
    family = family_of(model.config)
    states: list[Tensor] = []
    norm = model.get_submodule(family.final_norm)

    def keep(_m, _a, out):
        states.append(norm(out[0] if isinstance(out, tuple) else out))

    handles = [model.get_submodule(family.embeddings).register_forward_hook(keep)]
    handles += [model.model.layers[i].register_forward_hook(keep) for i in layers]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


class Distiller:
    """Holds a run's student, teacher, optimiser and data; `run()` trains to the end or to `stop_after`.

    Under a process group of N workers (Ray Train, torchrun) the student and teacher are sharded with FSDP2 and
    each worker takes 1/N of every micro-batch: the global batch and the data order do not depend on N, so N
    workers reproduce one. Rank 0 writes the files."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, train: Tensor, val: Tensor, out: str | Path,
                 cfg: DistillConfig, layer_map: list[int] | None = None, teacher_topk: TeacherTopK | TopKShards | None = None):
        if cfg.kd != "none" and teacher is None:
            raise ConfigError(f"kd={cfg.kd!r} needs a teacher")
        if teacher_topk is not None and cfg.kd != "forward":
            raise ConfigError(f"kd={cfg.kd!r} needs the whole teacher distribution; a top-K cache serves forward KL")
        self.rank, self.workers = sharding.rank_and_world()
        if cfg.batch_size % self.workers:
            raise ConfigError(f"batch_size={cfg.batch_size}: must be a multiple of the {self.workers} workers, which "
                              f"split every micro-batch; raise batch_size or use fewer workers")
        self.student, self.teacher, self.train_tokens, self.val, self.cfg = student, teacher, train, val, cfg
        self.out, self.topk = Path(out), teacher_topk
        self.model_class = type(student)
        self.device = next(student.parameters()).device
        self.seq_len = train.shape[1]
        self.total = cfg.steps(self.seq_len)
        n_student = student.config.num_hidden_layers
        self.layer_map = layer_map or list(range(n_student))
        self.intermediate = teacher is not None and uses_intermediate(cfg, n_student, teacher.config.num_hidden_layers)
        self.projection = None
        if self.intermediate and student.config.hidden_size != teacher.config.hidden_size:
            with torch.random.fork_rng(devices=[]):  # the same start on every worker and in every run
                torch.manual_seed(cfg.seed)
                self.projection = nn.Linear(student.config.hidden_size, teacher.config.hidden_size, bias=False)
            self.projection.to(self.device)
        if cfg.grad_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        if sharding.is_sharded():
            sharding.shard(student, trainable=True)
            if teacher is not None:
                sharding.shard(teacher, trainable=False)
            if self.projection is not None:
                from torch.distributed.fsdp import fully_shard

                fully_shard(self.projection)
        # Everything the optimizer trains, as one module for checkpoints.
        self.trained = nn.ModuleDict({"student": student, **({"projection": self.projection} if self.projection else {})})
        params = list(self.trained.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total, cfg.warmup_steps, cfg.min_lr_ratio))
        self.step = 0
        self.on_eval: Callable[[dict[str, Any]], None] | None = None  # e.g. a report to Ray Tune
        self.on_checkpoint: Callable[[Path], None] | None = None  # rank 0, after each: e.g. a copy to a URI

    def _autocast(self) -> torch.autocast:
        """bf16 compute on CUDA (fp32 master weights); fp32 on CPU. Training and evaluation share it."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    # -- the loss, written out --------------------------------------------------------------------
    def loss(self, idx: Tensor) -> dict[str, Tensor]:
        """The loss of this worker's share of the micro-batch `idx` (indices into the training tokens)."""
        cfg = self.cfg
        idx = idx.tensor_split(self.workers)[self.rank]
        tokens = self.train_tokens[idx].to(self.device)
        mask = torch.ones(tokens.shape, dtype=torch.bool, device=self.device)
        autocast = self._autocast()
        teacher_states: list[Tensor] = []
        targets = losses.LogitTargets(kd=cfg.kd, temperature=cfg.temperature, labels=tokens.roll(-1, 1),
                                      ce_weight=cfg.ce_weight, logit_map=logit_map(self.student.config))
        if self.teacher is not None and (self.topk is None or self.intermediate):
            with torch.no_grad(), autocast, capture_states(self.teacher, self.layer_map if self.intermediate else []) as ts:
                teacher_hidden = losses.final_hidden(self.teacher, tokens)
                teacher_states = list(ts)
            targets = dataclasses.replace(targets, teacher_hidden=teacher_hidden,
                                          teacher_head=self.teacher.get_output_embeddings().weight,
                                          teacher_logit_map=logit_map(self.teacher.config))
        if cfg.kd == "forward" and self.topk is not None:
            logprobs, index = self.topk.rows(idx, self.device)
            targets = dataclasses.replace(targets, teacher_hidden=None, teacher_head=None, topk_logprobs=logprobs,
                                          topk_index=index)
        router_logits: list[Tensor] = []
        with autocast, capture_states(self.student, list(range(len(self.layer_map))) if self.intermediate else []) as ss:
            hidden = losses.final_hidden(self.student, tokens, router_logits)
            parts = losses.logit_losses(hidden, self.student.get_output_embeddings().weight, mask, targets,
                                        cfg.loss_chunk_tokens)
            if self.intermediate:  # under autocast too: FSDP2's bf16 compute hands on bf16 states, while the
                # projection's (fp32) weights are not cast by it
                parts["is"] = losses.cosine_loss(list(ss), teacher_states, mask, self.projection)
        if router_logits:  # the parent's config asks for its routers' load-balancing loss: kept, weighted as it says
            config = self.student.config
            parts["router_aux"] = losses.router_balance_loss(router_logits, config.num_experts_per_tok,
                                                             router_logits[0].shape[-1])
            parts["loss"] = parts["loss"] + config.router_aux_loss_coef * parts["router_aux"]
        if self.intermediate:
            # Dynamic weight (§3): scale the intermediate loss to the logit loss's magnitude (over all workers,
            # so that N workers weigh it as one would).
            magnitudes = sharding.mean_across_workers({"logit": float(parts["loss"].detach()),
                                                       "is": float(parts["is"].detach())})
            parts["loss"] = parts["loss"] + magnitudes["logit"] / max(magnitudes["is"], 1e-8) * parts["is"]
        return parts

    # -- checkpoints ------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def save_checkpoint(self) -> None:
        sharding.save_checkpoint(self.checkpoint_dir, self.step, self.trained, self.optimizer,
                                 {"scheduler": self.scheduler.state_dict()},
                                 {"config": asdict(self.cfg), "workers": self.workers})

    def load_checkpoint(self) -> bool:
        latest = sharding.latest_checkpoint(self.checkpoint_dir)
        if latest is None:
            return False
        state = json.loads((latest / "state.json").read_text())
        if _trained_by(state["config"]) != _trained_by(asdict(self.cfg)):
            raise ConfigError(f"{self.checkpoint_dir} was made with other settings; use a new --out or delete it")
        trainer = sharding.load_checkpoint(latest, self.trained, self.optimizer)
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.step = state["step"]
        return True

    def _resume_log(self) -> list[dict[str, Any]]:
        """What an earlier, killed attempt logged up to the step this one starts from (the rest is trained again):
        the log keeps that and marks the resume; returns the evaluations kept."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # the line being written when the attempt was killed
                continue
        kept = [r for r in records if r.get("step", 0) <= self.step]
        if self.rank == 0:
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in [*kept, {"resumed_at_step": self.step}]))
        sharding.barrier()
        return [r for r in kept if "val_loss" in r]

    # -- evaluation and logging -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, kd: bool = True) -> dict[str, float]:
        """Validation loss (and, with `kd`, forward KL to the teacher) through the training loss's chunked head:
        one student forward per batch for both, and no [batch, seq, vocab] logits. Every worker evaluates the
        same, whole validation set."""
        self.student.eval()
        autocast = self._autocast()
        with_kd, ce, kd_sum = kd and self.teacher is not None, 0.0, 0.0
        for batch in self.val.split(self.cfg.batch_size):
            batch = batch.to(self.device)
            mask = torch.ones(batch.shape, dtype=torch.bool, device=self.device)
            targets = losses.LogitTargets(kd="none", labels=batch.roll(-1, 1), ce_weight=1.0,
                                          logit_map=logit_map(self.student.config))
            with autocast:
                if with_kd:
                    targets = dataclasses.replace(targets, kd="forward",
                                                  teacher_hidden=losses.final_hidden(self.teacher, batch),
                                                  teacher_head=self.teacher.get_output_embeddings().weight,
                                                  teacher_logit_map=logit_map(self.teacher.config))
                parts = losses.logit_losses(losses.final_hidden(self.student, batch),
                                            self.student.get_output_embeddings().weight, mask, targets,
                                            self.cfg.loss_chunk_tokens)
            # Batch means weighted back to sums: CE over the positions that have a next token, KD over all.
            ce += float(parts["ce"]) * batch.shape[0] * (batch.shape[1] - 1)
            kd_sum += float(parts.get("kd", 0.0)) * batch.shape[0] * batch.shape[1]
        self.student.train()
        rows, seq = self.val.shape
        out = {"val_loss": ce / (rows * (seq - 1))}
        if with_kd:
            out["val_kd"] = kd_sum / (rows * seq)
        return out

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _evaluate_and_log(self, final: bool) -> dict[str, Any]:
        record = {"step": self.step, "tokens": self.step * self.cfg.batch_size * self.cfg.grad_accum * self.seq_len,
                  **self.evaluate(kd=final)}
        self._log(record)
        if self.on_eval is not None:
            self.on_eval(record)
        return record

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None, progress: bool = True, save_model: bool = True) -> dict[str, Any]:
        """Train to the end (or only up to step `stop_after`, for tests of resuming); returns the result.

        `save_model=False` skips writing `model/` (search trials keep only their figures)."""
        if (self.out / "result.json").exists():
            return json.loads((self.out / "result.json").read_text())
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.cfg.seed)
        if self.load_checkpoint():
            log.info("resuming %s at step %d", self.out, self.step)
        for record in self._resume_log():  # its evaluations, to whoever follows them (a Tune trial's curve)
            if self.on_eval is not None:
                self.on_eval(record)
        self.student.train()
        tokens_per_step = self.cfg.batch_size * self.cfg.grad_accum * self.seq_len
        bar = tqdm(total=self.total, initial=self.step, disable=not progress or self.rank > 0, unit="step",
                   desc="distill")
        start, start_step, record = time.perf_counter(), self.step, {}
        while self.step < self.total and (stop_after is None or self.step < stop_after):
            parts_sum: dict[str, float] = {}
            for micro in range(self.cfg.grad_accum):
                parts = self.loss(sample_indices(self.step, micro, self.cfg, self.train_tokens.shape[0]))
                if not torch.isfinite(parts["loss"]):
                    raise TrainingError(f"non-finite loss {float(parts['loss'].detach())} at step {self.step}; the last good "
                                        f"checkpoint is kept in {self.checkpoint_dir}; lower --lr and resume")
                (parts["loss"] / self.cfg.grad_accum).backward()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach()) / self.cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.grad_clip)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step used
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            elapsed = time.perf_counter() - start
            record = {"step": self.step, "tokens": self.step * tokens_per_step,
                      **sharding.mean_across_workers(parts_sum), "grad_norm": _scalar(grad_norm), "lr": lr,
                      "tokens_per_s": (self.step - start_step) * tokens_per_step / max(elapsed, 1e-9)}
            self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.total:
                self._evaluate_and_log(final=False)
            periodic = self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and self.step < self.total
            if periodic or self.step == stop_after:  # none at the end: `finish` would delete it
                self.save_checkpoint()
                if self.on_checkpoint is not None and self.rank == 0:
                    self.on_checkpoint(self.out)
        bar.close()
        if self.step < self.total:
            return {"step": self.step, "finished": False}
        return self.finish(record, save_model, time.perf_counter() - start)

    def finish(self, last: dict[str, Any], save_model: bool, wall_s: float) -> dict[str, Any]:
        evaluation = self._evaluate_and_log(final=True)
        if save_model:
            with self._rank0_dir(self.out / "model") as tmp:
                sharding.save_hf_model(self.student, tmp, self.model_class)
        result = {"finished": True, "steps": self.step, **evaluation, "train_loss": last.get("loss"),
                  "intermediate_loss": self.intermediate, "tokens_per_s": last.get("tokens_per_s"), "wall_s": wall_s,
                  "workers": self.workers,
                  "param_optim_bytes_per_worker": sharding.local_bytes(self.trained, self.optimizer)}
        if self.rank == 0:
            write_json(self.out / "result.json", result)
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        sharding.barrier()
        return result

    @contextlib.contextmanager
    def _rank0_dir(self, path: Path) -> Iterator[Path | None]:
        """An atomic folder written by rank 0 (other ranks take part in gathering and get a scratch folder)."""
        if self.rank == 0:
            with atomic_dir(path) as tmp:
                yield tmp
        else:
            with tempfile.TemporaryDirectory() as tmp:
                yield Path(tmp)
        sharding.barrier()


def _trained_by(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide what a run trains: all but how often it evaluates and checkpoints."""
    return {k: v for k, v in config.items() if k not in ("eval_every", "checkpoint_every")}


def _scalar(value: Tensor) -> float:
    """A float from a plain or distributed (DTensor) scalar."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)
