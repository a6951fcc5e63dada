"""What a search needs, from its space file alone: memory per worker, workers, tokens, FLOPs and wall time of each
stage, and whether it fits a cluster (`nas plan`; `nas search` runs the same check before it starts).

Nothing here loads weights. Parameter counts come from the configs (memory counts every expert of a mixture of
experts, FLOPs and time only the active parameters a token uses); activation memory is measured, not guessed:
one decoder layer of each shape the child holds (its layer type, kind, and in a per-layer child its own KV heads
and MLP width, attention or MLP skipped) is built on the meta device and run on a micro-batch of the planned shape,
and the tensors autograd saves for backward are summed (the same count a real run's saved-tensor hooks give,
tested).
The rest follows from how `nas.distill` and `nas.sharding` hold a run (per worker, N workers):

    weights, grads       fp32, 4 + 4 B a student parameter, / N under FSDP2
    AdamW                8 B a student parameter, / N
    teacher              2 B a parameter in bf16 on GPU (4 B in fp32 on CPU), / N
    autocast copy        2 B a student parameter on one GPU worker (autocast caches bf16 weights)
    FSDP2 unsharded      on N > 1 workers: both models' embeddings and LM head, whole, and two layers of each
                         (the one computing and the one prefetched), plus the student's root gradient
    activations          saved tensors of every layer for the worker's micro-batch (with activation checkpointing:
                         each layer's input, plus one layer's saved tensors during its recompute)
    loss                 the chunked KD loss: fp32 grad of the LM head (V x D), of the final hidden states, and
                         three [chunk, V] fp32 tensors (logits, log-probabilities, their gradient)
    evaluation           between steps, no autograd: what stays (weights, AdamW, teacher) plus one layer's
                         temporaries for a whole batch_size and one loss chunk's logits; the peak is the largest of
                         training, evaluation and building the models
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from nas.architecture import PER_LAYER, Architecture
from nas.distill import DistillConfig, uses_intermediate
from nas.errors import ConfigError
from nas.families import Parent, family_of
from nas.space import SearchSpace, architecture_of, axes_of, enumerate_candidates, infeasible_hint

GIB = 2**30
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of one H100 SXM
# A checkpoint's write, assumed at 1 GB/s a worker (a local NVMe writes more, a busy shared file system less), is
# kept under 2% of the run.
CHECKPOINT_BYTES_PER_S = 1e9
CHECKPOINT_SHARE = 0.02
CPU_TFLOPS = 0.25  # a 2-core CPU in fp32: nas-bench measured ~100 KD tokens/s on SmolLM2-135M at about 40% of it


@dataclass(frozen=True)
class Cluster:
    """What the plan is checked against. `memory_gb`: of one GPU, or of one node for CPU-only stages."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    node_memory_gb: float = field(default_factory=lambda: os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB)
    tflops: float = H100_BF16_TFLOPS
    mfu: float = 0.4

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Stage:
    """One stage's needs. `memory` is bytes per worker (per GPU on GPUs), by part."""

    name: str
    workers: int
    gpus_per_worker: float
    device: str
    memory: dict[str, int]
    tokens: int
    flops: float
    runs: int = 1
    at_once: int = 1  # runs side by side (concurrent trials)
    hours: float = 0.0
    fits: bool = True
    fix: str = ""

    build: int = 0  # bytes a worker holds while it builds its model, before training (and sharding) starts
    evaluation: int = 0  # bytes a worker holds while it evaluates, between two steps

    @property
    def peak(self) -> int:
        return max(self.build, self.evaluation,
                   sum(v for k, v in self.memory.items() if k != "activations_checkpointed"))


def plan(space: SearchSpace, config: Any, cluster: Cluster = Cluster()) -> list[Stage]:
    """The stages of a search over `space` for a parent with `config`: importance, one short retrain (of the largest
    candidate, the worst case), one promoted full distillation."""
    uniform = space.per_layer is None or space.per_layer.uniform
    rows = enumerate_candidates(space, config) if uniform else []
    if not rows and uniform:
        raise ConfigError(f"{space.name}: {infeasible_hint(space, config)}")
    if space.per_layer is not None:  # its children are assembled later, no layer wider than the parent's: its bound
        rows = [axes_of(Parent.of(config), Parent.of(config).architecture)] * (space.per_layer.candidates + len(rows))
    # With its own count of each kind of layer, where the parent's layers differ in size by kind.
    child = Parent.of(config).child_config(architecture_of(rows[0], config))
    res = space.resources
    gpu = max(res.gpus_per_trial, res.gpus_per_worker) > 0
    trials = len(rows) if space.search.sampler == "grid" else min(len(rows), space.search.max_trials)

    def short(workers: int) -> Stage:
        gpus = retrain_gpus(res, workers, promoted=False)
        return retrain_stage("short_retrain", space, config, child, workers, gpus, gpu, space.short_retrain,
                             cached=bool(space.short_retrain.teacher_topk), runs=trials, at_once=res.max_concurrent)

    def full(workers: int) -> Stage:
        gpus = retrain_gpus(res, workers, promoted=True)
        return retrain_stage("full_distillation", space, config, child, workers, gpus, gpu, space.full_retrain,
                             cached=False, runs=space.promote)

    stages = [importance_stage(space, config), short(res.workers_per_trial), full(space.full_retrain.workers)]
    for stage, build in zip(stages, (None, short, full)):
        _check(stage, space, cluster, build)
    return stages


def retrain_gpus(res, workers: int, promoted: bool) -> float:
    """GPUs of each worker of a retrain (what the search asks Ray for): a trial in one process takes
    `gpus_per_trial`; a trial's several workers `gpus_per_worker` each, else `gpus_per_trial`; a promotion's
    workers, one or several, the larger of the two."""
    if promoted:
        return max(res.gpus_per_worker, res.gpus_per_trial)
    return (res.gpus_per_worker or res.gpus_per_trial) if workers > 1 else res.gpus_per_trial


def importance_stage(space: SearchSpace, config: Any) -> Stage:
    """The parent whole (spread over `resources.parent_gpus` GPUs): importance, the teacher cache, drop losses."""
    res = space.resources
    gpus = res.parent_gpus or max(res.gpus_per_trial, res.gpus_per_worker)
    on_gpu = gpus > 0
    nbytes = 2 if on_gpu else 4
    n = _params(config)
    batch = 8  # ImportanceSettings.batch_size, and the teacher cache's
    # Without autograd a forward holds one layer's temporaries at a time; the most is the MLP's: the residual
    # stream, the norm's output and the gate, up and gated products.
    layer = batch * space.seq_len * (2 * config.hidden_size + 3 * config.intermediate_size) * nbytes
    # Logits, in the model's dtype plus fp32 log-probabilities and their top-K or loss: the teacher cache takes
    # 1024 tokens at a time, the drop losses whole sequences, as many as keep logits under 2^28 elements.
    rows = max(1, min(batch, 2**28 // (space.seq_len * config.vocab_size)))
    logits = max(1024, rows * space.seq_len) * config.vocab_size * (nbytes + 4 + 4)
    share = max(1, math.ceil(gpus)) if on_gpu else 1
    memory = {"weights": n * nbytes // share, "activations": layer, "logits": logits}
    imp = space.importance
    passes = imp.samples + imp.drop_samples * (1 + config.num_hidden_layers * (1 + len(block_sizes(space, config))))
    topk_tokens = space.short_retrain.tokens if space.short_retrain.teacher_topk else 0
    tokens = passes * space.seq_len + topk_tokens
    return Stage("importance", 1, gpus, "cuda" if on_gpu else "cpu", memory, tokens,
                 tokens * forward_flops_per_token(config, space.seq_len))


def retrain_stage(name: str, space: SearchSpace, parent: Any, child: Any, workers: int, gpus_per_worker: float,
                  gpu: bool, spec, cached: bool, runs: int, at_once: int = 1) -> Stage:
    """One KD run of `child` from `parent` on `workers` workers (FSDP2 when more than one)."""
    n_teacher = _params(parent)
    layers = child.num_hidden_layers
    intermediate = uses_intermediate(DistillConfig(), layers, parent.num_hidden_layers)
    # Trained: the student, and the projection of its states when the intermediate-state loss needs one.
    projection = child.hidden_size * parent.hidden_size if intermediate and child.hidden_size != parent.hidden_size \
        else 0
    n_student = _params(child) + projection
    compute = torch.bfloat16 if gpu else torch.float32
    teacher_bytes = 2 if gpu else 4
    micro = spec.batch_size // workers  # each worker's share of a micro-batch
    t = micro * space.seq_len
    # Each layer's shape's largest kind's (sliding or full attention, dense or mixture-of-experts: which layers of one
    # size a uniform child keeps is importance's choice); a per-layer child's layers differ in shape.
    per_layer = layer_saved_bytes(child, micro, space.seq_len, compute)
    act_size = torch.finfo(compute).bits // 8
    outside = t * child.hidden_size * act_size * 3  # embedding output, final norm's input and output
    chunk = min(t, 1024)  # DistillConfig.loss_chunk_tokens
    memory = {
        "weights": n_student * 4 // workers,
        "grads": n_student * 4 // workers,
        "optimizer": n_student * 8 // workers,
        # Held even with a top-K cache: the trial prunes its child from it (and keeps it for the next trial).
        "teacher": n_teacher * teacher_bytes // workers,
        "compute_copy": n_student * 2 if gpu and workers == 1 else 0,
        "fsdp_unsharded": 0 if workers == 1 else _fsdp_unsharded(child, parent, act_size, teacher_bytes),
        "activations": sum(per_layer) + outside,
        "activations_checkpointed": layers * t * child.hidden_size * act_size + max(per_layer) + outside,
        "loss": 4 * child.vocab_size * child.hidden_size + 4 * t * child.hidden_size + 3 * 4 * chunk * child.vocab_size,
        "teacher_states": 0 if cached else t * parent.hidden_size * 4,
        # Every layer's normed states for the intermediate-state loss, the student's kept for backward.
        "intermediate_states": (layers + 1) * t * (2 * child.hidden_size * act_size + parent.hidden_size * 4)
        if intermediate else 0,
    }
    if spec.grad_checkpointing:
        memory["activations"], memory["activations_checkpointed"] = memory["activations_checkpointed"], \
            memory["activations"]
    per_token = 3 * forward_flops_per_token(child, space.seq_len) + \
        (0 if cached else forward_flops_per_token(parent, space.seq_len))
    # Each worker loads the whole parent and prunes the whole child from it, then shards both.
    build = n_teacher * teacher_bytes + n_student * 4
    # Evaluation, between steps (gradients freed): every worker runs the whole validation set in batches of
    # batch_size without autograd, so besides what stays (weights, AdamW, the teacher) it holds one layer's
    # temporaries and one loss chunk's student and teacher logits at a time.
    val_tokens = spec.batch_size * space.seq_len
    held = sum(memory[k] for k in ("weights", "optimizer", "teacher", "compute_copy", "fsdp_unsharded"))
    widest = max(shape.intermediate_size for shape in _counted(child).architecture.layer_shapes)
    evaluation = held + val_tokens * (2 * child.hidden_size + 3 * widest) * act_size + \
        3 * 4 * min(val_tokens, 1024) * child.vocab_size
    return Stage(name, workers, gpus_per_worker, "cuda" if gpu else "cpu", memory, spec.tokens, spec.tokens * per_token,
                 runs, at_once, build=build, evaluation=evaluation)


def _memory_problem(stage: Stage, cluster: Cluster) -> str:
    """Why a stage's memory does not fit (empty when it does)."""
    if stage.device == "cpu":  # CPU workers (and concurrent trials) share one node's memory
        need, limit, where = stage.peak * stage.workers * stage.at_once, cluster.node_memory_gb, "of node memory"
    else:
        sharing = max(1, math.ceil(1 / stage.gpus_per_worker)) if stage.gpus_per_worker > 0 else 1
        need, limit, where = stage.peak * sharing, cluster.gpu_memory_gb, "a GPU"
    return "" if need <= limit * GIB else f"{need / GIB:.1f} GiB > {limit:.0f} GiB {where}"


def _check(stage: Stage, space: SearchSpace, cluster: Cluster, build) -> None:
    """Fill in the stage's wall time, and whether it fits, with the fix when it does not (`build(workers)` rebuilds
    a retrain stage with another worker count)."""
    gpus = stage.workers * max(stage.gpus_per_worker, 1) if stage.device == "cuda" else 0
    throughput = (gpus * cluster.tflops if gpus else CPU_TFLOPS) * 1e12 * cluster.mfu
    stage.hours = stage.flops / throughput / 3600
    problem = _memory_problem(stage, cluster)
    if not problem and gpus > cluster.gpus:
        stage.fits, stage.fix = False, f"{stage.name} takes {gpus} GPUs and the cluster has {cluster.gpus}: add " \
                                       f"nodes or give it fewer workers"
        return
    stage.fits = not problem
    if stage.fits:
        return
    if build is None:  # the parent whole
        if stage.device == "cpu":
            stage.fix = f"importance holds the whole parent ({problem}): give it GPUs with resources.parent_gpus"
        else:
            other = stage.peak - stage.memory["weights"]
            weights = stage.memory["weights"] * max(1, math.ceil(stage.gpus_per_worker))
            room = cluster.gpu_memory_gb * GIB - other  # what a GPU has left for its share of the weights
            stage.fix = f"set resources.parent_gpus >= {math.ceil(weights / room)} (importance: {problem})" \
                if room > 0 else f"importance: {problem} before any weights; lower seq_len"
        return
    if stage.build == stage.peak:  # no worker count or checkpointing helps: sharding starts after the build
        stage.fix = f"{stage.name}: each worker builds the whole teacher and child before sharding them " \
                    f"({stage.build / GIB:.1f} GiB): it needs GPUs with more memory ({problem})"
        return
    section = "short_retrain" if stage.name == "short_retrain" else "full_retrain"
    field_name = "resources.workers_per_trial" if section == "short_retrain" else "full_retrain.workers"
    spec = getattr(space, section)
    for workers in range(stage.workers + 1, spec.batch_size + 1):
        if spec.batch_size % workers == 0 and not _memory_problem(build(workers), cluster):
            stage.fix = f"set {field_name} >= {workers} ({stage.name}: {problem} on {stage.workers})"
            return
    if not spec.grad_checkpointing:
        stage.fix = f"set {section}.grad_checkpointing: true or lower {section}.batch_size ({stage.name}: {problem})"
    else:
        stage.fix = f"raise {section}.batch_size so that more workers can split it, or lower seq_len " \
                    f"({stage.name}: {problem} at any worker count that divides batch_size={spec.batch_size})"


def checkpoint_tokens(stage: Stage, spec, seq_len: int) -> int:
    """Training tokens between a retrain's checkpoints such that writing one (a worker's fp32 weights and AdamW
    state, at CHECKPOINT_BYTES_PER_S) takes under CHECKPOINT_SHARE of the training time in between."""
    step_tokens = spec.batch_size * spec.grad_accum * seq_len
    step_s = stage.hours * 3600 / max(1, spec.tokens // step_tokens)
    write_s = (stage.memory["weights"] + stage.memory["optimizer"]) / CHECKPOINT_BYTES_PER_S
    return math.ceil(write_s / (CHECKPOINT_SHARE * step_s)) * step_tokens


def check_fits(space: SearchSpace, config: Any, cluster: Cluster) -> list[Stage]:
    """The plan, or a ConfigError naming the first stage that does not fit and its fix."""
    stages = plan(space, config, cluster)
    for stage in stages:
        if not stage.fits:
            raise ConfigError(f"{space.name}: does not fit: {stage.fix} (see `nas plan`)")
    return stages


# -- what the numbers come from -----------------------------------------------------------------------------
def _counted(config: Any) -> Parent:
    """The model of `config` to count by: a parent, or a child, per-layer or not (which `Parent.of` refuses, being
    no parent to prune)."""
    family = family_of(config)
    return Parent(config, family, Architecture.of_config(config, family.unit_keys))


def _params(config: Any) -> int:
    return _counted(config).num_parameters()


def _fsdp_unsharded(child: Any, parent: Any, act_size: int, teacher_bytes: int) -> int:
    """What FSDP2 holds whole on each worker: both models' root units (embeddings, LM head) for the whole step,
    the student's root gradient before its reduce-scatter, and two decoder layers of each model at a time (the one
    computing and the one prefetched)."""
    def root(config: Any) -> int:
        return config.vocab_size * config.hidden_size * (1 if getattr(config, "tie_word_embeddings", False) else 2)

    return root(child) * (act_size + 4) + root(parent) * teacher_bytes + \
        2 * (_layer_params(child) * act_size + _layer_params(parent) * teacher_bytes)


def _layer_params(config: Any) -> int:
    """Parameters of the largest decoder layer of `config` (a mixture of experts can keep dense layers, a per-layer
    child's layers differ)."""
    parent = _counted(config)
    arch = parent.architecture
    return max(parent.family.layer_parameters(config, arch, i, shape=arch.layer_shape(i))
               for i in range(config.num_hidden_layers))


def block_sizes(space: SearchSpace, config: Any) -> tuple[int, ...]:
    """The sizes of the contiguous layer blocks importance scores (`importance.layer_method: block`)."""
    if space.importance.layer_method != "block":
        return ()
    return tuple(sorted({config.num_hidden_layers - n for n in space.axes.num_hidden_layers} - {0}))


def forward_flops_per_token(config: Any, seq_len: int) -> float:
    """2 x the parameters a token multiplies (all but the embedding lookup; in a mixture of experts only the experts
    it is routed to), plus 4 x heads x head_dim per key a token attends in each attention layer (QK^T and AV, 2
    FLOPs a MAC; a per-layer child's attention-free layers attend none), averaged over the sequence. A hybrid's
    recurrent layers add no term that grows with the sequence; their scans' own FLOPs (per token, a multiple of the
    state size and the scan's chunk) are left out."""
    parent = _counted(config)
    n = parent.active_parameters() - \
        config.vocab_size * config.hidden_size * (0 if getattr(config, "tie_word_embeddings", False) else 1)
    keys = sum(_keys_attended(seq_len, _window(config, i)) for i in range(config.num_hidden_layers)
               if parent.family.is_attention(config, i) and parent.architecture.layer_shape(i).attention)
    return 2 * n + 4 * parent.architecture.num_attention_heads * parent.architecture.head_dim * keys


def _window(config: Any, layer: int) -> int | None:
    """The sliding window of the attention layer `layer` (None: full attention), as HF's masks read the config: a
    "sliding_attention" entry of `layer_types`, or, without them, a `sliding_window` on every layer (Mistral)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return config.sliding_window if types[layer] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def _keys_attended(seq_len: int, window: int | None) -> float:
    """The keys a token attends on average over a causal sequence: min(position + 1, window) at each position."""
    span = min(window or seq_len, seq_len)
    return (span * (span + 1) / 2 + (seq_len - span) * span) / seq_len


_TRACE_ATTENTION = "nas_plan_fused"  # (a name with "flash" in it makes transformers look for a kernel)


def one_layer_config(config: Any, layer: int = 0) -> Any:
    """A config of one decoder layer built as `config`'s layer `layer`: its layer type, a hybrid's kind and, in a
    mixture of experts, dense or sparse; in a per-layer config, that layer's own widths and skipped blocks."""
    parent = _counted(config)
    data = parent.family.layers_data(config, (layer,))
    overrides = parent.architecture.layer_shape(layer).overrides(parent.architecture.uniform_shape)
    data[PER_LAYER] = {"0": overrides} if overrides else None  # (the whole config's table names other layers)
    return config.__class__.from_dict(data)


def layer_kinds(config: Any) -> list[int]:
    """The first layer of each kind of decoder layer in `config` (its layer type or a hybrid's kind, dense or
    sparse, and in a per-layer config its shape)."""
    parent, seen = _counted(config), {}
    for i in range(config.num_hidden_layers):
        kind = ((getattr(config, "layer_types", None) or [None] * (i + 1))[i], *parent.family.kind_size(config, i),
                parent.architecture.layer_shape(i))
        seen.setdefault(kind, i)
    return list(seen.values())


def layer_saved_bytes(config: Any, batch: int, seq_len: int, dtype: torch.dtype) -> list[int]:
    """What autograd saves in each decoder layer of `config` (`saved_bytes_per_layer`), each distinct layer traced
    once: every layer counts the largest kind (`layer_kinds`) of its shape."""
    shapes = _counted(config).architecture.layer_shapes
    traced = {i: saved_bytes_per_layer(config, batch, seq_len, dtype, i) for i in layer_kinds(config)}
    worst = {shape: max(v for i, v in traced.items() if shapes[i] == shape) for shape in set(shapes)}
    return [worst[shape] for shape in shapes]


def saved_bytes_per_layer(config: Any, batch: int, seq_len: int, dtype: torch.dtype, layer: int = 0) -> int:
    """Bytes autograd saves for backward in the decoder layer `layer` of `config` on a [batch, seq_len] micro-batch,
    counted on the meta device (no memory, no compute), on the model nas's loader builds (a per-layer layer at its
    own widths). Attention is traced as the fused flash kernel both the CPU and CUDA paths take (it keeps q, k, v,
    the output and the log-sum-exp; no seq_len^2 scores)."""
    from nas.loader import build

    _register_trace_attention()
    one = one_layer_config(config, layer)
    with torch.device("meta"):
        # Where SDPA cannot run the family's attention (Gemma 2's logit softcap), transformers refuses it when asked
        # and runs eager attention, which keeps the seq_len^2 scores: trace what a real run takes.
        try:
            build(one, dtype=dtype, attn_implementation="sdpa")
            model = build(one, dtype=dtype, attn_implementation=_TRACE_ATTENTION)
        except ValueError:
            model = build(one, dtype=dtype, attn_implementation="eager")
    model.train()
    decoder = model.model
    x = torch.empty(batch, seq_len, config.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    positions = torch.arange(seq_len, device="meta")[None].expand(batch, seq_len)
    rotary = rotary_embeddings(decoder, x, positions)
    with _grouped_mm_on_meta():
        return saved_bytes(model, lambda: decoder.layers[0](x, attention_mask=None, position_ids=positions, **rotary))


class _grouped_mm_on_meta(torch.overrides.TorchFunctionMode):
    """A mixture of experts runs its experts as grouped matrix products over the (token, expert) pairs sorted by
    expert (transformers' default `grouped_mm` experts, through torch's `grouped_mm`), whose meta kernel accepts
    bf16 only. Within this mode, one expert's product of the same shapes stands in and saves what grouped_mm saves
    (its input, the weights, which are parameters and not counted, and the group offsets). Routing is
    data-dependent, but the pairs' count (tokens x top-k) is not. A torch function mode holds in the thread that
    enters it only: a model running in another thread meanwhile computes its real products."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.nn.functional.grouped_mm, torch._grouped_mm):
            input, weight = args
            return _GroupedMatmulShapes.apply(input.to(weight.dtype), weight, kwargs["offs"])
        return func(*args, **kwargs)


class _GroupedMatmulShapes(torch.autograd.Function):
    """[S, in] x [E, in, out] -> [S, out], saving what `torch.nn.functional.grouped_mm` saves (trace only)."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(input, weight, offs)
        return input @ weight[0]

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("traced for its saved tensors only")


def rotary_embeddings(decoder: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
    """The keyword a decoder's first layer takes its rotary (cos, sin) as: Gemma 3 keeps one rotary base per layer
    type; Nemotron-H has no rotary embedding (none)."""
    if not hasattr(decoder, "rotary_emb"):
        return {}
    if "layer_type" in inspect.signature(decoder.rotary_emb.forward).parameters:
        return {"position_embeddings": decoder.rotary_emb(x, positions, decoder.config.layer_types[0])}
    return {"position_embeddings": decoder.rotary_emb(x, positions)}


def saved_bytes(model: torch.nn.Module, run) -> int:
    """Bytes of the distinct storages autograd saves while `run()` runs, not counting `model`'s parameters."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    # Storages are told apart by address, so each one seen is held until the end: a saved tensor freed mid-run (its
    # branch of the graph unused) would otherwise free an address a later storage can take, which then goes
    # uncounted (a real CPU run and a meta trace reuse addresses differently).
    seen: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(s.nbytes() for s in seen.values())


def _register_trace_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_TRACE_ATTENTION, _flash_attention)


def _flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The fused flash kernel with grouped keys (as SDPA runs it on CPU and CUDA), callable on meta tensors."""
    out, _lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, is_causal=True,
                                                                           scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# -- output --------------------------------------------------------------------------------------------------
def to_dict(stages: list[Stage]) -> list[dict[str, Any]]:
    return [{**asdict(s), "peak": s.peak} for s in stages]


def table(stages: list[Stage], cluster: Cluster) -> str:
    """The plan as text: one block per stage."""
    lines = []
    for s in stages:
        where = f"{s.workers} worker{'s' if s.workers > 1 else ''}" + \
            (f" x {s.gpus_per_worker:g} GPU" if s.device == "cuda" else " (CPU)")
        lines.append(f"{s.name}: {where}, {s.runs} run{'s' if s.runs != 1 else ''} of {s.tokens:,} tokens, "
                     f"{s.flops:.3g} FLOPs each, ~{_duration(s.hours)} each at {cluster.mfu:.0%} MFU")
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in s.memory.items() if v)
        lines.append(f"  per worker (GiB): {parts}")
        verdict = "fits" if s.fits else f"DOES NOT FIT: {s.fix}"
        limit = cluster.gpu_memory_gb if s.device == "cuda" else cluster.node_memory_gb
        building = f" (building the model: {s.build / GIB:.2f})" if s.build else ""
        lines.append(f"  peak {s.peak / GIB:.2f} GiB a worker{building}, of {limit:.0f} GiB: {verdict}")
    return "\n".join(lines)


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"
