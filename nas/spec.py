"""The search-space file's fields: one typed dataclass a section, with what each field means and its default
(`nas.space` reads a file into them, checks their values and enumerates its candidates)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

AXES = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size")
#: A mixture of experts' axes (`nas.blocks.MoE`), named as its config names them; `num_experts` and
#: `num_local_experts` are two families' names of one axis, the experts kept per layer.
EXPERT_AXES = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
               "shared_expert_intermediate_size")
#: A hybrid's recurrent mixer's axes (`nas.blocks.Mamba2`, `nas.blocks.GatedDeltaNet`), as its config names them.
RECURRENT_AXES = ("mamba_num_heads", "mamba_head_dim", "mamba_n_heads", "mamba_d_head", "linear_num_value_heads",
                  "linear_num_key_heads")
UNIT_AXES = (*EXPERT_AXES, *RECURRENT_AXES)
BUDGET_KINDS = ("total", "non_embedding", "active")
#: What a search can optimise beside the validation loss (a candidate's figure), and in which direction.
OBJECTIVES = {"latency_ms": "minimize", "prefill_ms": "minimize", "throughput": "maximize",
              "memory_bytes": "minimize", "params": "minimize", "active_params": "minimize"}
MEASURED = ("latency_ms", "prefill_ms", "throughput")  # what needs the candidates timed (`nas.latency`)


@dataclass(frozen=True)
class Budget:
    """Target size. `params` (absolute) or `fraction` (of the parent's count); candidates within ±tolerance.

    `kind` is "total", "non_embedding" (ignores embedding and LM-head matrices) or "active" (the parameters one
    token uses: in a mixture of experts, all but the experts it is not routed to).
    `max_weight_gb` caps the weights' memory at `bytes_per_param` (2 for bf16); `memory_gb` caps what serving the
    child holds: its weights plus the KV cache of `batch` sequences of `context` tokens at `cache_bytes` an element
    (`nas.families.Parent.cache_bytes`).

    `latency_ms` (per decoded token at `batch` after a prefill of `context`), `prefill_ms` (caps) and `throughput`
    (decoded tokens a second over the batch, a floor) are measured on `device` ("cpu" or "cuda"; a GPU type is the
    Ray resource label `device_resource`, e.g. "accelerator_type:L4") in `serve_dtype` (default bf16 on CUDA,
    fp32 on the CPU), `repeats` runs after `warmup` ones timing `decode_tokens` tokens (`nas.latency`), in
    `engine`: "hf" (transformers' generate), "vllm" or "llama.cpp" (the model exported and run in that engine,
    `nas.engine_latency`).

    A parameter band (`params` or `fraction`) is optional when a memory or speed cap is given; every budget given
    is enforced.
    """

    params: float | None = None
    fraction: float | None = None
    tolerance: float = 0.05
    kind: str = "total"
    max_weight_gb: float | None = None
    bytes_per_param: int = 2
    memory_gb: float | None = None
    context: int = 4096
    batch: int = 1
    cache_bytes: int = 2
    latency_ms: float | None = None
    prefill_ms: float | None = None
    throughput: float | None = None
    device: str = "cpu"
    device_resource: str | None = None
    serve_dtype: str | None = None
    decode_tokens: int = 16
    warmup: int = 1
    repeats: int = 5
    engine: str = "hf"

    @property
    def speed_caps(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("latency_ms", "prefill_ms", "throughput") if getattr(self, k) is not None}


@dataclass(frozen=True)
class Axes:
    """Values to search. `mlp_expansion` (multiples of hidden_size) may replace `intermediate_size`.
    An axis left empty keeps the parent's value. A mixture of experts adds `EXPERT_AXES`: the experts kept per
    layer (`num_experts` or `num_local_experts`, either name), experts per token, the expert width
    (`moe_intermediate_size`; Mixtral, OLMoE and gpt-oss call it `intermediate_size`) and the shared expert's.
    A hybrid adds `RECURRENT_AXES`: Mamba2's heads (a multiple of its groups) and head width (Nemotron-H's
    `mamba_num_heads`/`mamba_head_dim`, Bamba's and Falcon-H1's `mamba_n_heads`/`mamba_d_head`), or Gated
    DeltaNet's value and key heads. Where a parent's layers differ in size (a hybrid's kinds, or a mixture of experts' dense
    and sparse layers) its depth is `kept_layers`, the layers kept of each kind (`nas arch --parent` lists them,
    e.g. {full_attention: [4], linear_attention: [20, 24]}; a kind left out keeps all its layers); each kind keeps
    its own best layers by importance."""

    num_hidden_layers: list[int] = field(default_factory=list)
    num_attention_heads: list[int] = field(default_factory=list)
    num_key_value_heads: list[int] = field(default_factory=list)
    intermediate_size: list[int] = field(default_factory=list)
    mlp_expansion: list[float] = field(default_factory=list)
    hidden_size: list[int] = field(default_factory=list)
    num_experts: list[int] = field(default_factory=list)
    num_local_experts: list[int] = field(default_factory=list)
    num_experts_per_tok: list[int] = field(default_factory=list)
    moe_intermediate_size: list[int] = field(default_factory=list)
    shared_expert_intermediate_size: list[int] = field(default_factory=list)
    mamba_num_heads: list[int] = field(default_factory=list)
    mamba_head_dim: list[int] = field(default_factory=list)
    mamba_n_heads: list[int] = field(default_factory=list)
    mamba_d_head: list[int] = field(default_factory=list)
    linear_num_value_heads: list[int] = field(default_factory=list)
    linear_num_key_heads: list[int] = field(default_factory=list)
    kept_layers: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ImportanceSpec:
    """The calibration pass (paper §2.2). `sampling`: "random" draws the `samples` calibration sequences from the
    whole corpus with `search.seed`; "first" takes its first ones (the corpus order)."""

    samples: int = 64
    sampling: str = "random"
    seq_agg: str = "mean"
    batch_agg: str = "l2"
    neuron_source: str = "pre"
    head_source: str = "output"
    drop_samples: int = 0
    layer_method: str = "bi"


@dataclass(frozen=True)
class RetrainSpec:
    """A distillation budget (short retrain per trial, or full for promoted candidates). `workers`: Ray Train
    workers of one promoted candidate's full distillation (a trial's come from `resources.workers_per_trial`).
    `grad_checkpointing`: recompute each layer's activations in backward instead of keeping them.
    `checkpoint_tokens`: training tokens between DCP checkpoints in the run folder, from which a retried trial, a
    restarted worker or a re-run search resumes; unset, `nas plan` sizes it so that writing one costs under 2% of
    the run's time."""

    tokens: int = 4096
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 2
    reports: int = 4
    teacher_topk: int = 0
    workers: int = 1
    grad_checkpointing: bool = False
    checkpoint_tokens: int | None = None


@dataclass(frozen=True)
class SearchSpec:
    """How trials are chosen and run. `sampler`: "grid" (every feasible candidate, the paper's choice),
    "tpe" (Optuna TPE for `max_trials`), "nsga2" (Optuna NSGA-II, for several objectives) or "auto" (grid up to
    `max_trials` candidates, else TPE).

    `objectives`: `val_loss` first, then any of `OBJECTIVES` (e.g. `[val_loss, latency_ms]`): with more than one
    the study is multi-objective (one Optuna direction each, named in the dashboard) and its result is a Pareto
    front. `promotion` picks what is fully distilled: "loss" (the `promote` lowest losses) or "front" (`promote`
    points spread along the front of loss against the second objective)."""

    sampler: str = "auto"
    max_trials: int = 32
    asha: bool = False
    retries: int = 1
    seed: int = 0
    objectives: list[str] = field(default_factory=lambda: ["val_loss"])
    promotion: str = "loss"

    @property
    def directions(self) -> list[str]:
        return ["minimize", *(OBJECTIVES[k] for k in self.objectives[1:])]


@dataclass(frozen=True)
class Resources:
    """What a trial takes. One worker (the default) trains in the Tune trial's own process with `cpus_per_trial`
    CPUs and `gpus_per_trial` GPUs; with `workers_per_trial > 1` the trial runs a Ray Train job of that many
    FSDP2 workers, each with `cpus_per_trial` CPUs and `gpus_per_worker` GPUs (promotion: `full_retrain.workers`).
    `cache_workers`: Ray tasks that write the teacher's top-K cache in parallel, each with its own parent.
    `parent_gpus`: GPUs of each task that holds the whole parent (importance, the cache; default: a trial's); the
    parent is spread over them in bf16 (accelerate's `device_map="auto"`).
    `gpu_memory_gb`: memory of one of the cluster's GPUs, for the check that a search fits before it starts."""

    cpus_per_trial: int = 1
    gpus_per_trial: float = 0
    max_concurrent: int = 1
    workers_per_trial: int = 1
    gpus_per_worker: float = 0
    cache_workers: int = 1
    parent_gpus: float = 0
    gpu_memory_gb: float = 80


@dataclass(frozen=True)
class PerLayerSpec:
    """A search over per-layer children (`nas.block_scores`, `nas.assembly`, docs/per-layer-search.md): each layer
    of the parent keeps its attention with its own KV heads (the parent's, or one of `kv_heads`; none where
    `skip_attention`) and its MLP at its own width (the parent's, one of `mlp_widths`; none where `skip_mlp`).
    Each such block variant is scored once on `samples` of the calibration sequences (default: all of
    `importance.samples`), and a program picks the `candidates` best children under the budget, each at least
    `min_distance` blocks away from the others; those are the trials. Query heads, head width, hidden size and
    depth stay the parent's. `uniform`: the axes' uniform candidates are trials too, to compare against."""

    kv_heads: list[int] = field(default_factory=list)
    mlp_widths: list[int] = field(default_factory=list)
    skip_attention: bool = False
    skip_mlp: bool = False
    candidates: int = 4
    min_distance: int = 2
    uniform: bool = False
    samples: int | None = None
    batch_size: int = 4


@dataclass(frozen=True)
class SearchSpace:
    name: str
    parent: str
    budget: Budget
    axes: Axes
    data: str = "shakespeare"
    text_field: str = "text"
    seq_len: int = 128
    val_fraction: float = 0.05
    val_sequences: int = 16
    parent_config: dict[str, Any] | None = None
    importance: ImportanceSpec = field(default_factory=ImportanceSpec)
    short_retrain: RetrainSpec = field(default_factory=RetrainSpec)
    promote: int = 1
    full_retrain: RetrainSpec = field(default_factory=lambda: RetrainSpec(tokens=16384))
    search: SearchSpec = field(default_factory=SearchSpec)
    resources: Resources = field(default_factory=Resources)
    storage: str | None = None
    study_name: str | None = None
    per_layer: PerLayerSpec | None = None

    @property
    def study(self) -> str:
        return self.study_name or self.name
