"""`nas plan` against measurements: weights, gradients and AdamW state per worker equal a real optimizer step's
tensors, activation memory traced on the meta device equals a real layer's saved tensors, the paper spaces' model
bytes follow HF's own parameter counts; a space that cannot fit gets the fix, and `nas search` refuses it before
starting anything (no run folder, no Ray)."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import ALL_CONFIGS, ROOT, TINY_CONFIGS, tiny_model, tiny_space
from nas.architecture import Architecture
from nas.cli import main
from nas.distill import DistillConfig, Distiller, uses_intermediate
from nas.families import family_of
from nas.importance import ImportanceSettings, compute_importance
from nas.parents import parent_config
from nas.plan import Cluster, one_layer_config, plan, retrain_stage, rotary_embeddings, saved_bytes, \
    saved_bytes_per_layer
from nas.prune import prune
from nas.space import RetrainSpec, architecture_of, enumerate_candidates, load_space, parse_space, space_config

PAPER_SPACES = ("llama-3.1-8b-to-4b", "nemotron-15b-to-4b", "nemotron-15b-to-8b")


def _real_saved_bytes(config, batch: int, seq_len: int, layer: int = 0) -> int:
    """Saved-for-backward bytes of the decoder layer `layer` run for real on the CPU (stock attention)."""
    one = one_layer_config(config, layer)
    model = AutoModelForCausalLM.from_config(one, dtype=torch.float32).train()
    x = torch.randn(batch, seq_len, config.hidden_size, requires_grad=True)
    positions = torch.arange(seq_len)[None].expand(batch, seq_len)
    rotary = rotary_embeddings(model.model, x, positions)
    return saved_bytes(model, lambda: model.model.layers[0](x, attention_mask=None, position_ids=positions, **rotary))


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_traced_activations_equal_a_real_layers(family):
    config = TINY_CONFIGS[family]()
    assert saved_bytes_per_layer(config, 3, 24, torch.float32) == _real_saved_bytes(config, 3, 24)


@pytest.mark.slow
def test_traced_activations_equal_a_real_layers_at_smollm2_size():
    config = parent_config("smollm2-135m")
    assert saved_bytes_per_layer(config, 2, 128, torch.float32) == _real_saved_bytes(config, 2, 128)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("family", ["llama", "llama-tied", "nemotron", "qwen3"])
@pytest.mark.parametrize("cut", ["width", "depth"])
def test_planned_weights_grads_and_adamw_equal_a_real_steps_tensors(family, cut):
    """One real KD step of a pruned child (`Distiller`, as `nas distill` and a trial run it, one worker): the bytes
    of the trained parameters, their gradients after backward, and AdamW's state after the step are what the plan
    counts from the two configs alone. "depth" drops half the layers and narrows the width, so the trained set
    includes the intermediate-state loss's projection; a tied head is one tensor."""
    parent = tiny_model(family)
    tokens = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    full = Architecture.of_config(parent.config)
    arch = full.replace(hidden_size=36, intermediate_size=40) if cut == "width" else \
        full.replace(num_hidden_layers=2, layers=(0, 3), hidden_size=36, intermediate_size=40)
    student = prune(parent, compute_importance(parent, tokens, ImportanceSettings(drop_samples=0)), arch)
    cfg = DistillConfig(tokens=4 * 32, batch_size=4, checkpoint_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        d = Distiller(student, parent, tokens, tokens[:2], tmp, cfg)
        assert (d.projection is not None) == (cut == "depth")
        student.train()
        d.loss(torch.arange(4))["loss"].backward()
        trained = list(d.trained.parameters())
        assert all(p.grad is not None for p in trained)
        weights, grads = _tensor_bytes(trained), _tensor_bytes(p.grad for p in trained)
        d.optimizer.step()
    # AdamW's exp_avg and exp_avg_sq; its per-tensor step counters are 0-d scalars, which the plan leaves out.
    adam = _tensor_bytes(v for state in d.optimizer.state.values() for v in state.values()
                         if torch.is_tensor(v) and v.dim() > 0)
    space = parse_space({"name": "x", "parent": "p", "budget": {"fraction": 0.5}, "axes": {}, "seq_len": 32})
    stage = retrain_stage("short_retrain", space, parent.config, student.config, 1, 0, False,
                          RetrainSpec(batch_size=4), cached=False, runs=1)
    assert (stage.memory["weights"], stage.memory["grads"], stage.memory["optimizer"]) == (weights, grads, adam)


def _hf_params(config) -> int:
    """What HF builds for a config: the model on the meta device (no memory), its parameters counted."""
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


@pytest.mark.parametrize("name", PAPER_SPACES)
def test_paper_spaces_plan_their_models_by_hfs_parameter_counts(name):
    """The paper spaces load and plan; their model bytes per worker are HF's parameter counts of the largest
    candidate and of the parent (built on the meta device) at the bytes the step test above measured. Whether they
    fit is left to `nas plan`: these spaces were sized with it, so "fits" would prove nothing."""
    space = load_space(ROOT / "search_spaces" / f"{name}.yaml")
    config = space_config(space)
    stages = {s.name: s for s in plan(space, config, Cluster(gpu_memory_gb=80, gpus_per_node=8))}
    assert list(stages) == ["importance", "short_retrain", "full_distillation"]
    row = enumerate_candidates(space, config)[0]  # the largest: the worst case a trial holds
    child = architecture_of(row, config, tuple(range(int(row["num_hidden_layers"]))))
    child_config = family_of(config).child_config(config, child)
    n_child, n_parent = _hf_params(child_config), _hf_params(config)
    intermediate = uses_intermediate(DistillConfig(), child.num_hidden_layers, config.num_hidden_layers)
    projection = child.hidden_size * config.hidden_size if intermediate and child.hidden_size != config.hidden_size \
        else 0
    gpu = max(space.resources.gpus_per_trial, space.resources.gpus_per_worker) > 0
    for stage_name, workers in (("short_retrain", space.resources.workers_per_trial),
                                ("full_distillation", space.full_retrain.workers)):
        memory = stages[stage_name].memory
        trained = n_child + projection
        assert (memory["weights"], memory["grads"], memory["optimizer"]) == \
            (trained * 4 // workers, trained * 4 // workers, trained * 8 // workers), stage_name
        assert memory["teacher"] == n_parent * (2 if gpu else 4) // workers, stage_name


def test_a_plan_that_cannot_fit_names_the_fix_and_the_fix_fits(tmp_path, capsys):
    spec = yaml.safe_load((ROOT / "search_spaces" / "llama-3.1-8b-to-4b.yaml").read_text())
    spec["resources"] = {"cpus_per_trial": 8, "gpus_per_trial": 1, "max_concurrent": 8}  # one GPU a trial
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(spec))
    assert main(["plan", str(tmp_path / "one.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set resources.workers_per_trial >= " in err[0]
    workers = int(err[0].split(">= ")[1].split()[0])
    spec["resources"] |= {"workers_per_trial": workers, "gpus_per_worker": 1, "max_concurrent": 1}
    spec["full_retrain"]["workers"] = 8
    stages = plan(parse_space(spec), space_config(parse_space(spec)), Cluster(gpu_memory_gb=80, gpus_per_node=8))
    assert all(s.fits for s in stages), [s.fix for s in stages]
    # A parent that does not fit one GPU's memory is spread over as many as the fix says, and no fewer
    small = Cluster(gpu_memory_gb=24, gpus_per_node=8)
    fix = plan(parse_space(spec), space_config(parse_space(spec)), small)[0].fix
    assert fix.startswith("set resources.parent_gpus >= ")
    gpus = int(fix.split(">= ")[1].split()[0])
    for n, fits in ((gpus, True), (gpus - 1, False)):
        spec["resources"]["parent_gpus"] = n
        assert plan(parse_space(spec), space_config(parse_space(spec)), small)[0].fits is fits


RAY_PROCESSES = ("raylet", "gcs_server", "plasma_store", "dashboard", "log_monitor")


def test_search_refuses_a_plan_that_cannot_fit_before_it_starts(tmp_path, tiny_tokenizer):
    """`nas search` in its own process, with a fresh, empty TMPDIR: a private Ray puts its session there
    (`init_ray`: $TMPDIR/nas-ray-<hash>; Ray's default: $TMPDIR/ray) and runs raylet and gcs_server as the CLI's
    children. With no cluster named, `nas search` checks the plan against this machine before it starts one: a
    refused search must leave neither, nor a run folder."""
    spec = tiny_space(tmp_path / "inputs", tiny_tokenizer, name="huge", seq_len=2**21,
                      short_retrain={"tokens": 4 * 2**21}, full_retrain={"tokens": 4 * 2**21})
    (tmp_path / "huge.yaml").write_text(yaml.safe_dump(spec))
    temp = Path(tempfile.mkdtemp(prefix="nas-t", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "TMPDIR": str(temp)}  # a private Ray
    with (tmp_path / "out.txt").open("w") as out, (tmp_path / "err.txt").open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "nas.cli", "search", str(tmp_path / "huge.yaml"), "--root",
                                 str(tmp_path / "runs")], cwd=ROOT, env=env, stdout=out, stderr=err)
    ray_children: set[str] = set()
    try:
        cli = psutil.Process(proc.pid)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:  # watch the CLI's children while it runs
            try:
                ray_children |= {c.name() for c in cli.children(recursive=True)
                                 if any(r in " ".join([c.name(), *c.cmdline()]) for r in RAY_PROCESSES)}
            except psutil.Error:
                pass  # a child that ended while it was looked at
            time.sleep(0.05)
        left = sorted(p.name for p in temp.iterdir())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for p in psutil.process_iter(["cmdline"]):  # whatever the CLI left running from our TMPDIR: Ray's daemons
            try:
                if str(temp) in " ".join(p.info["cmdline"] or []):
                    p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(temp, ignore_errors=True)
    err = (tmp_path / "err.txt").read_text()
    assert not ray_children, f"the refused search started Ray: {sorted(ray_children)}"
    assert not [name for name in left if name.startswith(("nas-ray-", "ray"))], f"Ray's session folder: {left}"
    assert not (tmp_path / "runs").exists()  # no run folder
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err[-3000:]
    assert "does not fit: " in lines[0] and "GiB of node memory" in lines[0]


@pytest.mark.parametrize("name, kept", [("qwen3_moe", {"dense": [0]}), ("nemotron_h", {"linear_attention": [1]})])
def test_the_plan_trains_the_largest_candidates_child(name, kept):
    """Where the parent's layers differ in size by kind, the largest candidate keeps its own count of each kind: the
    plan's trained parameters are those of the child a trial builds (pruned with the layers importance keeps of
    each kind), not of the parent's first layers (here: a dense layer, or a second recurrent one, instead)."""
    from nas.families import Parent
    from nas.space import kept_layers

    parent = tiny_model(name)
    config = parent.config
    space = parse_space({"name": "s", "parent": "x", "seq_len": 32, "budget": {"fraction": 0.9, "tolerance": 0.3},
                         "axes": {"kept_layers": kept}})
    row = enumerate_candidates(space, config)[0]
    tokens = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    importances = compute_importance(parent, tokens, ImportanceSettings(drop_samples=0))
    layers = kept_layers(row, config, importances, "bi")
    first = architecture_of(row, config, tuple(range(len(layers))))
    assert Parent.of(config).num_parameters(first) != row["params"]  # the parent's first layers would differ
    child = prune(parent, importances, architecture_of(row, config, layers))
    n = sum(p.numel() for p in child.parameters())
    stages = {s.name: s for s in plan(space, config, Cluster())}
    for stage in ("short_retrain", "full_distillation"):  # one worker each; the child is as wide as the parent
        assert stages[stage].memory["weights"] == 4 * n, stage


def _attended(config, seq_len: int) -> int:
    """(head, query, key) pairs attended in a forward of `seq_len` tokens, over all layers: the nonzero attention
    weights HF's own eager attention returns (masked keys get exactly 0)."""
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=torch.randint(3, 320, (1, seq_len)), output_attentions=True)
    return sum(int((a[0] != 0).sum()) for a in out.attentions)


@pytest.mark.parametrize("seq_len", [32, 6])
def test_planned_flops_count_the_keys_each_layer_attends(seq_len):
    """A sliding-window layer attends min(window, position) keys, a full one every earlier key: the planned FLOPs a
    token are 2 per parameter it multiplies and 4 per attended key and head channel (QK^T and AV, 2 FLOPs a MAC),
    counted against the attention weights of HF's own model (Gemma 3: window 8, sliding and full layers)."""
    from conftest import FAMILY_CONFIGS
    from nas.plan import forward_flops_per_token

    config = FAMILY_CONFIGS["gemma3_text"]()
    assert config.tie_word_embeddings  # the embedding multiplies once, as the LM head
    model = AutoModelForCausalLM.from_config(config)
    multiplied = sum(p.numel() for p in model.parameters())
    expected = 2 * multiplied + 4 * config.head_dim * _attended(config, seq_len) / seq_len
    assert forward_flops_per_token(config, seq_len) == pytest.approx(expected, rel=1e-12)


def _per_layer_child(name: str, alternate: bool):
    """(parent config, per-layer child config): the mixed child, or one whose layers alternate an attention-free and
    an MLP-free layer (two distinct shapes)."""
    from conftest import mixed_child
    from nas.architecture import LayerShape
    from nas.families import Parent

    parent = Parent.of(ALL_CONFIGS[name]())
    arch = mixed_child(parent.architecture)
    if alternate:
        arch = arch.replace(per_layer=(LayerShape(0, 80), LayerShape(2, 0)) * 2)
    return parent.config, parent.child_config(arch)


@pytest.mark.parametrize("name", ["llama", "qwen3", "nemotron", "gemma3_text"])
@pytest.mark.parametrize("alternate", [False, True])
def test_a_per_layer_childs_plan_follows_each_layers_shape(name, alternate, monkeypatch):
    """A per-layer child's planned activations are the saved tensors of each of its layers, built by nas's loader
    and run for real (an attention-free layer saves no attention, an MLP-free one no MLP), traced once a distinct
    layer shape; its weights are the built model's parameters."""
    import nas.plan
    from nas.loader import build

    config, child = _per_layer_child(name, alternate)
    batch, seq_len = 3, 24
    model = build(child, torch.float32).train()
    x = torch.randn(batch, seq_len, child.hidden_size, requires_grad=True)
    positions = torch.arange(seq_len)[None].expand(batch, seq_len)
    rotary = rotary_embeddings(model.model, x, positions)
    real = [saved_bytes(model, lambda: layer(x, attention_mask=None, position_ids=positions, **rotary))
            for layer in model.model.layers]
    traced = []
    trace = nas.plan.saved_bytes_per_layer
    monkeypatch.setattr(nas.plan, "saved_bytes_per_layer", lambda *a: traced.append(a[-1]) or trace(*a))
    space = parse_space({"name": "x", "parent": "p", "budget": {"fraction": 0.5}, "axes": {}, "seq_len": seq_len})
    stage = retrain_stage("short_retrain", space, config, child, 1, 0, False, RetrainSpec(batch_size=batch),
                          cached=False, runs=1)
    outside = 3 * batch * seq_len * child.hidden_size * 4  # embedding output, final norm's input and output
    assert stage.memory["activations"] == sum(real) + outside
    assert len(traced) == (2 if alternate else 4)
    assert stage.memory["weights"] == 4 * sum(p.numel() for p in model.parameters())
    # On two workers FSDP2 holds two layers of each model whole: the child's largest built layer, the parent's.
    two = retrain_stage("short_retrain", space, config, child, 2, 0, False, RetrainSpec(batch_size=2 * batch),
                        cached=False, runs=1)
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config)
    def size(module):
        return sum(p.numel() for p in module.parameters())

    def root(built):  # the embedding and a separate LM head
        return size(built) - size(built.model.layers) - size(built.model.norm)

    largest = max(size(layer) for layer in model.model.layers)
    assert two.memory["fsdp_unsharded"] == \
        root(model) * (4 + 4) + root(teacher) * 4 + 2 * (largest * 4 + size(teacher.model.layers[0]) * 4)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_a_per_layer_childs_planned_flops_attend_only_in_its_attention_layers(name):
    """2 FLOPs a multiplied parameter of the model nas's loader builds (all but the untied embedding), plus 4 per
    attended key and head channel in the layers that have attention (causal: (seq_len + 1) / 2 keys a token)."""
    from nas.loader import build
    from nas.plan import forward_flops_per_token

    _, child = _per_layer_child(name, alternate=False)
    model = build(child, torch.float32)
    multiplied = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    attention = sum(layer.self_attn is not None for layer in model.model.layers)
    assert attention == 3
    seq_len = 32
    expected = 2 * multiplied + 4 * child.num_attention_heads * child.head_dim * attention * (seq_len + 1) / 2
    assert forward_flops_per_token(child, seq_len) == pytest.approx(expected, rel=1e-12)


def test_retrains_ask_for_the_gpus_their_plan_counted(tmp_path, tiny_tokenizer, monkeypatch, without_ray):
    """A retrain on several workers asks Ray Train for the GPUs per worker that `nas plan` counted (and sized its
    memory by): a trial's take `gpus_per_trial` each when `gpus_per_worker` is unset, a promotion's the larger of
    the two. Not, as they did, `gpus_per_worker` alone: a promotion over 4 GPUs after 1-GPU trials ran on the CPU."""
    from nas.search import prepare, promote, replay_trial

    class Asked(Exception):
        pass

    asked = []

    def run_on_workers(job, workers, gpus_per_worker=0, *args, **kwargs):
        asked.append((workers, gpus_per_worker))
        raise Asked  # what it would be given is all this test needs

    monkeypatch.setattr("nas.search.trials.run_on_workers", run_on_workers)
    for n, resources in enumerate(({"gpus_per_trial": 1}, {"gpus_per_trial": 1, "gpus_per_worker": 2},
                                   {"gpus_per_trial": 2, "gpus_per_worker": 1})):
        space = parse_space(tiny_space(tmp_path, tiny_tokenizer, name=f"gpus{n}", full_retrain={"workers": 4},
                                       resources={**resources, "workers_per_trial": 2}))
        stages = {s.name: s for s in plan(space, parent_config(space.parent))}
        shared = prepare(space, tmp_path / "runs")
        label = next(iter(shared.rows))
        asked.clear()
        for retrain in (replay_trial, promote):
            with pytest.raises(Asked):
                retrain(shared, label)
        assert asked == [(2, stages["short_retrain"].gpus_per_worker),
                         (4, stages["full_distillation"].gpus_per_worker)], resources
