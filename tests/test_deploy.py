"""Deployment budgets. Memory (`budget.memory_gb`): a child's weights plus the KV cache of `batch` sequences of
`context` tokens, counted from its config, against the cache HF's own `generate` builds (a static cache), for
every family (full, sliding-window and mixed attention, dense and mixtures of experts, and hybrids' recurrent
states, which do not grow with the context). Speed (`budget.latency_ms`,
`search.objectives`): candidates measured before training, those over a cap never trained, and a two-objective
search whose front is loss against measured latency."""

import json

import pytest
import torch

from conftest import ALL_CONFIGS, PER_LAYER_FAMILIES, mixed_child, tiny_model
from nas.cli import main
from nas.families import Parent
from nas.loader import build
from nas.importance import ImportanceSettings, compute_importance
from nas.prune import prune
from nas.space import enumerate_candidates, parse_space

TOKENS = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def _cut(config):
    """Heads, KV heads and hidden narrower, a hybrid's recurrent heads too, one layer dropped (so that the kept
    layers' types are the child's)."""
    parent = Parent.of(config)
    mamba = parent.family.mamba  # (Bamba: heads x head width a multiple of hidden_size)
    recurrent = dict(zip(mamba.keys, (4, 12 if mamba.expand_key else 4))) if mamba else \
        {"linear_num_value_heads": 2, "linear_num_key_heads": 1} if parent.family.deltanet else {}
    return parent.architecture.replace(num_attention_heads=3, num_key_value_heads=1, num_hidden_layers=3,
                                       layers=(0, 2, 3), **recurrent,
                                       **({"hidden_size": 24} if config.model_type == "olmoe" else {}))


def _cache_tensors(layer):
    """An attention layer's keys and values; a linear-attention layer's conv windows and recurrent states; both in
    a layer that holds both (Falcon-H1)."""
    out = [getattr(layer, "keys", None), getattr(layer, "values", None)]
    if hasattr(layer, "recurrent_states"):
        out += [*layer.conv_states.values(), *layer.recurrent_states.values()]
    return [t for t in out if t is not None]


@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
@pytest.mark.parametrize("new_tokens", [2, 12])  # the context below and above the tiny sliding window (8)
def test_the_counted_kv_cache_is_the_one_generate_builds(name, new_tokens):
    parent = tiny_model(name)
    arch = _cut(parent.config)
    child = prune(parent, compute_importance(parent, TOKENS, ImportanceSettings(drop_samples=0)), arch)
    out = child.generate(TOKENS, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, cache_implementation="static", return_dict_in_generate=True)
    cache = out.past_key_values
    built = sum(t.numel() * t.element_size() for layer in cache.layers for t in _cache_tensors(layer))
    context = TOKENS.shape[1] + new_tokens - 1  # generate never feeds the last new token back: it is not cached
    assert Parent.of(parent.config).cache_bytes(arch, context, TOKENS.shape[0], nbytes=4) == built
    if name in ("gemma2", "gemma3_text", "olmo3", "gpt_oss") and new_tokens == 12:  # past the window: it is used
        assert built < 2 * 3 * context * 2 * arch.num_key_value_heads * arch.head_dim * 4


@pytest.mark.parametrize("name", PER_LAYER_FAMILIES)
@pytest.mark.parametrize("new_tokens", [2, 12])
def test_the_counted_kv_cache_of_a_per_layer_child_is_the_one_generate_builds(name, new_tokens):
    """A mixed child (an attention-free layer, an MLP-free one, 1 and 2 KV heads) built by nas's loader: the static
    cache `generate` fills holds each attention layer's own KV heads and nothing for the attention-free layer, and
    the count says as much (Mistral with a window of 8 tokens, passed at 12 new tokens)."""
    config = ALL_CONFIGS[name]()
    if name == "mistral":
        config.sliding_window = 8
    parent = Parent.of(config)
    arch = mixed_child(parent.architecture)
    torch.manual_seed(0)
    child = build(parent.child_config(arch), torch.float32).eval()
    out = child.generate(TOKENS, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, cache_implementation="static", return_dict_in_generate=True)
    built = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in _cache_tensors(layer))
    context = TOKENS.shape[1] + new_tokens - 1
    assert parent.cache_bytes(arch, context, TOKENS.shape[0], nbytes=4) == built


def test_a_layer_holding_a_sliding_window_and_a_recurrent_state_counts_both():
    """A `hybrid_sliding` layer (attention in a window beside linear attention's state) holds both; the count
    matches the tensors of the static cache `generate` builds. (Falcon-H1 with its layers declared
    hybrid_sliding: no stock family of the units declares them yet.)"""
    from transformers import FalconH1Config, FalconH1ForCausalLM

    class SlidingFalcon(FalconH1Config):
        @property
        def layers_block_type(self):
            return ["hybrid_sliding"] * self.num_hidden_layers

    config = SlidingFalcon(**{**ALL_CONFIGS["falcon_h1"]().to_dict(), "sliding_window": 64})
    torch.manual_seed(0)
    model = FalconH1ForCausalLM(config).eval()
    out = model.generate(TOKENS, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0,
                         cache_implementation="static", return_dict_in_generate=True)
    assert {type(layer).__name__ for layer in out.past_key_values.layers} == \
        {"LinearAttentionAndStaticSlidingWindowAttentionLayer"}
    built = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in _cache_tensors(layer))
    parent = Parent.of(config)
    assert parent.cache_bytes(parent.architecture, TOKENS.shape[1] + 2, TOKENS.shape[0], nbytes=4) == built


def test_layers_with_several_recurrent_states_are_refused_not_undercounted():
    """A config whose linear-attention layers keep several states (`number_of_conv_states`) is refused in one
    line, not counted as one state."""
    from nas.errors import UnsupportedModelError

    parent = Parent.of(ALL_CONFIGS["qwen3_next"](number_of_conv_states=2))
    with pytest.raises(UnsupportedModelError, match="number_of_conv_states"):
        parent.cache_bytes(parent.architecture, 16, 1)


def test_a_memory_budget_enforces_weights_plus_cache_and_candidates_list_it(tmp_path, capsys):
    """A memory cap alone is a budget: the candidates are those whose weights and KV cache at the budget's context
    and batch fit, and `nas candidates` lists each one's memory (the same count `--json` gives in bytes)."""
    config = ALL_CONFIGS["qwen3"]()
    parent = Parent.of(config)
    spec = {"name": "mem", "parent": "x", "parent_config": {"model_type": "qwen3", **{
        k: v for k, v in config.to_dict().items() if k in ("vocab_size", "hidden_size", "intermediate_size",
                                                           "num_hidden_layers", "num_attention_heads",
                                                           "num_key_value_heads", "head_dim")}},
            "axes": {"num_hidden_layers": [2, 3, 4], "num_key_value_heads": [1, 2], "num_attention_heads": [2]}}
    sizes = {}
    for layers in (2, 3, 4):
        for kv in (1, 2):
            arch = parent.architecture.replace(num_hidden_layers=layers, layers=tuple(range(layers)),
                                               num_key_value_heads=kv, num_attention_heads=2)
            # weights in bf16; keys and values of 8 x 1024 tokens in every layer, kv heads of 12 dimensions
            sizes[(layers, kv)] = parent.num_parameters(arch) * 2 + 2 * layers * 1024 * 8 * kv * 12 * 2
    cap = sorted(sizes.values())[3] / 2**30
    spec["budget"] = {"memory_gb": cap, "context": 1024, "batch": 8}
    space = parse_space(spec)
    rows = enumerate_candidates(space, config)
    assert {(r["num_hidden_layers"], r["num_key_value_heads"]) for r in rows} == \
        {k for k, v in sizes.items() if v <= cap * 2**30}
    assert all(r["memory_bytes"] == sizes[(r["num_hidden_layers"], r["num_key_value_heads"])] for r in rows)
    (tmp_path / "space.json").write_text(json.dumps(spec))
    assert main(["candidates", str(tmp_path / "space.json")]) == 0
    text = capsys.readouterr().out
    assert "memory_gb" in text and "context 1024 x batch 8" in text
    assert all(f"{r['memory_bytes'] / 2**30:.2f}" in text for r in rows)
    assert main(["candidates", "--json", str(tmp_path / "space.json")]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["label"], c["memory_bytes"], c["active_params"]) for c in listed] == \
        [(r["label"], r["memory_bytes"], r["params"]) for r in rows]
    assert all(c["memory_bytes"] == sizes[(c["num_hidden_layers"], c["num_key_value_heads"])] and
               (c["context"], c["batch"]) == (1024, 8) for c in listed)


def test_speed_caps_and_the_measurement_cache(tmp_path):
    """A cap is a maximum for latency and prefill and a minimum for throughput; a candidate is measured once per
    (shape, device, settings): a second pass reads the run folder's latency/ and measures nothing."""
    from nas.latency import measure_candidates, over_cap
    from nas.storage import RunStorage

    figures = {"latency_ms": 10.0, "prefill_ms": 50.0, "throughput": 100.0, "device_name": "cpu"}
    assert over_cap(figures, {"latency_ms": 12}) is None
    assert "above budget.latency_ms=8" in over_cap(figures, {"latency_ms": 8})
    assert "below budget.throughput=200" in over_cap(figures, {"throughput": 200})
    config = ALL_CONFIGS["llama"]()
    space = parse_space({"name": "s", "parent": "x", "axes": {"num_hidden_layers": [2, 4]},
                         "budget": {"latency_ms": 1e6, "context": 16, "batch": 2, "decode_tokens": 2, "repeats": 2}})
    rows = enumerate_candidates(space, config)
    storage, lines = RunStorage(tmp_path, "s"), []
    within, outside = measure_candidates(space, config, rows, storage, lines.append)
    assert len(within) == 2 and not outside and len(lines) == 2 and len(storage.listdir("latency")) == 2
    for row in within:
        assert row["latency_ms"] > 0 and row["prefill_ms"] > 0
        assert row["throughput"] == pytest.approx(2 * 1000 / row["latency_ms"])
    again, lines = measure_candidates(space, config, rows, storage, lines.append)[0], []
    assert [r["latency_ms"] for r in again] == [r["latency_ms"] for r in within] and not lines


def _speed_space(layers, **budget):
    return parse_space({"name": "s", "parent": "x", "axes": {"num_hidden_layers": layers},
                        "budget": {"latency_ms": 1e6, "context": 16, "batch": 1, "decode_tokens": 1, "repeats": 1,
                                   **budget}})


def test_timing_leaves_the_callers_thread_count_as_it_was():
    from nas.latency import SpeedSettings, measure

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        measure({**ALL_CONFIGS["llama"]().to_dict(), "num_hidden_layers": 1},
                SpeedSettings(context=4, decode_tokens=1, warmup=0, repeats=1, threads=1))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", PER_LAYER_FAMILIES)
def test_a_per_layer_child_is_timed_at_its_own_layer_shapes(name):
    """The model a per-layer child is timed as is the child itself: its parameters are the child's count, each
    layer has its own KV heads and MLP width or lacks the block it skips, and it runs `generate` with a static
    cache (the timing's)."""
    from nas.latency import SpeedSettings, measure, timed_model

    parent = Parent.of(ALL_CONFIGS[name]())
    arch = mixed_child(parent.architecture)
    data = parent.child_config(arch).to_dict()
    settings = SpeedSettings(context=8, decode_tokens=2, warmup=0, repeats=1)
    model = timed_model(data, settings)
    assert sum(p.numel() for p in model.parameters()) == parent.num_parameters(arch)
    shapes = [(0 if layer.self_attn is None else layer.self_attn.k_proj.out_features // arch.head_dim,
               0 if layer.mlp is None else layer.mlp.up_proj.out_features) for layer in model.model.layers]
    assert shapes == [(s.num_key_value_heads, s.intermediate_size) for s in arch.layer_shapes]
    figures = measure(data, settings)
    assert figures["latency_ms"] > 0 and figures["prefill_ms"] > 0


def test_a_figure_timed_on_another_machine_is_not_reused(tmp_path, monkeypatch, without_ray):
    """The cache key holds the machine: the same shapes and settings on another CPU model are measured again,
    and each machine's figures stay side by side."""
    import nas.latency
    from nas.storage import RunStorage

    config, space = ALL_CONFIGS["llama"](), _speed_space([2])
    rows, storage, lines = enumerate_candidates(space, config), RunStorage(tmp_path, "s"), []
    nas.latency.measure_candidates(space, config, rows, storage, lines.append)
    nas.latency.measure_candidates(space, config, rows, storage, lines.append)
    assert len(lines) == 1  # the second pass read the figure
    monkeypatch.setattr(nas.latency, "_cpu_model", lambda: "another CPU")
    nas.latency.measure_candidates(space, config, rows, storage, lines.append)
    assert len(lines) == 2 and len(storage.listdir("latency")) == 2
    assert {storage.read_json(f"latency/{name}")["machine"].startswith("another CPU")
            for name in storage.listdir("latency")} == {True, False}


def test_timings_run_on_the_drivers_node_when_it_can_time_them(tmp_path, monkeypatch):
    """Under Ray, without budget.device_resource, every timing task (and the probe of the machine that keys the
    cache) is pinned to the driver's node, not left to land on any node; where the driver's node lacks the CPUs
    they go to one other node, always the same."""
    import ray

    import nas.latency
    from nas.storage import RunStorage

    worker, driver, other = "a" * 56, "b" * 56, "c" * 56  # (node ids are hex)
    nodes = [{"NodeID": node, "Alive": True, "Resources": {"CPU": cpus}} for node, cpus in
             ((worker, 8.0), (driver, 2.0), (other, 8.0))]
    scheduled = []

    class Remote:  # runs the task here, noting the options it was submitted with
        def __init__(self, fn):
            self.fn = fn

        def options(self, **options):
            scheduled.append(options["scheduling_strategy"].node_id if "scheduling_strategy" in options else None)
            return self

        def remote(self, *args):
            return self.fn(*args)

    class Context:
        def get_node_id(self):
            return driver

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 18.0})
    monkeypatch.setattr(ray, "get_runtime_context", Context)
    monkeypatch.setattr(ray, "remote", lambda *a, **k: Remote(a[0]) if a and callable(a[0]) else Remote)
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    config, space = ALL_CONFIGS["llama"](), _speed_space([1, 2])
    rows = enumerate_candidates(space, config)
    nas.latency.measure_candidates(space, config, rows, RunStorage(tmp_path, "s"))
    assert scheduled and set(scheduled) == {driver}
    nodes[1]["Resources"]["CPU"] = 0.0  # a driver on a head node that runs no tasks
    scheduled.clear()
    nas.latency.measure_candidates(space, config, rows, RunStorage(tmp_path, "t"))
    assert scheduled and set(scheduled) == {worker}


def test_the_timed_child_holds_the_layers_its_memory_figure_counts(tmp_path, monkeypatch, without_ray):
    """Gemma-style sliding/full layers (window 8, context 16): a 2-layer child's memory figure counts the worst
    case, two full-attention layers, so the child timed holds two full-attention layers too (not the first two
    layers, one of each)."""
    from transformers import AutoConfig

    import nas.latency
    from nas.storage import RunStorage

    config, space = ALL_CONFIGS["gemma3_text"](), _speed_space([2])
    timed = []
    monkeypatch.setattr(nas.latency, "measure", lambda data, settings: timed.append(data) or
                        {"latency_ms": 1.0, "prefill_ms": 1.0, "throughput": 1.0, "device_name": "x", "machine": "x"})
    rows = enumerate_candidates(space, config)
    nas.latency.measure_candidates(space, config, rows, RunStorage(tmp_path, "s"))
    [data] = timed
    assert data["layer_types"] == ["full_attention", "full_attention"]
    child = AutoConfig.for_model(**data)
    parent = Parent.of(config)
    weights = parent.num_parameters(parent.architecture.replace(num_hidden_layers=2, layers=(0, 1))) * 2
    # two layers' keys and values of 16 tokens each, 2 KV heads of 12 dimensions, bf16
    assert rows[0]["memory_bytes"] - weights == 2 * 2 * 16 * child.num_key_value_heads * child.head_dim * 2


@pytest.mark.slow
def test_a_search_over_loss_and_measured_latency(tmp_path, tiny_tokenizer, ray_session):
    """`search.objectives: [val_loss, latency_ms]` with a latency cap: the slowest candidate (its figure measured
    first into the run folder, and the cap set below it) is recorded infeasible and never trained; the study has two
    directions, each trial's second value is its measured latency, the promoted ones lie on the front, and
    pareto.json and best.json carry the measured figures."""
    import optuna

    from conftest import tiny_space
    from nas.latency import measure_candidates
    from nas.search import export_best, run_search, storage_url
    from nas.storage import RunStorage

    spec = tiny_space(tmp_path / "run", tiny_tokenizer, name="speed")
    spec["budget"] = {"fraction": 0.6, "tolerance": 0.25, "latency_ms": 1e6, "context": 16, "batch": 2,
                      "decode_tokens": 2, "repeats": 2}
    spec["search"] = {"sampler": "grid", "objectives": ["val_loss", "latency_ms"], "promotion": "front"}
    spec["promote"] = 2
    space = parse_space(spec)
    config = tiny_model("llama").config
    rows = enumerate_candidates(space, config)
    storage = RunStorage(tmp_path / "runs", "speed")
    measured = sorted(measure_candidates(space, config, rows, storage)[0], key=lambda r: r["latency_ms"])
    cap = (measured[-1]["latency_ms"] + measured[-2]["latency_ms"]) / 2
    spec["budget"]["latency_ms"] = cap
    space = parse_space(spec)
    frame = run_search(space, tmp_path / "runs")
    slowest = measured[-1]["label"]
    infeasible = storage.read_json("infeasible.json")
    assert [r["label"] for r in infeasible] == [slowest] and "above budget.latency_ms" in infeasible[0]["infeasible"]
    assert not (tmp_path / "runs" / "speed" / slowest).exists()
    assert frame.loc[frame["label"] == slowest, "state"].tolist() == ["INFEASIBLE"]
    study = optuna.load_study(study_name="speed", storage=storage_url(space, tmp_path / "runs"))
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert study.metric_names == ["val_loss", "latency_ms"]
    latency = {r["label"]: r["latency_ms"] for r in measured}
    short = [t for t in study.get_trials() if t.user_attrs.get("stage") == "short_retrain"]
    assert {t.user_attrs["label"] for t in short} == set(latency) - {slowest}
    for t in short:
        assert t.values[1] == pytest.approx(latency[t.user_attrs["label"]])
    front = [t for t in short if not any(o.values[0] <= t.values[0] and o.values[1] <= t.values[1] and o is not t
                                         for o in short)]
    promoted = {t.user_attrs["label"] for t in study.get_trials() if t.user_attrs.get("stage") == "full_distillation"}
    assert promoted and promoted <= {t.user_attrs["label"] for t in front}
    pareto = json.loads((tmp_path / "runs" / "speed" / "pareto.json").read_text())
    assert pareto["x"] == "latency_ms" and "measured on" in pareto["x_label"]
    assert {p["label"]: p["x"] for p in pareto["points"]} == pytest.approx({t.user_attrs["label"]: t.values[1]
                                                                            for t in short})
    assert (tmp_path / "runs" / "speed" / "pareto.png").stat().st_size > 1000
    best = export_best("speed", storage_url(space, tmp_path / "runs"), tmp_path / "best.json", root=tmp_path / "runs")
    assert best["label"] in promoted and best["latency_ms"] == pytest.approx(latency[best["label"]])
    assert best["device_name"] == measured[0]["device_name"]


def test_a_study_made_with_other_objectives_is_refused(tmp_path):
    """Re-running a space against a study of other objectives (even of the same directions) would read one
    figure as another: refused, naming the fix."""
    from nas.errors import ConfigError
    from nas.search import open_study

    base = {"name": "s", "parent": "x", "budget": {"fraction": 0.5}, "axes": {}}
    (tmp_path / "s").mkdir()  # the run folder, which `nas search` makes
    open_study(parse_space({**base, "search": {"objectives": ["val_loss", "latency_ms"]}}), tmp_path)
    for objectives in (["val_loss"], ["val_loss", "memory_bytes"]):
        with pytest.raises(ConfigError, match="another study_name"):
            open_study(parse_space({**base, "search": {"objectives": objectives}}), tmp_path)
    assert open_study(parse_space({**base, "search": {"objectives": ["val_loss", "latency_ms"]}}), tmp_path)
