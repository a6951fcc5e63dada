"""Shared fixtures: tiny random models of every family, a tiny tokenizer, and an isolated cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, NemotronConfig, PreTrainedTokenizerFast, \
    Qwen2Config, Qwen3Config

import transformers

transformers.utils.logging.disable_progress_bar()

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT / "data" / "wikitext-2"  # shipped in the repository (see data/README.md)
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


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name](), dtype=torch.float32).eval()
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
