"""A saved child in the forms serving engines run: vLLM's DeciLM folder (`decilm`) and llama.cpp's GGUF (`gguf`).

Both read the on-disk child that `nas prune` writes (a stock HF folder, with transformers' `per_layer_config` where
its layers differ) and refuse, in one line with the reason, what the engine would run wrongly. docs/exports.md
says why each refusal exists.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas.architecture import CONFIG_KEYS, PER_LAYER, Architecture
from nas.errors import ConfigError, NasError

FORMATS = ("hf", "decilm", "gguf")
#: Tensor dtypes an export may be written in (the HF child keeps the dtype it was saved in).
DTYPES = ("float32", "float16", "bfloat16")
#: The families whose layers both engines build from these tensor names: Llama-style attention (Qwen2's with q/k/v
#: biases, Qwen3's with q/k norms) and a SiLU-gated MLP.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
#: Per-layer families with Gemma's sandwich norms, and the llama.cpp graph that would run them: it reshapes every
#: layer's keys and values by the model-wide KV head count (layer 0's), reads one MLP width, and builds attention and
#: MLP in every layer, so neither per-layer widths nor skipped blocks run there.
SANDWICH_FAMILIES = {"gemma2": "src/models/gemma2-iswa.cpp", "gemma3_text": "src/models/gemma3.cpp"}


@dataclass(frozen=True)
class Child:
    """A saved child folder: its config.json as written, and its architecture (global widths, layer table)."""

    folder: Path
    config: dict[str, Any]
    arch: Architecture

    @classmethod
    def read(cls, folder: str | Path) -> Child:
        folder = Path(folder)
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise NasError(f"{folder}: not a saved child (config.json unreadable: {e}); make one with `nas prune`") \
                from None
        return cls(folder, config, architecture_of(config))

    @property
    def family(self) -> str:
        return self.config.get("model_type", "?")


def architecture_of(config: dict[str, Any]) -> Architecture:
    """The architecture a config.json describes: its global widths, every layer kept, its `per_layer_config`."""
    heads = config["num_attention_heads"]
    data = {key: config.get(key) for key in CONFIG_KEYS}
    data["head_dim"] = config.get("head_dim") or config["hidden_size"] // heads
    data["num_key_value_heads"] = config.get("num_key_value_heads") or heads
    data["layers"] = list(range(config["num_hidden_layers"]))
    data[PER_LAYER] = config.get(PER_LAYER) or {}
    return Architecture.from_dict(data)


def check(config: dict[str, Any], arch: Architecture, fmt: str, tokenizer: str | Path | None = None) -> None:
    """Refuse (ConfigError, one line) a child of `config`'s family and quirks with architecture `arch` that format
    `fmt` cannot hold or that its engine would run wrongly. `tokenizer`: a folder whose tokenizer a GGUF would
    carry, checked too where given. Run before pruning, so a refusal costs nothing."""
    if fmt == "hf":
        return
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    family = config.get("model_type")
    if family in SANDWICH_FAMILIES and not arch.is_uniform:
        raise ConfigError(f"--format {fmt}: a per-layer {family} child runs in neither engine: vLLM's DeciLM and "
                          f"llama.cpp's deci layers are Llama's (no sandwich norms, SiLU), and llama.cpp's own "
                          f"{family} graph ({SANDWICH_FAMILIES[family]}) sizes every layer by layer 0's KV heads and "
                          f"MLP width and runs every block; serve it from its HF folder (--format hf, nas.load)")
    if family not in FAMILIES:
        raise ConfigError(f"--format {fmt}: exports cover {', '.join(FAMILIES)} (Llama-style layers both engines "
                          f"build); a {family} child is served from its HF folder (--format hf)")
    shapes = arch.layer_shapes
    if not shapes[0].attention:
        # vLLM's DeciLM layer unpacks a fused norm+residual that layer 0 has no residual for yet, and llama.cpp
        # takes the head size from layer 0's head count (0 there leaves every layer's head size 0).
        raise ConfigError(f"--format {fmt}: child layer 0 has no attention; neither vLLM nor llama.cpp runs a first "
                          f"layer without one: keep attention in layer 0")
    window = config.get("sliding_window")
    if (window and window < config.get("max_position_embeddings", 0)
            and (family == "mistral" or config.get("use_sliding_window"))):
        raise ConfigError(f"--format {fmt}: sliding_window={window} is shorter than the context and the exported "
                          f"layers attend to every position; serve it from its HF folder (--format hf)")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"--format {fmt}: hidden_act={config['hidden_act']}; the exported MLPs are SiLU-gated")
    if fmt == "decilm" and family == "qwen3":
        raise ConfigError("--format decilm: a DeciLM layer has no q/k norms (Qwen3's q_norm/k_norm); vLLM runs a "
                          "uniform qwen3 child from its HF folder (--format hf)")
    if fmt == "gguf":
        from nas.exports.gguf import check_gguf

        check_gguf(config, arch, tokenizer)


def export(child: str | Path, out: str | Path, fmt: str, dtype: str = "float32") -> Path:
    """Write the saved child folder `child` to `out` in format `fmt` (whole or not at all); returns `out`."""
    from nas.files import atomic_dir

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    saved = Child.read(child)
    check(saved.config, saved.arch, fmt, saved.folder)
    with atomic_dir(out) as tmp:
        if fmt == "decilm":
            from nas.exports.decilm import write_decilm

            write_decilm(saved, tmp, dtype)
        elif fmt == "gguf":
            from nas.exports.gguf import write_gguf

            write_gguf(saved, tmp / "model.gguf", dtype, name=Path(out).name)
            if (saved.folder / "architecture.json").exists():
                shutil.copyfile(saved.folder / "architecture.json", tmp / "architecture.json")
        else:  # hf: the saved folder as it is
            shutil.copytree(saved.folder, tmp, dirs_exist_ok=True)
    return Path(out)


@contextlib.contextmanager
def written(out: str | Path, fmt: str = "hf", dtype: str | None = None) -> Iterator[Path]:
    """Where to save an HF child folder (its writer makes the folder, e.g. with `atomic_dir`); on leaving, `out`
    holds that child in format `fmt` (a format other than hf is written whole or not at all)."""
    if fmt == "hf":
        if dtype:
            raise ConfigError(f"--dtype {dtype}: applies to --format decilm and gguf; an HF child keeps the dtype it "
                              f"is saved in")
        yield Path(out)
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=f".{Path(out).name}.hf.") as scratch:
        yield Path(scratch) / "hf"
        export(Path(scratch) / "hf", out, fmt, dtype or "float32")
