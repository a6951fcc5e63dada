"""What only a GPU runs (`pytest -m gpu`; skipped without CUDA, see conftest): the chunked losses on CUDA against
the CPU, importance of a parent spread by `device_map` over the GPU and the CPU, latency measured on the GPU, the
KD loop under FSDP2 over NCCL with bf16 compute, and a tiny search whose trials train on the GPU in bf16.

Each is sized to take seconds to a minute or two on one H100 (scripts/gpu_check.sh runs them all)."""

import json
import math
import sys

import pytest
import torch

from conftest import tiny_model
from nas import losses

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _register_for_ray_workers():
    # Ray workers cannot import tests/: the search test's trial function travels by value.
    import ray.cloudpickle as cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _apart(got: torch.Tensor, want: torch.Tensor) -> float:
    """How far `got` is from `want`, relative to `want`'s size (one number for a whole gradient)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm())


# -- the chunked losses ------------------------------------------------------------------------------------------

def _loss_inputs(kd: str, cached: bool, ce_weight: float, t: float):
    """A batch with a ragged last chunk, its mask, the teacher's hidden states and head (online KD) or its fp16
    top-K log-probabilities and int32 ids (the teacher cache's dtypes), all on the CPU in fp32."""
    g = torch.Generator().manual_seed(0)
    b, s, d, v = 2, 40, 64, 1000
    hidden = torch.randn(b, s, d, generator=g)
    head = torch.randn(v, d, generator=g) * 0.1
    teacher_hidden, teacher_head = torch.randn(b, s, 96, generator=g), torch.randn(v, 96, generator=g) * 0.1
    mask = torch.rand(b, s, generator=g) > 0.2
    tokens = torch.randint(0, v, (b, s), generator=g)
    top = torch.log_softmax(teacher_hidden @ teacher_head.T / t, -1).topk(50, -1) if cached else None
    targets = dict(kd=kd, temperature=t, ce_weight=ce_weight, labels=tokens.roll(-1, 1),
                   teacher_hidden=None if cached else teacher_hidden, teacher_head=None if cached else teacher_head,
                   topk_logprobs=top.values.half() if cached else None,
                   topk_index=top.indices.int() if cached else None)
    return hidden, head, mask, targets


def _losses_on(device: torch.device, hidden, head, mask, targets: dict, dtype=torch.float32, autocast=False):
    """(loss, parts, d loss / d hidden, d loss / d head) of `logit_losses` with the inputs moved to `device`; the
    student's in `dtype`, the teacher's in bf16 under autocast (a bf16 parent, as trials load it)."""
    hidden = hidden.to(device, dtype).requires_grad_()
    head = head.to(device, dtype).requires_grad_()
    teacher_dtype = torch.bfloat16 if autocast else torch.float32
    moved = {k: (v.to(device, teacher_dtype) if k.startswith("teacher_") else v.to(device)) if torch.is_tensor(v)
             else v for k, v in targets.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        parts = losses.logit_losses(hidden, head, mask.to(device), losses.LogitTargets(**moved), chunk_tokens=24)
    grads = torch.autograd.grad(parts["loss"], (hidden, head))
    return parts, grads


@pytest.mark.parametrize("kd,cached,ce_weight,t", [("forward", False, 0.0, 1.0), ("reverse", False, 0.0, 2.0),
                                                   ("forward", True, 0.0, 1.0), ("forward", False, 0.5, 1.0),
                                                   ("forward", True, 0.3, 1.5)])
def test_chunked_losses_on_cuda_equal_the_cpu(kd, cached, ce_weight, t):
    """The chunked head loss and its gradients on CUDA against the same on the CPU: in fp32 to float tolerance; in
    bf16, as the KD loop runs (fp32 master weights under bf16 autocast, and bf16 weights as FSDP2 computes with
    them), within bf16's precision, the gradients in their inputs' dtypes."""
    inputs = _loss_inputs(kd, cached, ce_weight, t)
    cpu, (cpu_hidden, cpu_head) = _losses_on(torch.device("cpu"), *inputs)
    fp32, (hidden, head) = _losses_on(CUDA, *inputs)
    assert float(fp32["loss"]) == pytest.approx(float(cpu["loss"]), rel=1e-5)
    assert _apart(hidden, cpu_hidden) < 1e-5 and _apart(head, cpu_head) < 1e-5
    assert set(fp32) == set(cpu)
    for dtype in (torch.float32, torch.bfloat16):
        mixed, (hidden, head) = _losses_on(CUDA, *inputs, dtype=dtype, autocast=True)
        assert hidden.dtype == head.dtype == dtype and hidden.device.type == "cuda"
        assert math.isfinite(float(mixed["loss"]))
        assert float(mixed["loss"]) == pytest.approx(float(cpu["loss"]), rel=1e-2)
        for part in ("kd", "ce"):
            if part in cpu:
                assert float(mixed[part]) == pytest.approx(float(cpu[part]), rel=1e-2), part
        assert _apart(hidden, cpu_hidden) < 2e-2 and _apart(head, cpu_head) < 2e-2


# -- importance of a parent spread over the GPU and the CPU ------------------------------------------------------

def test_importance_with_a_device_map_equals_the_cpu_scores(tmp_path, tiny_tokenizer):
    """A parent placed by `device_map` half on cuda:0 and half offloaded to the CPU (run on the GPU a module at a
    time) scores as the whole parent does on the CPU; the search's own placement ("auto", bf16) ranks as fp32 does."""
    from nas.importance import ImportanceSettings, compute_importance, input_device, lm_loss
    from nas.parents import load_parent

    tiny_model("llama").save_pretrained(tmp_path / "parent")
    tiny_tokenizer.save_pretrained(tmp_path / "parent")
    parent = str(tmp_path / "parent")
    tokens = torch.randint(0, 320, (6, 16), generator=torch.Generator().manual_seed(5))
    settings = ImportanceSettings(drop_samples=3, block_sizes=(2,))
    whole, _ = load_parent(parent, torch.device("cpu"))
    want = compute_importance(whole, tokens, settings)

    placement = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                 "model.layers.2": 0, "model.layers.3": "cpu", "model.norm": 0, "lm_head": "cpu"}
    spread, _ = load_parent(parent, CUDA, dtype=torch.float32, device_map=placement,
                            offload_folder=tmp_path / "offload")
    assert input_device(spread).type == "cuda"
    assert spread.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    assert spread.model.layers[1].mlp.up_proj.weight.device.type != "cuda"  # on the CPU until its forward
    got = compute_importance(spread, tokens, settings)
    for name in ("hidden", "heads", "neurons", "layer_bi"):
        assert getattr(got, name).device.type == "cpu"
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5, msg=name)
    for k in want.block_loss:
        torch.testing.assert_close(got.block_loss[k], want.block_loss[k], rtol=1e-4, atol=1e-5)
    assert got.base_loss == pytest.approx(want.base_loss, rel=1e-4)
    assert lm_loss(spread, tokens) == pytest.approx(lm_loss(whole, tokens), rel=1e-4)

    auto, _ = load_parent(parent, CUDA, device_map="auto", offload_folder=tmp_path / "offload-auto")
    assert {(p.device.type, p.dtype) for p in auto.parameters()} == {("cuda", torch.bfloat16)}
    bf16 = compute_importance(auto, tokens, settings)
    ranks = lambda t: t.flatten().argsort().argsort().double()  # noqa: E731
    for name in ("hidden", "heads", "neurons"):
        a, b = getattr(want, name), getattr(bf16, name)
        assert b.dtype == torch.float32 and torch.isfinite(b).all(), name
        assert torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1] > 0.9, name
    assert bf16.base_loss == pytest.approx(want.base_loss, rel=2e-2)


# -- latency -----------------------------------------------------------------------------------------------------

def test_latency_measured_on_the_gpu():
    """Two shapes timed on the GPU in bf16 (each compiled by transformers on first use): a one-layer toy, and a
    model whose weights read per token (~4 GB: four wide layers and a 262k-token head) take over a millisecond at
    the GPU's bandwidth. The figures are positive and consistent, named for this GPU, and the large one is slower."""
    from transformers import LlamaConfig

    from nas.latency import SpeedSettings, measure

    settings = SpeedSettings(device="cuda", dtype="bfloat16", context=128, batch=1, decode_tokens=16, warmup=1,
                             repeats=5)
    small = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    large = LlamaConfig(vocab_size=262_144, hidden_size=4096, intermediate_size=14_336, num_hidden_layers=4,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=256)
    timed = {}
    for name, config in (("small", small), ("large", large)):
        timed[name] = figures = measure(config.to_dict(), settings)
        assert figures["device_name"] == torch.cuda.get_device_properties(0).name
        assert figures["latency_ms"] > 0 and figures["prefill_ms"] > 0
        low, high = figures["latency_ms_spread"]
        assert low <= figures["latency_ms"] <= high
        assert figures["throughput"] == pytest.approx(1000 / figures["latency_ms"])
        torch.cuda.empty_cache()
    assert timed["large"]["latency_ms"] > timed["small"]["latency_ms"], timed
    assert timed["large"]["throughput"] < timed["small"]["throughput"]


# -- the KD loop under FSDP2 over NCCL -----------------------------------------------------------------------------

TRAIN = torch.randint(0, 320, (12, 16), generator=torch.Generator().manual_seed(2))
VAL = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(3))


def _cuda_pair():
    """A bf16 parent on the GPU (as a trial loads it) and a child of half its layers and a narrower hidden size (so
    that the intermediate-state loss and its projection take part), pruned from it and made fp32 master weights
    (as a trial makes it)."""
    from nas.architecture import Architecture
    from nas.importance import ImportanceSettings, compute_importance
    from nas.prune import prune

    parent = tiny_model("llama")
    scores = compute_importance(parent, TRAIN, ImportanceSettings(drop_samples=0))
    teacher = parent.to(CUDA, torch.bfloat16)
    arch = Architecture.of_config(teacher.config).replace(num_hidden_layers=2, layers=(0, 3), hidden_size=36,
                                                          intermediate_size=40)
    return prune(teacher, scores, arch).float().train(), teacher


@pytest.fixture
def nccl_group(tmp_path, monkeypatch):
    """A process group of one rank over NCCL, under which the KD loop takes its sharded path. `nas.sharding` shards
    only when there are several workers, which one GPU cannot hold (NCCL refuses two ranks on one device); FSDP2 on a
    mesh of one runs the same code: fully_shard with bf16 mixed precision, NCCL all-reduces, DCP checkpoints and the
    gathered final checkpoint."""
    import torch.distributed as dist

    from nas import sharding

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    monkeypatch.setattr(sharding, "is_sharded", dist.is_initialized)
    yield
    dist.destroy_process_group()


def _steps(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "grad_norm" in line]


def test_kd_under_fsdp2_over_nccl_in_bf16(tmp_path, nccl_group, monkeypatch):
    """The KD loop sharded by FSDP2 over NCCL on the GPU: fp32 master shards, bf16 weights in the forward (FSDP2's
    mixed precision) under bf16 autocast; it lowers the KD loss, checkpoints and resumes through DCP, and writes a
    stock checkpoint whose own HF loss is the run's validation loss."""
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from nas import sharding
    from nas.distill import DistillConfig, Distiller
    from nas.importance import lm_loss

    cfg = DistillConfig(tokens=8 * 4 * 16, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=3)
    student, teacher = _cuda_pair()
    with monkeypatch.context() as plain:  # the untrained child, unsharded
        plain.setattr(sharding, "is_sharded", lambda: False)
        before = Distiller(student, teacher, TRAIN, VAL, tmp_path / "before", cfg, [0, 3]).evaluate()

    distiller = Distiller(student, teacher, TRAIN, VAL, tmp_path / "run", cfg, [0, 3])
    assert distiller.intermediate and distiller.projection is not None
    assert all(isinstance(p, DTensor) and p.device.type == "cuda" and p.dtype == torch.float32
               for p in distiller.trained.parameters())
    assert all(isinstance(p, DTensor) and p.dtype == torch.bfloat16 for p in teacher.parameters())
    seen = set()
    down = student.model.layers[0].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda m, args: seen.add((m.weight.device.type, m.weight.dtype,
                                                                      args[0].dtype)))
    result = distiller.run(progress=False)
    handle.remove()
    assert seen == {("cuda", torch.bfloat16, torch.bfloat16)}
    assert result["finished"] and result["steps"] == 8 and result["workers"] == 1
    steps = _steps(tmp_path / "run")
    assert [s["step"] for s in steps] == list(range(1, 9))
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["is"]) and math.isfinite(s["grad_norm"]) for s in steps)
    assert result["val_kd"] < before["val_kd"]

    # The gathered checkpoint, loaded as a stock model: HF's own loss on the validation set is the run's.
    child = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").to(CUDA)
    assert {p.dtype for p in child.parameters()} == {torch.float32}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert lm_loss(child, VAL) == pytest.approx(result["val_loss"], rel=2e-2)

    # Stopped at step 4 (a DCP checkpoint of CUDA shards), resumed by a new process's worth of objects: the same
    # steps as the run that went through.
    for stop in (4, None):
        student, teacher = _cuda_pair()
        Distiller(student, teacher, TRAIN, VAL, tmp_path / "resumed", cfg, [0, 3]).run(stop_after=stop, progress=False)
    resumed = _steps(tmp_path / "resumed")
    assert [s["step"] for s in resumed] == list(range(1, 9))
    for a, b in zip(steps, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), a["step"]


# -- a tiny search on the GPU --------------------------------------------------------------------------------------

def probed_trial(config, shared, report=None):
    """`run_trial`, watched from inside its Ray worker: every nn.Linear that runs (its weight's device and dtype,
    its output's dtype), the CUDA memory the process took, and the untrained child's validation figures on the same
    GPU, written beside the run folder's trials."""
    import tempfile

    from nas.distill import DistillConfig, Distiller
    from nas.search import candidate_inputs, label_of, run_trial

    seen = set()

    def watch(module, _args, out):
        if isinstance(module, torch.nn.Linear) and torch.is_tensor(out):
            seen.add((module.weight.device.type, str(module.weight.dtype), str(out.dtype)))

    handle = torch.nn.modules.module.register_module_forward_hook(watch)
    try:
        run_trial(config, shared, report)
    finally:
        handle.remove()
    label = label_of(config)
    inputs = candidate_inputs(shared, label, False, torch.device("cuda"))
    with tempfile.TemporaryDirectory() as scratch:
        untrained = Distiller(inputs.student, inputs.teacher, inputs.train, inputs.val, scratch,
                              DistillConfig(batch_size=shared.space.short_retrain.batch_size)).evaluate()
    probe = shared.storage.local / "gpu-probe" / f"{label}.json"
    probe.parent.mkdir(exist_ok=True)
    probe.write_text(json.dumps({"linears": sorted(seen), "untrained": untrained,
                                 "cuda_bytes": torch.cuda.max_memory_allocated()}))


@pytest.fixture
def gpu_ray(tmp_path):
    """A private Ray that sees this machine's GPU."""
    pytest.importorskip("ray", reason="the search runs on Ray (pip install ray)")
    pytest.importorskip("optuna", reason="the search records its study in Optuna (pip install optuna)")
    import ray

    from nas.search import init_ray

    _register_for_ray_workers()
    init_ray(None, tmp_path / "ray", num_cpus=4)
    assert ray.cluster_resources().get("GPU", 0) >= 1
    yield
    ray.shutdown()


def test_tiny_search_trains_on_the_gpu_in_bf16(tmp_path, tiny_tokenizer, gpu_ray):
    """A grid search of two candidates with a GPU per trial: the parent's work (importance, the teacher's top-K over
    the whole vocabulary) in a GPU task, each trial and the promotion on the GPU with bf16 compute over fp32
    master weights. Every trial completes with a finite loss, and KD lowered its KL to the teacher below the
    untrained child's."""
    import optuna
    from transformers import AutoModelForCausalLM

    from conftest import VOCAB, tiny_space
    from nas.search import run_search, storage_url
    from nas.space import parse_space

    axes = {"num_hidden_layers": [3], "num_attention_heads": [6], "intermediate_size": [80, 40], "hidden_size": [36]}
    space = parse_space(tiny_space(tmp_path, tiny_tokenizer, name="cuda", axes=axes,
                                   short_retrain={"tokens": 4 * 32 * 10, "teacher_topk": VOCAB},
                                   full_retrain={"tokens": 4 * 32 * 10},
                                   resources={"gpus_per_trial": 1, "max_concurrent": 1, "cpus_per_trial": 2}))
    lines = []
    frame = run_search(space, tmp_path, trial_fn=probed_trial, echo=lines.append)
    trials = optuna.load_study(study_name=space.study, storage=storage_url(space, tmp_path)).get_trials()
    short = [t for t in trials if t.user_attrs.get("stage") == "short_retrain"]
    assert len(short) == len(frame) == 2, lines
    folder = tmp_path / space.study
    for t in short:
        label = t.user_attrs["label"]
        assert t.state == optuna.trial.TrialState.COMPLETE and math.isfinite(t.value), (label, lines)
        result = json.loads((folder / label / "result.json").read_text())
        assert result["val_loss"] == pytest.approx(t.value)
        steps = [json.loads(line) for line in (folder / label / "metrics.jsonl").open() if "grad_norm" in line]
        assert len(steps) == 10 and all(math.isfinite(s["loss"]) for s in steps)
        probe = json.loads((folder / "gpu-probe" / f"{label}.json").read_text())
        assert probe["cuda_bytes"] > 0
        linears = {tuple(x) for x in probe["linears"]}
        assert {device for device, _, _ in linears} == {"cuda"}, linears
        assert {out for _, _, out in linears} == {"torch.bfloat16"}, linears  # bf16 compute throughout
        # the student's fp32 master weights, the parent's bf16 ones (its final KL evaluation)
        assert {weight for _, weight, _ in linears} == {"torch.float32", "torch.bfloat16"}, linears
        assert result["val_kd"] < probe["untrained"]["val_kd"], (result, probe)
    assert math.isfinite(json.loads((folder / "parent.json").read_text())["val_loss"])

    [full] = [t for t in trials if t.user_attrs.get("stage") == "full_distillation"]
    assert full.state == optuna.trial.TrialState.COMPLETE and math.isfinite(full.value)
    model = AutoModelForCausalLM.from_pretrained(folder / "promoted" / full.user_attrs["label"] / "model").to(CUDA)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=VAL[:1].to(CUDA)).logits).all()
