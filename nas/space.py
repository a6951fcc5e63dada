"""Search spaces: a YAML file of values, validated against typed dataclasses, and its feasible candidates.

A candidate is named by its label (`Architecture.short()` form, e.g. "L30-H6-KV3-M1024-E576"); the kept layers
are chosen from importance scores when the candidate is pruned, so enumeration needs only the parent's config.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from nas.architecture import Architecture, axis_keys, short_label
from nas.errors import ArchitectureError, ConfigError
from nas.architecture import KIND_AXIS
from nas.families import Parent, family_of
from nas.importance import AGGREGATIONS, HEAD_SOURCES, LAYER_METHODS, NEURON_SOURCES, select_layers

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
    fp32 on the CPU), `repeats` runs after `warmup` ones timing `decode_tokens` tokens (`nas.latency`).

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

    @property
    def study(self) -> str:
        return self.study_name or self.name


_SECTIONS = {"budget": Budget, "axes": Axes, "importance": ImportanceSpec, "short_retrain": RetrainSpec,
             "full_retrain": RetrainSpec, "search": SearchSpec, "resources": Resources}
_REQUIRED = ("name", "parent", "budget", "axes")


def _build(cls, data: Any, where: str, errors: list[str]):
    if not isinstance(data, dict):
        errors.append(f"{where}: must be a mapping, got {data!r}")
        return None
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            errors.append(f"{where}.{key}: unknown field; known: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, f.type, f"{where}.{k}", errors) for f in fields(cls) for k, v in data.items()
              if k == f.name}
    try:
        return cls(**kwargs)
    except TypeError as e:
        errors.append(f"{where}: {e}")
        return None


def _coerce(value: Any, hint: str, where: str, errors: list[str]) -> Any:
    """Numbers for numeric fields: PyYAML reads `8.18e9` (no sign in the exponent) as a string."""
    numeric = hint.split(" | ")[0] in ("int", "float")
    if numeric and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            errors.append(f"{where}={value!r}: must be a number")
            return None
        return int(number) if hint.startswith("int") and number.is_integer() else number
    if numeric and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        errors.append(f"{where}={value!r}: must be a number")
        return None
    return value


def _check(space: SearchSpace, errors: list[str]) -> None:
    def need(cond: bool, message: str) -> None:
        if not cond:
            errors.append(message)

    b = space.budget
    need(b.params is None or b.fraction is None, "budget: give params or fraction, not both")
    need(b.params is not None or b.fraction is not None or b.memory_gb is not None or b.max_weight_gb is not None
         or bool(b.speed_caps), "budget: give params or fraction (a parameter band), a memory cap (memory_gb, "
                                "max_weight_gb) or a speed cap (latency_ms, prefill_ms, throughput)")
    for key, value in b.speed_caps.items():
        need(value > 0, f"budget.{key}={value}: must be > 0")
    need(b.device in ("cpu", "cuda"), f"budget.device={b.device!r}: must be 'cpu' or 'cuda'")
    need(b.serve_dtype is None or b.serve_dtype in ("float32", "bfloat16", "float16"),
         f"budget.serve_dtype={b.serve_dtype!r}: must be 'float32', 'bfloat16' or 'float16'")
    need(b.decode_tokens >= 1 and b.repeats >= 1 and b.warmup >= 1,
         "budget: decode_tokens, repeats and warmup must be >= 1 (the first run compiles and allocates)")
    need(b.memory_gb is None or b.memory_gb > 0, f"budget.memory_gb={b.memory_gb}: must be > 0")
    need(b.context >= 1 and b.batch >= 1, f"budget.context={b.context}, budget.batch={b.batch}: must be >= 1")
    need(b.params is None or b.params > 0, f"budget.params={b.params}: must be > 0")
    need(b.fraction is None or 0 < b.fraction < 1, f"budget.fraction={b.fraction}: must be in (0, 1)")
    need(0 <= b.tolerance < 1, f"budget.tolerance={b.tolerance}: must be in [0, 1)")
    need(b.kind in BUDGET_KINDS, f"budget.kind={b.kind!r}: must be one of {', '.join(map(repr, BUDGET_KINDS))}")
    a = space.axes
    for name in (*AXES, *UNIT_AXES, "mlp_expansion"):
        values = getattr(a, name)
        need(isinstance(values, list) and all(isinstance(v, (int, float)) and v > 0 for v in values),
             f"axes.{name}={values!r}: must be a list of positive numbers")
    need(not (a.intermediate_size and a.mlp_expansion), "axes: give intermediate_size or mlp_expansion, not both")
    need(not (a.num_experts and a.num_local_experts), "axes: num_experts and num_local_experts name one axis (the "
                                                      "experts kept per layer); give one")
    need(all(float(v).is_integer() for name in (*AXES, *UNIT_AXES) for v in getattr(a, name)
             if isinstance(v, (int, float))),
         "axes: layer, head and width values must be integers")
    need(isinstance(a.kept_layers, dict) and all(
        isinstance(v, list) and v and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v)
        for v in a.kept_layers.values()),
        f"axes.kept_layers={a.kept_layers!r}: must map each layer kind to a list of layer counts (integers >= 0)")
    need(not (a.kept_layers and a.num_hidden_layers), "axes: give num_hidden_layers or kept_layers (the layers of "
                                                      "each kind, which add up to the depth), not both")
    need(not (a.kept_layers and space.importance.layer_method == "block"),
         "importance.layer_method='block' drops one contiguous block of layers, which cannot keep a number of each "
         "kind (axes.kept_layers); use 'bi' or 'drop'")
    imp = space.importance
    need(imp.samples >= 1, f"importance.samples={imp.samples}: must be >= 1")
    for key, allowed in (("sampling", ("random", "first")), ("seq_agg", AGGREGATIONS), ("batch_agg", AGGREGATIONS),
                         ("neuron_source", NEURON_SOURCES), ("head_source", HEAD_SOURCES),
                         ("layer_method", LAYER_METHODS)):
        need(getattr(imp, key) in allowed, f"importance.{key}={getattr(imp, key)!r}: must be one of "
                                           f"{', '.join(map(repr, allowed))}")
    need(imp.layer_method == "bi" or imp.drop_samples > 0,
         f"importance.layer_method={imp.layer_method!r} needs importance.drop_samples > 0")
    for section in ("short_retrain", "full_retrain"):
        r = getattr(space, section)
        need(r.tokens >= 1 and r.batch_size >= 1, f"{section}: tokens and batch_size must be >= 1")
        need(r.tokens >= r.batch_size * r.grad_accum * space.seq_len,
             f"{section}.tokens={r.tokens}: below one step of batch_size*grad_accum*seq_len="
             f"{r.batch_size * r.grad_accum * space.seq_len}")
        need(r.reports >= 1, f"{section}.reports={r.reports}: must be >= 1")
        need(r.checkpoint_tokens is None or r.checkpoint_tokens >= 1,
             f"{section}.checkpoint_tokens={r.checkpoint_tokens}: must be >= 1 (or left out: sized by `nas plan`)")
        workers = space.resources.workers_per_trial if section == "short_retrain" else r.workers
        need(workers < 1 or r.batch_size % workers == 0,
             f"{section}.batch_size={r.batch_size}: must be a multiple of the {workers} workers that split it")
    need(space.short_retrain.workers == 1, "short_retrain.workers: a trial's workers are resources.workers_per_trial")
    need(space.full_retrain.workers >= 1, f"full_retrain.workers={space.full_retrain.workers}: must be >= 1")
    need(space.resources.workers_per_trial >= 1,
         f"resources.workers_per_trial={space.resources.workers_per_trial}: must be >= 1")
    need(space.resources.parent_gpus >= 0, f"resources.parent_gpus={space.resources.parent_gpus}: must be >= 0")
    need(space.resources.cache_workers >= 1,
         f"resources.cache_workers={space.resources.cache_workers}: must be >= 1")
    s = space.search
    need(s.sampler in ("auto", "grid", "tpe", "nsga2"), f"search.sampler={s.sampler!r}: "
                                                        "must be 'auto', 'grid', 'tpe' or 'nsga2'")
    need(isinstance(s.objectives, list) and s.objectives[:1] == ["val_loss"] and len(set(s.objectives)) ==
         len(s.objectives) and all(k in OBJECTIVES for k in s.objectives[1:]),
         f"search.objectives={s.objectives!r}: val_loss first, then any of {', '.join(OBJECTIVES)}")
    need(s.promotion in ("loss", "front"), f"search.promotion={s.promotion!r}: must be 'loss' or 'front'")
    need(s.promotion == "loss" or len(s.objectives) > 1,
         "search.promotion=front needs a second objective in search.objectives")
    need(not (s.asha and len(s.objectives) > 1), "search.asha: ASHA stops trials on their loss alone, which a "
                                                 "multi-objective search does not rank by; turn one of them off")
    need(space.search.retries >= 0, f"search.retries={space.search.retries}: must be >= 0")
    need(space.promote >= 0, f"promote={space.promote}: must be >= 0")
    need(space.seq_len >= 2, f"seq_len={space.seq_len}: must be >= 2")
    need(space.val_sequences >= 1, f"val_sequences={space.val_sequences}: must be >= 1")
    need(space.resources.cpus_per_trial >= 1, f"resources.cpus_per_trial={space.resources.cpus_per_trial}: "
                                              "must be >= 1")
    need(str(space.name).replace("-", "").replace("_", "").replace(".", "").isalnum(),
         f"name={space.name!r}: use letters, digits, '-', '_' and '.' (it names the study folder)")


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML, reporting every problem at once."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such search-space file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return parse_space(data, str(path))


def parse_space(data: Any, where: str = "space") -> SearchSpace:
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of fields")
    missing = [key for key in _REQUIRED if key not in data]
    errors += [f"{key}: required" for key in missing]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _SECTIONS:
            kwargs[key] = value
        elif (section := _build(_SECTIONS[key], value or {}, key, errors)) is not None:
            kwargs[key] = section  # a section that could not be built keeps its defaults; its error is recorded
    # Unknown fields are reported and left out, so every other problem in the file is found in the same pass.
    space = _build(SearchSpace, kwargs, "space", errors) if not missing else None
    if space is not None:
        _check(space, errors)
    if errors:
        raise ConfigError(f"{where}: {len(errors)} problem(s): " + "; ".join(errors))
    return space


# -- enumeration ------------------------------------------------------------------------------------

def target_range(space: SearchSpace, config: Any) -> tuple[float, float]:
    """The budget's [low, high] in its own kind of count: a `fraction` is of the parent's count of that kind."""
    return _range(space, Parent.of(config))


def counted_params(space: SearchSpace, config: Any, arch: Architecture) -> int:
    return _counted(space, Parent.of(config), arch)


def _range(space: SearchSpace, parent: Parent) -> tuple[float, float]:
    b = space.budget
    if b.params is None and b.fraction is None:
        return 0.0, float("inf")  # a memory cap alone
    target = b.params if b.params is not None else b.fraction * _counted(space, parent, parent.architecture)
    return target * (1 - b.tolerance), target * (1 + b.tolerance)


def _counted(space: SearchSpace, parent: Parent, arch: Architecture) -> int:
    if space.budget.kind == "active":
        return parent.active_parameters(arch)
    total = parent.num_parameters(arch)
    return total - parent.embedding_parameters(arch) if space.budget.kind == "non_embedding" else total


def axis_names(parent: Parent) -> tuple[str, ...]:
    """The axes a candidate of this parent sets: the dense ones, then its family's units' (config keys), then,
    where its layers differ in size, the layers kept of each kind (`layers.<kind>`)."""
    return (*AXES, *parent.family.unit_keys, *parent.kind_counts(parent.architecture.layers))


def axes_of(parent: Parent, arch: Architecture) -> dict[str, int]:
    """A child's values of `axis_names(parent)`."""
    return {**{k: arch.get(k) for k in (*AXES, *parent.family.unit_keys)}, **parent.kind_counts(arch.layers)}


def row_axes(row: dict[str, Any]) -> dict[str, int]:
    """A candidate row's axis values, in label order."""
    return {k: int(row[k]) for k in axis_keys(row)}


def _axis_values(space: SearchSpace, parent: Parent) -> dict[str, list[int]]:
    """Each axis's values from the file (the parent's value where it gives none), under the parent's key names;
    an expert axis given for a parent without experts is refused."""
    ax = space.axes
    family = parent.family
    given = {name: getattr(ax, name) for name in AXES}
    for name in UNIT_AXES:
        values = getattr(ax, name)
        if not values:
            continue
        moe = family.moe
        key = moe.count_key if moe and name in ("num_experts", "num_local_experts") else name
        if key not in family.unit_keys:
            has = f"its unit axes: {', '.join(family.unit_keys)}" if family.unit_keys else "it has only the dense axes"
            raise ConfigError(f"axes.{name}: not an axis of a {family.model_type} parent ({has})")
        given[key] = values
    depth = parent.architecture.num_hidden_layers
    kinds = parent.layers_by_kind()
    mixed = family.mixes_layers(parent.config)
    kind_list = ", ".join(f"{kind} ({len(layers)})" for kind, layers in kinds.items())
    if any(int(v) != depth for v in ax.num_hidden_layers) and mixed:
        raise ConfigError(f"axes.num_hidden_layers: this {family.model_type} parent's layers differ in size by kind, "
                          f"so a depth alone does not fix a child's size; give axes.kept_layers, the layers kept of "
                          f"each kind (its kinds: {kind_list})")
    if ax.kept_layers:
        if not mixed:
            raise ConfigError(f"axes.kept_layers: this {family.model_type} parent's layers are all alike; give "
                              f"axes.num_hidden_layers")
        for kind, values in ax.kept_layers.items():
            if kind not in kinds:
                raise ConfigError(f"axes.kept_layers.{kind}: the parent has no {kind} layers; its kinds: {kind_list}")
            if max(values) > len(kinds[kind]):
                raise ConfigError(f"axes.kept_layers.{kind}={values}: the parent has {len(kinds[kind])} {kind} layers")
            given[f"{KIND_AXIS}{kind}"] = values
    parent_values = axes_of(parent, parent.architecture)
    return {name: [int(v) for v in given.get(name) or []] or [parent_values[name]] for name in axis_names(parent)}


def _grid(space: SearchSpace, parent: Parent) -> list[Architecture]:
    """Every valid child in the axes' product (an axis left empty keeps the parent's value)."""
    ax = space.axes
    values = _axis_values(space, parent)
    names = axis_names(parent)
    out = []
    for *axes, expansion in itertools.product(*(values[name] for name in names), ax.mlp_expansion or [None]):
        axes = dict(zip(names, axes))
        if expansion is not None:
            axes["intermediate_size"] = int(round(axes["hidden_size"] * expansion))
        if any(k.startswith(KIND_AXIS) for k in axes):
            axes.pop("num_hidden_layers")  # the kinds' counts add up to it
        try:
            arch = parent.child(axes)
            parent.child_config(arch)
        except ArchitectureError:
            continue  # e.g. heads not a multiple of KV heads, or a stock config rejects it: not a valid child
        out.append(arch)
    return out


def enumerate_candidates(space: SearchSpace, config: Any) -> list[dict[str, Any]]:
    """Every valid child in the axes' product whose counted parameters fall in the budget, sorted by size."""
    parent = Parent.of(config)
    parent_params = parent.num_parameters()
    low, high = _range(space, parent)
    rows = []
    for arch in _grid(space, parent):
        params = parent.num_parameters(arch)
        counted = _counted(space, parent, arch)
        if low <= counted <= high and _memory_problem(space, parent, arch) is None:
            active = {"active_params": parent.active_parameters(arch)} if parent.family.moe else {}
            axes = axes_of(parent, arch)
            rows.append({"label": short_label(axes), **axes,
                         "params": params, **active, "memory_bytes": memory_bytes(space, parent, arch),
                         "counted": counted,
                         "share_of_parent": params / parent_params})
    return sorted(rows, key=lambda r: (-r["params"], r["label"]))


def memory_bytes(space: SearchSpace, parent: Parent, arch: Architecture) -> int:
    """What serving the child holds at the budget's context and batch: its weights (every expert of a mixture of
    experts) and its KV cache. The layers a shallower child keeps are chosen later, by importance: where the
    parent mixes sliding-window and full-attention layers, the cache is counted for the kept layers that would
    hold the most (a cap must hold whichever are kept)."""
    b = space.budget
    arch = parent.served(arch, b.context)
    return parent.num_parameters(arch) * b.bytes_per_param + parent.cache_bytes(arch, b.context, b.batch, b.cache_bytes)


def _memory_problem(space: SearchSpace, parent: Parent, arch: Architecture) -> str | None:
    b = space.budget
    if b.max_weight_gb is not None:
        gb = parent.num_parameters(arch) * b.bytes_per_param / 2**30
        if gb > b.max_weight_gb:
            return f"{gb:.2f} GB of weights, above budget.max_weight_gb={b.max_weight_gb}"
    if b.memory_gb is not None:
        gb = memory_bytes(space, parent, arch) / 2**30
        if gb > b.memory_gb:
            return f"{gb:.2f} GB of weights and KV cache at context {b.context} x batch {b.batch}, above " \
                   f"budget.memory_gb={b.memory_gb}"
    return None


def candidate_problem(space: SearchSpace, config: Any, axes: dict[str, int]) -> str | None:
    """Why an axes combination is not a candidate of `space` (None when it is one)."""
    parent = Parent.of(config)
    try:
        arch = parent.child({k: axes[k] for k in axis_names(parent)})
        parent.child_config(arch)
    except ArchitectureError as e:
        return f"not a valid child: {e}"
    low, high = _range(space, parent)
    counted = _counted(space, parent, arch)
    if not low <= counted <= high:
        return f"{counted:,} {space.budget.kind} parameters, outside the budget [{low:,.0f}, {high:,.0f}]"
    return _memory_problem(space, parent, arch)


def infeasible_hint(space: SearchSpace, config: Any) -> str:
    """Why no candidate fits, and which axis to widen."""
    parent = Parent.of(config)
    low, high = _range(space, parent)
    grid = _grid(space, parent)
    if not grid:
        return "no valid child in the axes' product (check heads against KV heads and hidden_size)"
    counts = [_counted(space, parent, a) for a in grid]
    if max(counts) < low:
        side, bound, fix = "largest", max(counts), "larger values"
    elif min(counts) > high:
        side, bound, fix = "smallest", min(counts), "smaller values"
    else:
        return (f"candidates span {min(counts):,}..{max(counts):,} but none falls in [{low:,.0f}, {high:,.0f}]; "
                f"add intermediate values to the axes or raise budget.tolerance")
    # The axis whose range moves the count most is the one worth widening first.
    sensitivity = {}
    for name in axis_names(parent):
        if len({a.get(name) for a in grid}) > 1:
            by_value: dict[int, list[int]] = {}
            for a, c in zip(grid, counts):
                by_value.setdefault(a.get(name), []).append(c)
            means = [sum(v) / len(v) for v in by_value.values()]
            sensitivity[name] = max(means) - min(means)
    axis = max(sensitivity, key=sensitivity.get) if sensitivity else "hidden_size"
    if axis == "intermediate_size" and space.axes.mlp_expansion:
        axis = "mlp_expansion"  # name the axis as the file spells it
    moe = parent.family.moe
    if moe and axis == moe.count_key:
        axis = next((n for n in ("num_experts", "num_local_experts") if getattr(space.axes, n)), axis)
    return (f"no candidate within budget [{low:,.0f}, {high:,.0f}] ({space.budget.kind} parameters): the {side} "
            f"has {bound:,}; add {fix} to axes.{axis}")


def kept_layers(axes: dict[str, Any], config: Any, importances: Any, method: str) -> tuple[int, ...]:
    """The parent layers a candidate with these axes keeps, chosen by importance (`select_layers`); with counts of
    each kind (`layers.<kind>`), each kind keeps its own best layers, a kind left out all of its own, and the
    depth is their sum (a `num_hidden_layers` beside them is not read)."""
    counts = {k[len(KIND_AXIS):]: int(v) for k, v in axes.items() if k.startswith(KIND_AXIS)}
    if not counts:
        return select_layers(importances, int(axes["num_hidden_layers"]), method)
    parent = Parent.of(config)
    kinds = parent.layers_by_kind()
    counts = {kind: counts.get(kind, len(layers)) for kind, layers in kinds.items()} | counts
    parent.first_layers(counts)  # an unknown kind, or more layers of one than the parent has: one clear error
    return select_layers(importances, sum(counts.values()), method, kinds, counts)


def architecture_of(row: dict[str, Any], config: Any, layers: tuple[int, ...] | None = None) -> Architecture:
    """A candidate row's Architecture, keeping `layers` (default: the first ones of each kind, which stand for any
    choice of the same kinds in counts and sizes)."""
    parent = Parent.of(config)
    return parent.child({k: row[k] for k in axis_names(parent)}, layers)


def space_config(space: SearchSpace) -> Any:
    """The parent's config: inline in the space (`parent_config`: enumeration and plans without weights) or read
    from the parent."""
    from transformers import AutoConfig

    from nas.parents import parent_config

    if space.parent_config:
        data = dict(space.parent_config)
        try:
            config = AutoConfig.for_model(data.pop("model_type"), **data)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"parent_config: cannot build a config ({e})") from None
        family_of(config)
        return config
    return parent_config(space.parent)
