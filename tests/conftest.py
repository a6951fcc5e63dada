"""Shared fixtures: tiny random models of every family, a tiny tokenizer, and an isolated cache."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# Set before torch loads OpenMP, and inherited by the pytest workers, their subprocesses and Ray's processes: a
# thread waiting for work sleeps rather than spins. Two workers and their children oversubscribe the two cores, and
# spinning threads burned the CPU the others waited for (two modules side by side: 324 CPU-s and 168 s spinning,
# 93 CPU-s and 58 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, NemotronConfig, PreTrainedTokenizerFast, \
    Qwen2Config, Qwen3Config

import transformers

transformers.utils.logging.disable_progress_bar()

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT / "data" / "wikitext-2"  # shipped in the repository (see data/README.md)
sys.path.insert(0, str(ROOT / "scripts"))  # the dashboard helpers the browser test shares with its script
# The converted SmolLM2 parent and token arrays are cached across tests and runs (ignored by git).
os.environ.setdefault("NAS_CACHE", str(ROOT / ".cache"))

VOCAB = 320
_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=6,
               num_key_value_heads=2, head_dim=12, max_position_embeddings=128, initializer_range=0.15)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "llama-tied": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON, layer_types=["full_attention"] * 4),
    "qwen3": lambda: Qwen3Config(**_COMMON),
    "nemotron": lambda: NemotronConfig(**_COMMON, partial_rotary_factor=0.5, attention_bias=True, mlp_bias=True),
}

_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary
_SLIDING = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2)


def _stock(model_type: str, **extra):
    from transformers import AutoConfig

    return lambda **more: AutoConfig.for_model(model_type, **{**_COMMON, **_IDS, **extra, **more})


#: The families added on block units, each with its quirks switched on (softcaps, multipliers, sliding windows),
#: run through the per-family checks of tests/test_families.py.
FAMILY_CONFIGS = {
    "gemma2": _stock("gemma2", **_SLIDING, query_pre_attn_scalar=16, final_logit_softcapping=3.0,
                     attn_logit_softcapping=5.0),
    "gemma3_text": _stock("gemma3_text", **_SLIDING, query_pre_attn_scalar=16),
    "phi3": _stock("phi3", tie_word_embeddings=False),
    "smollm3": _stock("smollm3", no_rope_layers=[1, 0, 1, 0]),
    "olmo2": _stock("olmo2"),
    "olmo3": _stock("olmo3", **_SLIDING),
    "granite": _stock("granite", embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                      logits_scaling=4.0),
}


def _moe(model_type: str, **extra):
    from transformers import AutoConfig

    return lambda **more: AutoConfig.for_model(model_type, **{**_COMMON, **_IDS, **extra, **more})


_EXPERTS = dict(num_experts_per_tok=2, router_aux_loss_coef=0.01)
#: Mixtures of experts (tests/test_moe.py): 8 experts, top-2, each family's quirks on. Qwen3-MoE keeps one dense
#: layer (`mlp_only_layers`) and renormalises its top-k; Qwen2-MoE alternates dense and sparse layers
#: (`decoder_sparse_step`) and adds a shared expert; OLMoE's q norm is sized by hidden_size (head_dim 8 x 6 heads).
MOE_CONFIGS = {
    "qwen3_moe": _moe("qwen3_moe", **_EXPERTS, num_experts=8, moe_intermediate_size=24, mlp_only_layers=[1],
                      norm_topk_prob=True),
    "qwen2_moe": _moe("qwen2_moe", **_EXPERTS, num_experts=8, moe_intermediate_size=24, decoder_sparse_step=2,
                      shared_expert_intermediate_size=40, qkv_bias=True, layer_types=["full_attention"] * 4),
    "mixtral": _moe("mixtral", **_EXPERTS, num_local_experts=8, intermediate_size=24),
    "olmoe": _moe("olmoe", **_EXPERTS, num_experts=8, intermediate_size=24, head_dim=8, attention_bias=True),
    "gpt_oss": _moe("gpt_oss", **_EXPERTS, num_local_experts=8, intermediate_size=24, **_SLIDING),
}
_DELTANET = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=6)
_BAMBA_MAMBA = dict(mamba_n_heads=8, mamba_d_head=12, mamba_n_groups=2, mamba_d_state=8)
#: Hybrids (tests/test_hybrids.py): Nemotron-H's Mamba2 (8 heads in 2 groups, biases on), attention and squared-ReLU
#: MLP layers by its pattern; Qwen3-Next's Gated DeltaNet (2 key heads, 4 value heads) and gated attention, 3 to 1,
#: over experts with one dense layer and a shared expert; Qwen3.5's text decoder (split projections, dense MLPs);
#: Bamba (Mamba2 at mamba_expand x hidden, one attention layer by index); Falcon-H1 (attention and Mamba2 side by
#: side in every layer, every muP multiplier set).
HYBRID_CONFIGS = {
    "nemotron_h": _moe("nemotron_h", mamba_num_heads=8, mamba_head_dim=6, n_groups=2, ssm_state_size=8, use_bias=True,
                       layers_block_type=["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"]),
    "qwen3_next": _moe("qwen3_next", **_DELTANET, **_EXPERTS, num_experts=8, moe_intermediate_size=24,
                       shared_expert_intermediate_size=40, mlp_only_layers=[1], attention_bias=True),
    "qwen3_5_text": _moe("qwen3_5_text", **_DELTANET),
    "bamba": _moe("bamba", **_BAMBA_MAMBA, attn_layer_indices=[2], mamba_expand=2, mamba_proj_bias=True),
    "falcon_h1": _moe("falcon_h1", **_BAMBA_MAMBA, mamba_d_ssm=96, mamba_rms_norm=True, mamba_norm_before_gate=False,
                      projectors_bias=True, lm_head_multiplier=0.5, embedding_multiplier=2.0, key_multiplier=0.7,
                      mlp_multipliers=[0.9, 1.1], attention_in_multiplier=1.2, attention_out_multiplier=0.8,
                      ssm_multipliers=[1.0, 0.5, 1.5, 0.8, 1.2], ssm_in_multiplier=1.1, ssm_out_multiplier=0.9),
}
ALL_CONFIGS = {**TINY_CONFIGS, **FAMILY_CONFIGS, **MOE_CONFIGS, **HYBRID_CONFIGS}


#: The families whose children may vary their layers (issue 27; `Family.per_layer`), the engines' four first.
PER_LAYER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "nemotron", "gemma2", "gemma3_text")


def mixed_child(arch):
    """The per-layer "mixed child" of a tiny 4-layer parent's architecture `arch` (2 KV heads, MLP 80): child layer
    0 without attention, layer 1 without an MLP, layer 2 with 1 KV head and MLP 40, layer 3 with MLP 64."""
    from nas.architecture import LayerShape

    kv, mlp = arch.num_key_value_heads, arch.intermediate_size
    return arch.replace(per_layer=(LayerShape(0, mlp), LayerShape(kv, 0), LayerShape(1, mlp // 2),
                                   LayerShape(kv, mlp * 4 // 5)))


def tiny_model(name: str, seed: int = 0, **config) -> torch.nn.Module:
    """The tiny random model `name`, with any `config` entries changed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(ALL_CONFIGS[name](**config), dtype=torch.float32).eval()
    with torch.no_grad():  # stock init is near-identity noise; wider weights make pruning effects visible
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    """A byte-level BPE of VOCAB tokens trained in memory on a little English (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (WIKITEXT / "valid.txt").read_text()[:200_000].splitlines()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture
def tiny_parent_dir(tmp_path, tiny_tokenizer) -> Path:
    """A saved tiny Llama with its tokenizer: a local HF parent for CLI tests."""
    path = tmp_path / "parent"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text((WIKITEXT / "valid.txt").read_text()[:60_000])
    return path


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A private Ray on 127.0.0.1 with 2 CPUs, started once for every test that runs trials in this process: each
    start costs seconds, and its idle workers, which have imported torch and nas, serve the next module's trials.
    The tests that check that a refused search starts no Ray run before it, in its pytest worker (`_xdist_group`)."""
    import ray

    from nas.search import init_ray

    init_ray(None, tmp_path_factory.mktemp("ray"), num_cpus=2)
    yield
    ray.shutdown()


def tiny_space(folder: Path, tokenizer, name: str = "tiny", **overrides) -> dict:
    """A search space over a saved tiny Llama parent and a little text in `folder` (4 candidates)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "parent" / "config.json").exists():
        tiny_model("llama").save_pretrained(folder / "parent")
        tokenizer.save_pretrained(folder / "parent")
        (folder / "data.txt").write_text((WIKITEXT / "valid.txt").read_text()[:120_000])
    spec = {
        "name": name, "parent": str(folder / "parent"), "data": str(folder / "data.txt"), "seq_len": 32,
        "budget": {"fraction": 0.6, "tolerance": 0.25},
        "axes": {"num_hidden_layers": [4, 3], "num_attention_heads": [6], "intermediate_size": [80, 40],
                 "hidden_size": [48, 36]},
        "importance": {"samples": 8},
        "short_retrain": {"tokens": 4 * 32 * 3, "batch_size": 4, "lr": 1e-3, "reports": 2},
        "full_retrain": {"tokens": 4 * 32 * 4, "batch_size": 4, "lr": 1e-3, "reports": 1},
        "promote": 1, "search": {"sampler": "grid", "retries": 1},
        "resources": {"cpus_per_trial": 1, "max_concurrent": 2},
    }
    for key, value in overrides.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    return spec


@pytest.fixture
def without_ray(monkeypatch):
    """The test's work runs in this process, as it does without Ray, even where another test left the session's Ray
    up in this pytest worker (the "ray" group's worker goes on to other tests): nas asks `ray.is_initialized()`
    before it hands work to Ray. For tests that replace functions in this process, which Ray's workers would not
    see, or that ask for resources (GPUs) the session's Ray lacks."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def _xdist_group(item) -> str | None:
    """The pytest worker group of a test. The `ray_session` users share this process's Ray, and the tests that check
    that this process has none must run before it starts: one group, "ray", which one worker runs in order. A test
    that starts a Ray of its own (`nas search` as a process, a `ray start` cluster) may run beside it, as Ray's
    processes take the ports the system gives them (worker ports too, for `ray.init`; the `ray start` cluster's
    workers take 10002-19999, which the system does not hand out): its module is a group, so that the module's
    fixtures (one cluster, one undisturbed run) are made once. So is the module of a test marked `one_worker`
    (a real parent loaded and scored once, not once on each worker)."""
    if "ray_session" in item.fixturenames or item.get_closest_marker("no_ray"):
        return "ray"
    if item.get_closest_marker("ray") or item.get_closest_marker("one_worker"):
        return item.module.__name__
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups it adds
def pytest_collection_modifyitems(config, items):
    """The tests that run Ray are grouped for the pytest workers (`_xdist_group`; `-n`, pyproject), and come first:
    the longest paths start at once, and the checks that no Ray started run before the session's Ray starts.
    Tests marked `gpu` are collected everywhere and skipped, with the reason, where CUDA is missing: `pytest -m
    gpu` lists them on any machine and runs them on a GPU one. Tests marked `engine("vllm")` or
    `engine("llama.cpp")` are skipped, with the reason, only where that engine is not installed; while the engines
    are still being built beside the suite (CI: `NAS_ENGINES_BUILD`), they run last and wait for the build."""
    from nas.engines import absent_reason, engine_python

    building = bool(os.environ.get(ENGINES_BUILD))
    groups = {item: group for item in items if (group := _xdist_group(item))}
    for item, group in groups.items():
        item.add_marker(pytest.mark.xdist_group(group))
        if getattr(config.option, "loadgroup", False):  # an xdist worker of a --dist loadgroup run
            # What xdist 3.8 does with that mark, done here: it appends "@group" to `item._nodeid`, which pytest 9
            # no longer reads (a node's id is `_id`), so its scheduler would never see the group.
            from _pytest.nodeid import coerce_node_id

            item._id = coerce_node_id(f"{item.nodeid}@{group}")
    # (a stable sort: a module's tests stay together and in order, so its module fixtures are made once) The Gemma 3
    # test beside the "ray" group comes first of those, and the Gemma 3 search ends that group, the longest: the one
    # converts that parent (about a minute, once) long before the other reads it.
    def order(item):
        gemma = item.module.__name__ == "test_gemma3"
        return (building and item.get_closest_marker("engine") is not None, item not in groups,
                "ray_session" in item.fixturenames, gemma if item in groups else not gemma)

    items.sort(key=order)
    if not building:
        present: dict[str, bool] = {}  # each engine is looked for once, and only if a collected test needs it
        for item in items:
            if marker := item.get_closest_marker("engine"):
                engine = marker.args[0]
                if engine not in present:
                    present[engine] = engine_python(engine) is not None
                if not present[engine]:
                    item.add_marker(pytest.mark.skip(reason=absent_reason(engine)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs CUDA: torch {torch.__version__} sees no GPU on this machine")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


#: A folder where a background build of the engines (`scripts/engines.sh`, started by `.ci/run`) writes its exit
#: status to `status` and its output to `log` when it ends.
ENGINES_BUILD = "NAS_ENGINES_BUILD"


def pytest_runtest_setup(item):
    """An engine test waits for a build running beside the suite, and fails (not skips) if it failed: CI asked
    for the engines."""
    build = os.environ.get(ENGINES_BUILD)
    if not build or not item.get_closest_marker("engine"):
        return
    status = Path(build) / "status"
    deadline = time.monotonic() + 3600
    while not status.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"the engines' build ({build}/log) has not ended after an hour")
        time.sleep(5)
    if (code := status.read_text().strip()) != "0":
        tail = (Path(build) / "log").read_text().splitlines()[-15:]
        pytest.fail(f"the engines' build failed (exit {code}); its last lines:\n" + "\n".join(tail))
