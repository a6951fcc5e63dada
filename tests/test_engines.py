"""Children run in the real serving engines: vLLM and llama.cpp give the greedy tokens transformers gives (fp32) on a
uniform child of the real SmolLM2-135M. (Per-layer children in the engines: tests/test_exports.py.)

The engines are built by `bash scripts/setup.sh --engines` (CI does); each test is skipped, with the reason, only
where its engine is absent.
"""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from nas.architecture import Architecture
from nas.data import load_tokens
from nas.engines import engine_python, llama_greedy, vllm_greedy
from nas.errors import EngineError
from nas.exports import export
from nas.importance import ImportanceSettings, compute_importance
from nas.parents import load_parent
from nas.prune import prune
from nas.space import kept_layers

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,"]
NEW_TOKENS = 24


def greedy(model, ids: list[int], n: int) -> list[int]:
    """The reference: `n` argmax steps of the transformers model, each over the whole sequence (no cache, no stop
    at end-of-text)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


@pytest.fixture(scope="module")
def uniform_child(tmp_path_factory):
    """The demo winner's shape (L20-H9-KV3-M1280-E576, layers kept by importance) pruned from the real SmolLM2-135M
    and saved as HF, with the reference continuations of PROMPTS by stock transformers reading that folder back."""
    model, tokenizer = load_parent("smollm2-135m", device=torch.device("cpu"), dtype=torch.float32)
    importances = compute_importance(model, load_tokens("shakespeare", tokenizer, 64)[:8],
                                     ImportanceSettings(drop_samples=0))
    layers = kept_layers({"num_hidden_layers": 20}, model.config, importances, "bi")
    arch = Architecture.of_config(model.config).replace(intermediate_size=1280, num_hidden_layers=20, layers=layers)
    path = tmp_path_factory.mktemp("engines") / "uniform"
    prune(model, importances, arch).save_pretrained(path)
    tokenizer.save_pretrained(path)
    child = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    return path, prompt_ids, [greedy(child, ids, NEW_TOKENS) for ids in prompt_ids]


def assert_same(runs, prompt_ids, reference):
    assert [r.prompt_ids for r in runs] == prompt_ids  # the engine tokenized the text as transformers does
    assert [r.token_ids for r in runs] == reference
    assert all(r.text for r in runs)


@pytest.mark.slow
@pytest.mark.engine("vllm")
def test_vllm_matches_transformers_on_a_uniform_child(uniform_child):
    path, prompt_ids, reference = uniform_child
    assert_same(vllm_greedy(path, PROMPTS, NEW_TOKENS), prompt_ids, reference)


@pytest.mark.slow
@pytest.mark.engine("llama.cpp")
def test_llama_cpp_matches_transformers_on_a_uniform_child(uniform_child, tmp_path):
    path, prompt_ids, reference = uniform_child
    gguf = export(path, tmp_path / "gguf", "gguf") / "model.gguf"  # f32, the tokenizer inside
    assert_same(llama_greedy(gguf, PROMPTS, NEW_TOKENS), prompt_ids, reference)


@pytest.mark.parametrize("engine, name, var, run", [("vllm", "vLLM", "NAS_VLLM_PYTHON", vllm_greedy),
                                                    ("llama.cpp", "llama.cpp", "NAS_LLAMA_PYTHON", llama_greedy)])
def test_an_absent_engine_is_named_with_the_fix(monkeypatch, tmp_path, engine, name, var, run):
    monkeypatch.setenv("NAS_ENGINES_DIR", str(tmp_path))
    monkeypatch.delenv(var, raising=False)
    assert engine_python(engine) is None
    with pytest.raises(EngineError, match=rf"^{name} not installed: bash scripts/setup.sh --engines \(or set {var}"):
        run(tmp_path / "model", PROMPTS, 2)
    # A python of one's own without the engine (this venv's) is absent too, not a crash in the middle of a run.
    monkeypatch.setenv(var, sys.executable)
    assert engine_python(engine) is None
