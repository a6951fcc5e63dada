"""Children run in the real serving engines: vLLM and llama.cpp give the greedy tokens transformers gives (fp32).

The engines are built by `bash scripts/setup.sh --engines` (CI does); each test is skipped, with the reason, only
where its engine is absent.
"""

import sys

import pytest
import torch

from nas.architecture import Architecture
from nas.data import load_tokens
from nas.engines import absent_reason, engine_python, vllm_greedy
from nas.errors import EngineError
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
    """The demo winner's shape (L20-H9-KV3-M1280-E576) pruned from the real SmolLM2-135M, saved as HF, with its
    tokenizer and the reference continuations of PROMPTS."""
    model, tokenizer = load_parent("smollm2-135m", device=torch.device("cpu"), dtype=torch.float32)
    importances = compute_importance(model, load_tokens("shakespeare", tokenizer, 64)[:8],
                                     ImportanceSettings(drop_samples=0))
    layers = kept_layers({"num_hidden_layers": 20}, model.config, importances, "bi")
    arch = Architecture.of_config(model.config).replace(intermediate_size=1280, num_hidden_layers=20, layers=layers)
    child = prune(model, importances, arch)
    path = tmp_path_factory.mktemp("engines") / "child"
    child.save_pretrained(path)
    tokenizer.save_pretrained(path)
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    return path, prompt_ids, [greedy(child, ids, NEW_TOKENS) for ids in prompt_ids]


@pytest.mark.slow
@pytest.mark.engine("vllm")
def test_vllm_matches_transformers_on_a_uniform_child(uniform_child):
    path, prompt_ids, reference = uniform_child
    runs = vllm_greedy(path, PROMPTS, NEW_TOKENS)
    assert [r.prompt_ids for r in runs] == prompt_ids  # vLLM tokenized the text as transformers does
    assert [r.token_ids for r in runs] == reference
    assert all(r.text for r in runs)


def test_an_absent_engine_is_named_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("NAS_ENGINES_DIR", str(tmp_path))
    monkeypatch.delenv("NAS_VLLM_PYTHON", raising=False)
    assert engine_python("vllm") is None
    with pytest.raises(EngineError, match=r"^vLLM not installed: bash scripts/setup.sh --engines"):
        vllm_greedy(tmp_path, PROMPTS, 2)
    # A python of one's own that lacks the engine (this venv's: nas's transformers is too new for vLLM) is absent
    # too, not a crash in the middle of a run.
    monkeypatch.setenv("NAS_VLLM_PYTHON", sys.executable)
    assert engine_python("vllm") is None and "NAS_VLLM_PYTHON" in absent_reason("vllm")
