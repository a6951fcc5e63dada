"""Search spaces: a YAML file of values, validated against typed dataclasses (`nas.spec`), and its feasible
candidates.

A candidate is named by its label (`Architecture.short()` form, e.g. "L30-H6-KV3-M1024-E576"); the kept layers
are chosen from importance scores when the candidate is pruned, so enumeration needs only the parent's config.
"""

from __future__ import annotations

import itertools
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import yaml

from nas.architecture import KIND_AXIS, PER_LAYER, Architecture, axis_keys, short_label
from nas.errors import ArchitectureError, ConfigError
from nas.families import Parent, family_of
from nas.importance import AGGREGATIONS, HEAD_SOURCES, LAYER_METHODS, NEURON_SOURCES, select_layers
# The file's fields (and MEASURED, which the search reads from here).
from nas.spec import AXES, BUDGET_KINDS, MEASURED, OBJECTIVES, UNIT_AXES, Axes, Budget, ImportanceSpec, PerLayerSpec, \
    Resources, RetrainSpec, SearchSpace, SearchSpec

_SECTIONS = {"budget": Budget, "axes": Axes, "importance": ImportanceSpec, "short_retrain": RetrainSpec,
             "full_retrain": RetrainSpec, "search": SearchSpec, "resources": Resources, "per_layer": PerLayerSpec}
_REQUIRED = ("name", "parent", "budget", "axes")
#: The least value of an integer field where it is not 1: counts that may be none, and the shortest sequence a
#: next-token loss has. (Budget.warmup stays >= 1: the first timed run compiles and allocates.)
_AT_LEAST = {"drop_samples": 0, "warmup_steps": 0, "teacher_topk": 0, "retries": 0, "seed": 0, "promote": 0,
             "seq_len": 2}
_INVALID = object()  # a value `_coerce` refused (its error recorded): the field keeps its default


def _build(cls, data: Any, section: str, errors: list[str]):
    """`cls` from a mapping of the file: `section`, its key ("" for the top level, whose fields are named bare)."""
    if not isinstance(data, dict):
        errors.append(f"{section}: must be a mapping, got {data!r}")
        return None
    prefix = f"{section}." if section else ""
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            errors.append(f"{prefix}{key}: unknown field; known: {', '.join(sorted(known))}")
    kwargs = {f.name: _coerce(data[f.name], f.type, f"{prefix}{f.name}", errors) for f in fields(cls)
              if f.name in data}
    try:
        return cls(**{k: v for k, v in kwargs.items() if v is not _INVALID})
    except TypeError as e:
        errors.append(f"{section or 'space'}: {e}")
        return None


def _coerce(value: Any, hint: str, where: str, errors: list[str]) -> Any:
    """Numbers for numeric fields (PyYAML reads `8.18e9`, no sign in the exponent, as a string), whole ones for
    integer fields; a list field given one value (`num_attention_heads: 6`, a kind's count in `kept_layers`) holds
    that value, and given none (YAML null) is empty. `_INVALID`, its error recorded, where none of these fits."""
    kind = hint.split(" | ")[0]
    if kind.startswith("list["):
        return [] if value is None else value if isinstance(value, (list, dict)) else [value]
    if kind == "dict[str, list[int]]" and isinstance(value, dict):
        return {k: v if isinstance(v, list) else [v] for k, v in value.items()}
    if kind not in ("int", "float") or value is None:
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        errors.append(f"{where}={value!r}: must be a number")
        return _INVALID
    if kind == "int":
        if not float(value).is_integer():
            errors.append(f"{where}={value!r}: must be an integer")
            return _INVALID
        return int(value)
    return value


def _at_least(section: Any, where: str, errors: list[str]) -> None:
    """Each integer field of `section` at its least value (`_AT_LEAST`, else 1), or an error naming it."""
    for f in fields(section):
        value, least = getattr(section, f.name), _AT_LEAST.get(f.name, 1)
        if f.type.split(" | ")[0] == "int" and value is not None and value < least:
            errors.append(f"{where}{f.name}={value}: must be >= {least}")


def _check_engine(b, need) -> None:
    """What the engine a budget times in cannot honour (`nas.engine_latency`)."""
    from nas.engine_latency import ENGINES

    need(b.engine in ENGINES, f"budget.engine={b.engine!r}: must be one of {', '.join(map(repr, ENGINES))}")
    if b.engine in ENGINES and b.engine != "hf":
        need(b.device == "cpu", f"budget.engine={b.engine}: the engines built here are CPU builds, and "
                                f"budget.device={b.device}; time on cpu, or on {b.device} with budget.engine: hf")
    if b.engine == "llama.cpp":
        need(b.batch == 1, f"budget.batch={b.batch}: llama.cpp's bindings decode one sequence at a time; use batch "
                           f"1, or budget.engine: vllm or hf for a batch")


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
    _check_engine(b, need)
    need(b.serve_dtype is None or b.serve_dtype in ("float32", "bfloat16", "float16"),
         f"budget.serve_dtype={b.serve_dtype!r}: must be 'float32', 'bfloat16' or 'float16'")
    need(b.memory_gb is None or b.memory_gb > 0, f"budget.memory_gb={b.memory_gb}: must be > 0")
    need(b.params is None or b.params > 0, f"budget.params={b.params}: must be > 0")
    need(b.fraction is None or 0 < b.fraction < 1, f"budget.fraction={b.fraction}: must be in (0, 1)")
    need(0 <= b.tolerance < 1, f"budget.tolerance={b.tolerance}: must be in [0, 1)")
    need(b.kind in BUDGET_KINDS, f"budget.kind={b.kind!r}: must be one of {', '.join(map(repr, BUDGET_KINDS))}")
    _at_least(space, "", errors)
    for section in _SECTIONS:
        if getattr(space, section) is not None:  # (per_layer is optional)
            _at_least(getattr(space, section), f"{section}.", errors)
    if space.per_layer is not None:
        _check_per_layer(space, need)
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
    for key, allowed in (("sampling", ("random", "first")), ("seq_agg", AGGREGATIONS), ("batch_agg", AGGREGATIONS),
                         ("neuron_source", NEURON_SOURCES), ("head_source", HEAD_SOURCES),
                         ("layer_method", LAYER_METHODS)):
        need(getattr(imp, key) in allowed, f"importance.{key}={getattr(imp, key)!r}: must be one of "
                                           f"{', '.join(map(repr, allowed))}")
    need(imp.layer_method == "bi" or imp.drop_samples > 0,
         f"importance.layer_method={imp.layer_method!r} needs importance.drop_samples > 0")
    for section in ("short_retrain", "full_retrain"):
        r = getattr(space, section)
        need(r.tokens >= r.batch_size * r.grad_accum * space.seq_len,
             f"{section}.tokens={r.tokens}: below one step of batch_size*grad_accum*seq_len="
             f"{r.batch_size * r.grad_accum * space.seq_len}")
        workers = space.resources.workers_per_trial if section == "short_retrain" else r.workers
        need(workers < 1 or r.batch_size % workers == 0,
             f"{section}.batch_size={r.batch_size}: must be a multiple of the {workers} workers that split it")
    need(space.short_retrain.workers == 1, "short_retrain.workers: a trial's workers are resources.workers_per_trial")
    need(space.resources.parent_gpus >= 0, f"resources.parent_gpus={space.resources.parent_gpus}: must be >= 0")
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
    need(str(space.name).replace("-", "").replace("_", "").replace(".", "").isalnum(),
         f"name={space.name!r}: use letters, digits, '-', '_' and '.' (it names the study folder)")


def _check_per_layer(space: SearchSpace, need) -> None:
    p = space.per_layer
    for name in ("kv_heads", "mlp_widths"):
        values = getattr(p, name)
        need(isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                              for v in values),
             f"per_layer.{name}={values!r}: must be a list of positive integers (the widths a layer may keep)")
    for name in ("skip_attention", "skip_mlp", "uniform"):
        need(isinstance(getattr(p, name), bool), f"per_layer.{name}={getattr(p, name)!r}: must be true or false")
    need(bool(p.kv_heads or p.mlp_widths or p.skip_attention is True or p.skip_mlp is True),
         "per_layer: give kv_heads, mlp_widths, skip_attention or skip_mlp (with none, every layer is the parent's)")
    need(p.samples is None or p.samples <= space.importance.samples,
         f"per_layer.samples={p.samples}: the block scores read the calibration sequences, "
         f"importance.samples={space.importance.samples}; give at most that many")
    need(not set(MEASURED) & set(space.search.objectives),
         f"search.objectives={space.search.objectives}: per-layer children are ranked by loss alone (their speed "
         f"is a budget: budget.latency_ms, prefill_ms, throughput); drop "
         f"{', '.join(k for k in space.search.objectives if k in MEASURED)} or per_layer")
    need(space.search.sampler in ("auto", "grid"), f"search.sampler={space.search.sampler!r}: per-layer candidates "
                                                   f"are the program's solutions, each trained; use 'grid' or 'auto'")
    need(p.uniform is True or not any(getattr(space.axes, f.name) for f in fields(Axes)),
         "axes: per_layer.uniform is false, so no uniform candidate is searched; set per_layer.uniform: true to "
         "compare them, or leave axes empty ({})")


def per_layer_problem(space: SearchSpace, parent: Parent) -> str | None:
    """Why the space's per-layer widths do not fit this parent (None when they do)."""
    p, full = space.per_layer, parent.architecture
    if refusal := parent.family.per_layer_refusal():
        return f"per_layer: {refusal}"
    if odd := [k for k in p.kv_heads if k >= full.num_key_value_heads or full.num_attention_heads % k]:
        return (f"per_layer.kv_heads={p.kv_heads}: {odd} not below the parent's {full.num_key_value_heads} KV heads "
                f"or not dividing its {full.num_attention_heads} query heads")
    if odd := [w for w in p.mlp_widths if w >= full.intermediate_size]:
        return f"per_layer.mlp_widths={p.mlp_widths}: {odd} not below the parent's MLP width {full.intermediate_size}"
    return None


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
        if key not in _SECTIONS or (key == "per_layer" and value is None):  # (per_layer: null is a uniform search)
            kwargs[key] = value
        elif (section := _build(_SECTIONS[key], value or {}, key, errors)) is not None:
            kwargs[key] = section  # a section that could not be built keeps its defaults; its error is recorded
    # Unknown fields are reported and left out, so every other problem in the file is found in the same pass.
    space = _build(SearchSpace, kwargs, "", errors) if not missing else None
    if space is not None:
        _check(space, errors)
        if Path(space.parent).is_dir() and not Path(space.parent).is_absolute():
            # Ray's workers run in folders of their own, where a relative path would be read as a hub id.
            space = replace(space, parent=str(Path(space.parent).resolve()))
    if errors:
        raise ConfigError(f"{where}: {len(errors)} problem(s): " + "; ".join(errors))
    return space


# -- enumeration ------------------------------------------------------------------------------------

def _range(space: SearchSpace, parent: Parent) -> tuple[float, float]:
    """The budget's [low, high] in its own kind of count: a `fraction` is of the parent's count of that kind."""
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
    # The axis whose range moves the count most is the one worth widening first. Where the layers' kinds are axes,
    # the depth is their sum, not an axis of the file.
    values = [axes_of(parent, a) for a in grid]
    sensitivity = {}
    for name in axis_names(parent):
        by_value: dict[int, list[int]] = {}
        for axes, c in zip(values, counts):
            by_value.setdefault(axes[name], []).append(c)
        if len(by_value) > 1 and not (name == "num_hidden_layers" and parent.family.mixes_layers(parent.config)):
            means = [sum(v) / len(v) for v in by_value.values()]
            sensitivity[name] = max(means) - min(means)
    axis = max(sensitivity, key=sensitivity.get) if sensitivity else "hidden_size"
    # Named as the file spells it.
    if axis == "intermediate_size" and space.axes.mlp_expansion:
        axis = "mlp_expansion"
    if axis.startswith(KIND_AXIS):
        axis = f"kept_layers.{axis[len(KIND_AXIS):]}"
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
    arch = parent.child({k: row[k] for k in axis_names(parent)}, layers)
    if row.get(PER_LAYER):  # a per-layer candidate's table (`nas.search.per_layer`)
        arch = Architecture.from_dict({**arch.to_dict(), PER_LAYER: row[PER_LAYER]})
    return arch


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
