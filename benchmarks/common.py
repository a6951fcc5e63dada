"""What several benchmarks share: the repository's paths, the SmolLM2 set-up, timing, the machine's description, and
the small models trained from scratch on the plays (no small pretrained checkpoint of those families fits here)."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from nas.data import load_tokens
from nas.files import atomic_dir
from nas.importance import lm_loss
from nas.parents import load_parent

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "data" / "wikitext-2" / "test.txt"  # shipped excerpt (data/README.md); never trained on
RESULTS = ROOT / "benchmarks" / "results"
DEMO_SPACE = ROOT / "search_spaces" / "smollm2-135m-demo.yaml"
WIDTH_2_3 = dict(num_attention_heads=6, intermediate_size=768)  # 88.1M of 134.5M parameters (65.5%)
DEPTH_2_3 = 17  # layers kept: 88.5M parameters (65.8%)


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def setup(calibration: int = 32, heldout: int = 16):
    """(SmolLM2-135M on the CPU, its tokenizer, calibration sequences from the plays, held-out WikiText-2)."""
    torch.manual_seed(0)
    model, tokenizer = load_parent("smollm2-135m", device=torch.device("cpu"))
    cal = load_tokens("shakespeare", tokenizer, 128)[:calibration]
    held = load_tokens(str(HELDOUT), tokenizer, 128)[:heldout]
    return model, tokenizer, cal, held


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def machine() -> dict[str, Any]:
    return {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.is_available(), "processor": platform.processor() or platform.machine()}


def trained_from_scratch(folder: Path, config, train_tokens: int):
    """(model, training sequences, 64 held-out sequences) of a small model of `config` trained from scratch on the
    shipped plays with plain next-token CE (and the router's load-balancing loss when the config asks for it),
    with a 2,048-entry byte-level BPE learnt from the same text; cached in `folder` (no small pretrained checkpoint
    of these families fits here)."""
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from nas.data import iter_texts, split
    from nas.distill import DistillConfig, Distiller

    torch.manual_seed(0)
    if not (folder / "model.safetensors").exists():
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.train_from_iterator(iter_texts("shakespeare"), trainers.BpeTrainer(
            vocab_size=config.vocab_size, special_tokens=["<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
        train, _ = split(load_tokens("shakespeare", tokenizer, 128), 0.05)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        cfg = DistillConfig(tokens=train_tokens, batch_size=16, lr=3e-3, warmup_steps=50, kd="none", ce_weight=1.0,
                            checkpoint_every=0, weight_decay=0.01)
        with tempfile.TemporaryDirectory() as tmp:
            Distiller(model, None, train, train[:8], Path(tmp), cfg).run(progress=False, save_model=False)
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    train, held = split(load_tokens("shakespeare", tokenizer, 128), 0.05)
    return model, train, held[:64]


def zero_shot_and_after_kd(child, teacher, train: torch.Tensor, held: torch.Tensor, kd_tokens: int,
                           seed: int = 0) -> dict[str, float]:
    """A pruned child's held-out loss as it is, then after `kd_tokens` of KD from `teacher` (the child is trained in
    place)."""
    import tempfile

    from nas.distill import DistillConfig, Distiller

    zero_shot = lm_loss(child, held)
    cfg = DistillConfig(tokens=kd_tokens, batch_size=8, lr=1e-3, warmup_steps=5, checkpoint_every=0, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        Distiller(child, teacher, train, held[:4], Path(tmp), cfg).run(progress=False, save_model=False)
    return {"zero_shot": zero_shot, "after_kd": lm_loss(child, held)}
