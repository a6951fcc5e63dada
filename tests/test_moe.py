"""Mixtures of experts (nas/blocks/moe.py) against their stock HF models: keep-all pruning is the parent, experts
the router never picks can be removed without changing the logits, a child cut on every axis (experts, top-k,
expert and shared widths, heads, hidden, depth) is a stock checkpoint, total and active counts are the built
model's, streamed pruning (per-expert and MXFP4 checkpoints) is bit-identical, and the plan's traced layer is a
real one's saved bytes."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import MOE_CONFIGS, tiny_model
from test_families import assert_streamed_equals_in_memory, assert_two_fsdp_workers_reproduce_one, \
    pruned_and_reloaded
from test_plan import _real_saved_bytes
from nas.architecture import Architecture
from nas.cli import main
from nas.errors import ConfigError, UnsupportedModelError
from nas.families import Parent, family_of
from nas.importance import EXPERT_SCORES, ImportanceSettings, compute_importance
from nas.plan import layer_kinds, saved_bytes_per_layer
from nas.prune import prune, prune_checkpoint
from nas.space import architecture_of, enumerate_candidates, parse_space

FAMILIES = sorted(MOE_CONFIGS)
TOKENS = torch.randint(3, 320, (4, 24), generator=torch.Generator().manual_seed(0))


def _importances(model, tokens=TOKENS):
    return compute_importance(model, tokens, ImportanceSettings(drop_samples=2, batch_size=4))


def _cut(config) -> Architecture:
    """Every axis cut: half the experts, top-1, half the expert width, the shared expert and the dense MLPs
    narrower, heads and KV heads halved, hidden narrower (OLMoE: to the kept heads' width), one layer dropped
    (keeping a dense layer where the family has one)."""
    parent = Parent.of(config)
    moe = parent.family.moe
    changes = {moe.count_key: 4, "num_experts_per_tok": 1, moe.width_key: 12, "num_attention_heads": 3,
               "num_key_value_heads": 1, "hidden_size": 24 if parent.family.attention.q_norm_is_hidden else 36}
    if moe.width_key != "intermediate_size":
        changes["intermediate_size"] = 40
    if moe.shared_key:
        changes[moe.shared_key] = 20
    return parent.architecture.replace(**changes, num_hidden_layers=3, layers=(0, 1, 3))


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _routers(model):
    moe = family_of(model.config).moe
    return {i: getattr(layer.mlp, moe.router) for i, layer in enumerate(model.model.layers)
            if family_of(model.config).is_sparse(model.config, i)}


@pytest.mark.parametrize("name", FAMILIES)
def test_keep_all_equals_the_parent_with_and_without_a_cache(name):
    parent = tiny_model(name)
    child = prune(parent, _importances(parent), Parent.of(parent.config).architecture)
    assert _rel(_logits(child), _logits(parent)) < 1e-5
    with torch.no_grad():
        steps = [m(input_ids=TOKENS[:, 16:17], cache=m(input_ids=TOKENS[:, :16], use_cache=True).past_key_values,
                   use_cache=True).logits for m in (parent, child)]
    assert _rel(steps[1], steps[0]) < 1e-5
    assert _rel(steps[0], _logits(parent, TOKENS[:, :17])[:, 16:17]) < 1e-4  # the cache is really read


@pytest.mark.parametrize("name", FAMILIES)
def test_removing_experts_the_router_never_picks_leaves_the_logits_equal(name):
    """Two experts of every sparse layer get router rows whose logit is -30 on every test token (a least-squares
    solution on the router's recorded inputs: 40 tokens in 48 dimensions fit exactly), checked never to be picked;
    the others get random logits, so that each is picked.
    Importance scores exactly the experts no token reached zero by every measure, and the child without the planted
    ones gives the parent's logits: the kept experts' router logits are unchanged, and the removed ones' softmax
    share was e^-30."""
    tokens = TOKENS[:2, :20]
    parent = tiny_model(name)
    routers, planted = _routers(parent), [1, 5]
    targets = torch.randn(tokens.numel(), 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    targets[:, planted] = -30
    for i, router in routers.items():  # in layer order: each router's inputs follow the routers before it
        inputs: list[torch.Tensor] = []
        handle = router.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].reshape(
            -1, args[0].shape[-1]).detach()))
        _logits(parent, tokens)
        handle.remove()
        # Rows that give these logits on every test token: random ones for the kept experts (each gets picked),
        # -30 for the planted ones.
        rows = torch.linalg.lstsq(inputs[0].double(), targets).solution.T
        with torch.no_grad():
            router.weight.copy_(rows.float())
            if getattr(router, "bias", None) is not None:
                router.bias.zero_()
    picked: dict[int, set[int]] = {i: set() for i in routers}
    handles = [r.register_forward_hook(lambda _m, _a, out, i=i: picked[i].update(out[2].flatten().tolist()))
               for i, r in routers.items()]
    reference = _logits(parent, tokens)
    for h in handles:
        h.remove()
    importances = _importances(parent, tokens)
    for i in routers:
        assert picked[i] == set(range(8)) - set(planted), i  # every other expert is picked at least once
        for score in EXPERT_SCORES:
            assert set(importances.experts[score][i].nonzero().flatten().tolist()) == picked[i], (score, i)
    count_key = family_of(parent.config).moe.count_key
    child = prune(parent, importances, Parent.of(parent.config).architecture.replace(**{count_key: 6}))
    assert getattr(child.config, count_key) == 6
    assert _rel(_logits(child, tokens), reference) < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_a_dead_expert_and_a_dead_expert_neuron_score_lowest(name):
    """An expert whose down projection is zero adds nothing (lowest by output and weighted norm); a neuron whose
    gate and up rows are zero never activates (lowest of its expert)."""
    parent = tiny_model(name)
    moe = family_of(parent.config).moe
    i = next(iter(_routers(parent)))
    experts = parent.model.layers[i].mlp.experts
    width = getattr(parent.config, moe.width_key)
    with torch.no_grad():
        experts.down_proj[3] = 0
        if moe.layout == "stacked":
            experts.gate_up_proj[2, [7, width + 7]] = 0
        else:
            experts.gate_up_proj[2, :, [14, 15]] = 0
            experts.gate_up_proj_bias[2, [14, 15]] = 0
            experts.down_proj_bias[3] = 0
    importances = _importances(parent)
    for score in ("output", "weighted"):
        assert int(importances.experts[score][i].argmin()) == 3
    assert int(importances.expert_neurons[i, 2].argmin()) == 7


@pytest.mark.parametrize("name", FAMILIES)
def test_a_child_cut_on_every_axis_reloads_as_stock_and_generates(name, tmp_path):
    parent = tiny_model(name)
    arch = _cut(parent.config)
    child, reloaded = pruned_and_reloaded(parent, _importances(parent), arch, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in arch.to_dict() if k != "layers"} == {k: v for k, v in arch.to_dict().items()
                                                                      if k != "layers"}
    # Each kept layer keeps its kind: dense where the parent layer was dense.
    family = family_of(parent.config)
    assert [family.is_sparse(reloaded.config, j) for j in range(3)] == \
        [family.is_sparse(parent.config, i) for i in arch.layers]
    torch.testing.assert_close(_logits(reloaded), _logits(child), rtol=0, atol=0)
    out = reloaded.generate(TOKENS[:1, :8], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)


@pytest.mark.parametrize("name", FAMILIES)
def test_total_and_active_parameter_counts_equal_the_built_models(name):
    """Active: the parameters one token multiplies, counted on the model by the experts it is routed to (top-k
    of each sparse layer's experts) and everything else."""
    parent = tiny_model(name)
    for model in (parent, prune(parent, _importances(parent), _cut(parent.config))):
        p = Parent.of(model.config)
        total = sum(t.numel() for t in model.parameters())
        assert p.num_parameters() == total
        unused = 0
        for i, layer in enumerate(model.model.layers):
            if p.family.is_sparse(model.config, i):
                experts = layer.mlp.experts
                per_expert = sum(t[0].numel() for t in experts.parameters())
                unused += (experts.num_experts - model.config.num_experts_per_tok) * per_expert
        assert p.active_parameters() == total - unused < total


@pytest.mark.parametrize("name", FAMILIES)
def test_streamed_pruning_is_bit_identical_to_in_memory(name, tmp_path):
    """Per-expert checkpoints (Mixtral's own names) stacked when read and split when written."""
    parent = tiny_model(name)
    assert_streamed_equals_in_memory(parent, _importances(parent), _cut(parent.config), tmp_path)


def test_an_mxfp4_gpt_oss_checkpoint_is_dequantised_on_load_and_when_streamed(tmp_path, tiny_tokenizer):
    """gpt-oss publishes its experts in MXFP4 (`_blocks` of packed 4-bit values, `_scales` of exponents). A tiny
    checkpoint in that form, with random codes: `nas` loads it dequantised as transformers does, and streamed
    pruning, which dequantises each layer's blocks itself, gives the in-memory child."""
    from safetensors.torch import load_file, save_file

    from nas.parents import load_parent

    folder = tmp_path / "parent"
    config = MOE_CONFIGS["gpt_oss"]()
    config.hidden_size, config.intermediate_size = 64, 32  # MXFP4 packs rows in blocks of 32 values
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = state.pop(key).shape  # stored as [E, out, in / 32, 16] bytes
        state[f"{key}_blocks"] = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), dtype=torch.uint8,
                                               generator=g)
        state[f"{key}_scales"] = torch.randint(122, 130, (experts, outputs, inputs // 32), dtype=torch.uint8,
                                               generator=g)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    model, _ = load_parent(str(folder), torch.device("cpu"), torch.float32)
    for key, tensor in model.state_dict().items():
        assert torch.equal(reference[key], tensor), key
    assert model.model.layers[0].mlp.experts.gate_up_proj.abs().sum() > 0
    importances, arch = _importances(model), _cut(model.config)
    expected = prune(model, importances, arch).state_dict()
    prune_checkpoint(folder, importances, arch, tmp_path / "child")
    assert "quantization_config" not in json.loads((tmp_path / "child" / "config.json").read_text())
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "child", dtype=torch.float32).state_dict()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("name", FAMILIES)
def test_planned_activations_equal_a_real_layers_saved_bytes(name):
    """Each kind of layer (a dense one and a sparse one where the family mixes them; sliding and full attention)
    traced on the meta device saves what the real layer saves."""
    config = MOE_CONFIGS[name]()
    kinds = layer_kinds(config)
    assert any(family_of(config).is_sparse(config, i) for i in kinds)
    assert len(kinds) == {"qwen3_moe": 2, "qwen2_moe": 2, "gpt_oss": 2}.get(name, 1)
    for i in kinds:
        assert saved_bytes_per_layer(config, 3, 24, torch.float32, i) == _real_saved_bytes(config, 3, 24, i), i


def test_the_plans_stand_in_for_grouped_mm_holds_in_its_own_thread_only():
    """While the plan traces a layer on the meta device (its stand-in for the experts' grouped products entered),
    a model running in another thread computes its real experts: the stand-in is not process-wide."""
    import threading

    from nas.plan import _grouped_mm_on_meta

    model = tiny_model("qwen3_moe")
    reference = _logits(model)
    entered, done = threading.Event(), threading.Event()

    def trace():
        with _grouped_mm_on_meta():
            entered.set()
            done.wait(60)

    tracer = threading.Thread(target=trace)
    tracer.start()
    try:
        assert entered.wait(60)
        assert torch.equal(_logits(model), reference)
    finally:
        done.set()
        tracer.join()


@pytest.mark.parametrize("name", FAMILIES)
def test_each_expert_computed_for_scoring_is_the_experts_modules_own(name):
    """Scoring runs one expert at a time (`expert_forward`; gpt-oss's activation through transformers' private
    `_apply_gate`): on tokens all routed to one expert at weight 1, it gives the experts module's own output."""
    model = tiny_model(name)
    i = next(iter(_routers(model)))
    experts = model.model.layers[i].mlp.experts
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = experts(x, torch.full((5, 1), 3), torch.ones(5, 1))
        *_, ours = family_of(model.config).moe.expert_forward(experts, 3, x)
    assert torch.allclose(ours, own, atol=1e-5), \
        f"{type(experts).__name__}: nas's expert_forward no longer computes an expert as transformers does (its " \
        f"layout, or gpt-oss's private _apply_gate, changed)"


def test_the_experts_call_is_read_by_its_parameter_names():
    """Scoring reads the experts' call (tokens, picked experts, weights) by the forward's parameter names: a forward
    taking them in another order is read right, one naming them otherwise is refused in one line."""
    model = tiny_model("qwen3_moe")
    block = model.model.layers[0].mlp
    stock = type(block.experts)
    seen = []
    hooks = family_of(model.config).moe.hooks(block, lambda e, w, *_: seen.append((e, w.tolist())))
    x = torch.randn(2, model.config.hidden_size)
    index, weights = torch.tensor([[1, 4], [4, 6]]), torch.tensor([[0.7, 0.3], [0.6, 0.4]])

    class Reordered(stock):
        def forward(self, top_k_weights, hidden_states, top_k_index):
            return super().forward(hidden_states, top_k_index, top_k_weights)

    class Renamed(stock):
        def forward(self, tokens, picked, weights):
            return super().forward(tokens, picked, weights)

    try:
        block.experts.__class__ = Reordered
        with torch.no_grad():
            block.experts(weights, x, index)
        assert sorted(seen) == [(1, pytest.approx([0.7])), (4, pytest.approx([0.3, 0.6])), (6, pytest.approx([0.4]))]
        block.experts.__class__ = Renamed
        with pytest.raises(UnsupportedModelError, match=r"Renamed.forward takes \(tokens, picked, weights\); .*"
                                                       r"\(hidden_states, top_k_index, top_k_weights\)"):
            with torch.no_grad():
                block.experts(x, index, weights)
    finally:
        block.experts.__class__ = stock
        for hook in hooks:
            hook.remove()


def test_mxfp4_experts_are_dequantised_as_the_format_says():
    """Streamed pruning dequantises gpt-oss's MXFP4 experts with transformers' private
    `convert_moe_packed_tensors`: each byte of `_blocks` holds two FP4 (e2m1) codes, low nibble first, a block of 32
    values shares the exponent `_scales` - 127, and the stored [E, out, in] comes back as [E, in, out]."""
    fp4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 3, 2, 16), dtype=torch.uint8, generator=g)  # 2 experts, 3 rows, 64 inputs
    scales = torch.randint(120, 134, (2, 3, 2), dtype=torch.uint8, generator=g)
    expected = torch.tensor([[[fp4[(int(blocks[e, r, k // 32, k % 32 // 2]) >> 4 * (k % 2)) & 15] *
                               2.0 ** (int(scales[e, r, k // 32]) - 127) for r in range(3)] for k in range(64)]
                             for e in range(2)])
    name = "model.layers.0.mlp.experts.down_proj"
    stored = {f"{name}_blocks": blocks, f"{name}_scales": scales}

    class Read(dict):
        def __call__(self, name):
            return self[name]

    moe = family_of(MOE_CONFIGS["gpt_oss"]()).moe
    got = moe.read_stored(name, Read(stored), 2, torch.float32)
    assert torch.equal(got, expected), "transformers' private convert_moe_packed_tensors no longer dequantises MXFP4 " \
                                       "as the format says"


def test_the_router_load_balancing_loss_is_kept_as_the_config_asks_and_logged(tmp_path):
    """With `output_router_logits` the student's loss adds `router_aux_loss_coef` x the router's load-balancing
    loss, as HF's own forward with labels does; without it the loss is KD alone."""
    from nas.distill import DistillConfig, Distiller

    teacher = tiny_model("qwen3_moe")
    student = prune(teacher, _importances(teacher), _cut(teacher.config))
    cfg = DistillConfig(tokens=4 * 24, batch_size=4, checkpoint_every=0)
    plain = Distiller(student, teacher, TOKENS, TOKENS[:2], tmp_path / "a", cfg).loss(torch.arange(4))
    assert "router_aux" not in plain
    student.config.output_router_logits = True
    parts = Distiller(student, teacher, TOKENS, TOKENS[:2], tmp_path / "b", cfg).loss(torch.arange(4))
    with torch.no_grad():
        hf = student(input_ids=TOKENS, output_router_logits=True)
    torch.testing.assert_close(parts["router_aux"].detach(), hf.aux_loss)  # HF's own, on the same tokens
    torch.testing.assert_close(parts["loss"].detach(), plain["loss"].detach() + 0.01 * hf.aux_loss)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_cli_arch_importance_prune_and_candidates(name, tmp_path, tiny_tokenizer, text_file, capsys):
    """The Bar: `nas arch` (the expert axes under the family's keys), `nas importance`, `nas prune` keep-all (the
    parent) and with half the experts and a narrower expert width (a stock checkpoint whose config.json holds the
    new count), and `nas candidates` on an MoE space printing total and active parameters."""
    parent = tiny_model(name)
    parent.save_pretrained(tmp_path / "parent")
    tiny_tokenizer.save_pretrained(tmp_path / "parent")
    p = str(tmp_path / "parent")
    moe = family_of(parent.config).moe
    assert main(["arch", "--parent", p, "--out", str(tmp_path / "keep.json")]) == 0
    keep = json.loads(capsys.readouterr().out)
    assert keep[moe.count_key] == 8 and keep["num_experts_per_tok"] == 2 and keep[moe.width_key] == 24
    imp = str(tmp_path / "imp.safetensors")
    assert main(["importance", "--parent", p, "--data", str(text_file), "--seq-len", "32", "--samples", "8",
                 "--drop-samples", "2", "--out", imp, "--device", "cpu"]) == 0
    assert main(["prune", "--parent", p, "--arch", str(tmp_path / "keep.json"), "--importance", imp,
                 "--out", str(tmp_path / "same")]) == 0
    same = AutoModelForCausalLM.from_pretrained(tmp_path / "same").eval()
    assert _rel(_logits(same), _logits(parent)) < 1e-5
    cut = {**keep, moe.count_key: 4, moe.width_key: 12}
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    assert main(["prune", "--parent", p, "--arch", str(tmp_path / "cut.json"), "--importance", imp,
                 "--out", str(tmp_path / "cut")]) == 0
    saved = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert saved[moe.count_key] == 4 and saved[moe.width_key] == 12
    child = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").eval()
    assert child.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 24, 48)
    assert child.generate(TOKENS[:1, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                          pad_token_id=0).shape == (1, 12)
    capsys.readouterr()
    space = {"name": "moe", "parent": p, "budget": {"fraction": 0.75, "tolerance": 0.35, "kind": "active"},
             "axes": {"num_experts": [4, 8], "num_experts_per_tok": [1, 2], moe.width_key: [12, 24]}}
    (tmp_path / "space.yaml").write_text(json.dumps(space))
    assert main(["candidates", str(tmp_path / "space.yaml")]) == 0
    out = capsys.readouterr().out
    assert "params" in out.splitlines()[1] and "active_params" in out.splitlines()[1]
    rows = enumerate_candidates(parse_space(space), parent.config)
    assert rows and all(f"{r['params']:,}" in out and f"{r['active_params']:,}" in out for r in rows)
    assert any(r[moe.count_key] == 4 for r in rows) and any(r[moe.count_key] == 8 for r in rows)


def test_an_active_budget_counts_the_routed_experts_only():
    """Doubling the experts kept raises the total by the experts and the active count by their router rows only;
    doubling top-k raises the active count by one expert per sparse layer and leaves the total alone."""
    config = MOE_CONFIGS["qwen3_moe"]()
    p = Parent.of(config)
    base = p.architecture.replace(num_local_experts=4, num_experts_per_tok=1)
    more_experts, more_topk = base.replace(num_local_experts=8), base.replace(num_experts_per_tok=2)
    expert, sparse = 3 * config.hidden_size * config.moe_intermediate_size, 3  # layer 1 is dense
    # Four more experts: the total gains them and their router rows, the active count only the router rows.
    router_rows = 4 * config.hidden_size * sparse
    assert p.num_parameters(more_experts) - p.num_parameters(base) == 4 * expert * sparse + router_rows
    assert p.active_parameters(more_experts) - p.active_parameters(base) == router_rows
    assert p.active_parameters(more_topk) - p.active_parameters(base) == expert * sparse
    assert p.num_parameters(more_topk) == p.num_parameters(base)
    space = parse_space({"name": "s", "parent": "x", "budget": {"params": p.active_parameters(base), "tolerance": 0.01,
                                                                 "kind": "active"},
                         "axes": {"num_experts": [4, 8], "num_experts_per_tok": [1, 2]}})
    rows = enumerate_candidates(space, config)
    assert {(r["num_local_experts"], r["num_experts_per_tok"]) for r in rows} == {(4, 1), (8, 1)}


def test_expert_axes_are_refused_where_they_do_not_apply():
    with pytest.raises(ConfigError, match="axes.num_experts: not an axis of a llama parent"):
        enumerate_candidates(parse_space({"name": "s", "parent": "x", "budget": {"fraction": 0.5},
                                          "axes": {"num_experts": [4]}}), AutoConfig.for_model("llama"))
    config = MOE_CONFIGS["mixtral"]()
    space = parse_space({"name": "s", "parent": "x", "budget": {"fraction": 0.5, "tolerance": 0.5},
                         "axes": {"num_local_experts": [2], "num_experts_per_tok": [2, 4]}})
    assert {r["num_experts_per_tok"] for r in enumerate_candidates(space, config)} == {2}  # top-k <= experts kept
    with pytest.raises(ConfigError, match="name one axis"):
        parse_space({"name": "s", "parent": "x", "budget": {"fraction": 0.5},
                     "axes": {"num_experts": [4], "num_local_experts": [4]}})


@pytest.mark.parametrize("model_type, says", [("deepseek_v3", "latent attention"), ("granitemoe", "not been checked"),
                                               ("qwen3_5_moe_text", "no dense intermediate_size")])
def test_a_mixture_that_does_not_fit_is_refused_with_the_reason(model_type, says):
    with pytest.raises(UnsupportedModelError, match=says):
        family_of(AutoConfig.for_model(model_type))


@pytest.mark.slow
def test_two_fsdp_workers_reproduce_one_on_a_mixture_of_experts(tmp_path, tiny_tokenizer, ray_session):
    """FSDP2 shards the stacked experts like any parameter (dimension 0: experts) over 2 gloo workers, and the run
    equals the one-process run, with the router's load-balancing loss on (its routed shares are counted over both
    workers' tokens)."""
    parent = tiny_model("qwen3_moe")
    parent.config.output_router_logits = True
    assert_two_fsdp_workers_reproduce_one(parent, _cut(parent.config), tmp_path, tiny_tokenizer, 8,
                                          ("loss", "kd", "router_aux"))


@pytest.mark.slow
def test_a_search_over_expert_axes_records_them_and_exports_the_winner(tmp_path, tiny_tokenizer, ray_session):
    """`nas search` on a tiny Qwen3-MoE with an active budget: the expert axes are Optuna parameters under the
    family's keys, each trial records its total and active counts (those of its architecture.json), the summary
    shows both, and the exported winner is a checkpoint with its expert count."""
    import optuna

    from conftest import WIKITEXT
    from nas.search import export_best, run_search, storage_url

    parent = tiny_model("qwen3_moe")
    parent.save_pretrained(tmp_path / "parent")
    tiny_tokenizer.save_pretrained(tmp_path / "parent")
    (tmp_path / "data.txt").write_text((WIKITEXT / "valid.txt").read_text()[:120_000])
    space = parse_space({
        "name": "moe", "parent": str(tmp_path / "parent"), "data": str(tmp_path / "data.txt"), "seq_len": 32,
        "budget": {"fraction": 0.9, "tolerance": 0.12, "kind": "active"},
        "axes": {"num_experts": [4, 8], "moe_intermediate_size": [12, 24]},
        "importance": {"samples": 8},
        "short_retrain": {"tokens": 4 * 32 * 2, "batch_size": 4, "lr": 1e-3, "reports": 1},
        "full_retrain": {"tokens": 4 * 32 * 2, "batch_size": 4, "lr": 1e-3, "reports": 1},
        "promote": 1, "search": {"sampler": "grid"}, "resources": {"cpus_per_trial": 1, "max_concurrent": 2}})
    rows = enumerate_candidates(space, parent.config)
    assert {r["num_local_experts"] for r in rows} == {4, 8}
    frame = run_search(space, tmp_path / "runs", echo=lambda line: None)
    study = optuna.load_study(study_name="moe", storage=storage_url(space, tmp_path / "runs"))
    short = [t for t in study.get_trials() if t.user_attrs.get("stage") == "short_retrain"]
    assert len(short) == len(rows) and all(t.state == optuna.trial.TrialState.COMPLETE for t in short)
    p = Parent.of(parent.config)
    for t in short:
        assert {"num_local_experts", "num_experts_per_tok", "moe_intermediate_size"} <= set(t.params)
        arch = Architecture.from_dict(json.loads((tmp_path / "runs" / "moe" / t.user_attrs["label"] /
                                                  "architecture.json").read_text()))
        assert arch.get("num_local_experts") == t.params["num_local_experts"]
        assert (t.user_attrs["params"], t.user_attrs["active_params"]) == (p.num_parameters(arch),
                                                                          p.active_parameters(arch))
    assert {"params", "active_params", "num_local_experts"} <= set(frame.columns)
    best = export_best("moe", storage_url(space, tmp_path / "runs"), tmp_path / "best.json",
                       tmp_path / "winner", root=tmp_path / "runs")
    winner = AutoModelForCausalLM.from_pretrained(tmp_path / "winner")
    assert winner.config.num_experts == best["num_local_experts"] and "active_params" in best


def test_depth_on_a_parent_mixing_dense_and_sparse_layers_is_counted_by_kind():
    """Qwen3-MoE's `mlp_only_layers` makes one layer dense: a depth alone would leave a child's count to the layers
    importance keeps later, so it is refused; `kept_layers` counts each kind, and every candidate's count is then
    its child's, pruned with the layers importance picks of each kind."""
    from nas.space import kept_layers

    config = MOE_CONFIGS["qwen3_moe"]()
    space = parse_space({"name": "s", "parent": "x", "budget": {"fraction": 0.8, "tolerance": 0.3},
                         "axes": {"num_hidden_layers": [3, 4]}})
    with pytest.raises(ConfigError, match=r"give axes.kept_layers.*kinds: sparse \(3\), dense \(1\)"):
        enumerate_candidates(space, config)
    assert enumerate_candidates(space, MOE_CONFIGS["mixtral"]())  # every layer sparse: depth is an axis
    space = parse_space({"name": "s", "parent": "x", "budget": {"fraction": 0.8, "tolerance": 0.3},
                         "axes": {"kept_layers": {"sparse": [2, 3]}}})
    rows = enumerate_candidates(space, config)
    assert [(r["label"], r["num_hidden_layers"]) for r in rows] == [("L4-H6-KV2-M80-E48-X8-K2-XM24-LD1-LS3", 4),
                                                                    ("L3-H6-KV2-M80-E48-X8-K2-XM24-LD1-LS2", 3)]
    parent = tiny_model("qwen3_moe")
    importances = _importances(parent)
    for row in rows:
        layers = kept_layers(row, config, importances, "bi")
        assert 1 in layers  # the dense layer
        child = prune(parent, importances, architecture_of(row, config, layers))
        assert sum(t.numel() for t in child.parameters()) == row["params"]
