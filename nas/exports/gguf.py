"""A child as a GGUF file that llama.cpp runs, written with the `gguf` package (llama.cpp's own Python writer).

A per-layer child becomes llama.cpp's `deci` architecture: per-layer arrays `head_count` (0: the layer has no
attention), `head_count_kv` and `feed_forward_length` (0: no MLP), which llama.cpp reads as they are. Its converter
rounds widths up to a multiple of 256 only when it turns a DeciLM `ffn_mult` into a width; here the widths are
written as integers, so every width reads back exactly. A uniform child becomes the family's own architecture
(`llama` for llama and mistral, `qwen2`, `qwen3`). The tokenizer goes in too, as llama.cpp's GPT-2-style BPE
(`gpt2`) with the pre-tokenizer llama.cpp names for the child's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nas.architecture import Architecture
from nas.errors import ConfigError

#: Pre-tokenizers of a byte-level BPE tokenizer.json (as compared by `_pre_tokenizer_key`) -> the name
#: (`tokenizer.ggml.pre`) under which llama.cpp splits text the same way (src/llama-vocab.cpp), and whether it
#: ignores merges for whole-vocabulary words (it must agree with the tokenizer's `ignore_merges`).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {
    ("bytelevel",): ("gpt-2", False),
    ("digits", "bytelevel"): ("smollm", False),
    (f"split:{_LLAMA3_SPLIT}", "bytelevel-noregex"): ("llama-bpe", True),
    (f"split:{_QWEN2_SPLIT}", "bytelevel-noregex"): ("qwen2", False),
}
#: Where the upstream bug that makes a layer without an MLP unusable lives (see `check_gguf`).
DECI_GRAPH = "src/models/deci.cpp"


def check_gguf(config: dict[str, Any], arch: Architecture, tokenizer: str | Path | None) -> None:
    """What a GGUF of this child cannot hold, or llama.cpp would run wrongly (one line each)."""
    per_layer = not arch.is_uniform
    if per_layer and config.get("model_type") == "qwen3":
        raise ConfigError("--format gguf: a per-layer child is llama.cpp's `deci` architecture, whose layers have no "
                          "q/k norms (Qwen3's q_norm/k_norm); keep the qwen3 child uniform or serve it with vLLM")
    if per_layer and (j := next((j for j, s in enumerate(arch.layer_shapes) if s.attention and not s.mlp), None)) \
            is not None:
        raise ConfigError(f"--format gguf: child layer {j} keeps attention but has no MLP, and llama.cpp's "
                          f"{DECI_GRAPH} skips such a layer's attention residual (`continue` when n_ff == 0), "
                          f"so it would run wrongly; drop the layer's attention too, keep its MLP, or use --format "
                          f"decilm (vLLM)")
    if per_layer and not arch.layer_shapes[-1].mlp:
        raise ConfigError(f"--format gguf: child layer {arch.num_hidden_layers - 1}, the last, has no MLP, and "
                          f"llama.cpp's {DECI_GRAPH} then drops the last layer's selection of output rows (it "
                          f"aborts: GGML_ASSERT(buffer)); keep the last layer's MLP or use --format decilm (vLLM)")
    rope = config.get("rope_parameters") or {"rope_type": (config.get("rope_scaling") or {}).get("rope_type")}
    if rope.get("rope_type") not in (None, "default"):
        raise ConfigError(f"--format gguf: rope_type={rope['rope_type']}: this export writes plain RoPE only; use "
                          f"--format decilm (vLLM) or hf")
    if tokenizer is not None:
        pre_tokenizer(Path(tokenizer))


def _pre_tokenizer_key(step: dict[str, Any]) -> str:
    kind = step.get("type", "").lower()
    if kind == "bytelevel":  # llama.cpp's byte-level BPE adds no prefix space
        if step.get("add_prefix_space"):
            return "bytelevel-prefixed"
        return kind if step.get("use_regex", True) else "bytelevel-noregex"
    if kind == "digits":
        return kind if step.get("individual_digits") else "digits-grouped"
    if kind == "split" and step.get("behavior") == "Isolated" and not step.get("invert"):
        return f"split:{step.get('pattern', {}).get('Regex')}"
    return json.dumps(step, sort_keys=True)


def pre_tokenizer(folder: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of `folder`'s tokenizer.json; ConfigError where there is none (a
    GGUF with another name would split text differently from the HF tokenizer)."""
    path = folder / "tokenizer.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--format gguf: {path}: no readable tokenizer.json ({e}); GGUF export writes byte-level "
                          f"BPE tokenizers from it") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != \
            "ByteLevel" or spec.get("normalizer"):
        raise ConfigError(f"--format gguf: {path}: a {model.get('type')} tokenizer"
                          f"{' with a normalizer' if spec.get('normalizer') else ''}; this export writes byte-level "
                          f"BPE tokenizers (GPT-2 style) only")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    key = tuple(_pre_tokenizer_key(step) for step in steps)
    if key not in PRE_TOKENIZERS:
        raise ConfigError(f"--format gguf: {path}: its pre-tokenizer ({', '.join(s.get('type', '?') for s in steps)})"
                          f" is none that llama.cpp names here ({', '.join(n for n, _ in PRE_TOKENIZERS.values())}),"
                          f" so llama.cpp would split text differently")
    name, ignore_merges = PRE_TOKENIZERS[key]
    if bool(model.get("ignore_merges")) != ignore_merges:
        raise ConfigError(f"--format gguf: {path}: ignore_merges={bool(model.get('ignore_merges'))}, but llama.cpp's "
                          f"{name!r} pre-tokenizer has it {ignore_merges}")
    return name


def gguf_arch(child) -> Any:
    """llama.cpp's architecture for `child`: `deci` where its layers differ, else the family's own."""
    import gguf

    if not child.arch.is_uniform:
        return gguf.MODEL_ARCH.DECI
    return {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}.get(child.family, gguf.MODEL_ARCH.LLAMA)


def rope_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k projection rows (or biases) reordered from HF's rotate-half RoPE (dimension i pairs with i + d/2 in each
    head) to llama.cpp's `llama`/`deci` RoPE (dimension 2i pairs with 2i + 1): row 2i takes HF's row i and row 2i+1
    HF's row i + d/2."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def write_gguf(child, path: Path, dtype: str, name: str | None = None) -> None:
    """Write `child` (an `nas.exports.Child`) as a GGUF at `path`, matrices in `dtype` (vectors stay float32, as
    llama.cpp's converter keeps them), named `name` (`general.name`; default: the child folder's name)."""
    import gguf

    from nas.prune import SafetensorsReader

    arch, config = child.arch, child.config
    model_arch = gguf_arch(child)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[model_arch])
    writer.add_name(name or child.folder.name)
    _write_hparams(writer, child, dtype)
    _write_tokenizer(writer, child.folder, config["vocab_size"])
    names = gguf.TensorNameMap(model_arch, arch.num_hidden_layers)
    reader = SafetensorsReader(child.folder)
    for key in reader.entries:
        if key == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp ties the output to token_embd where the GGUF has no output.weight
        tensor = reader(key).float()
        if model_arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.DECI) and (".q_proj." in key or ".k_proj." in key):
            heads = arch.num_attention_heads if ".q_proj." in key else \
                arch.layer_shape(int(key.split(".")[2])).num_key_value_heads
            tensor = rope_interleaved(tensor, heads)
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"--format gguf: {child.folder}: tensor {key} has no GGUF name in llama.cpp's "
                              f"{gguf.MODEL_ARCH_NAMES[model_arch]} architecture")
        _add_tensor(writer, gguf_name, tensor, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tensor(writer, name: str, tensor: torch.Tensor, dtype: str) -> None:
    import gguf

    if tensor.dim() == 1 or dtype == "float32":
        writer.add_tensor(name, tensor.numpy())
    elif dtype == "float16":
        writer.add_tensor(name, tensor.half().numpy())
    else:  # numpy has no bfloat16: the gguf package packs it
        data = gguf.quants.quantize(tensor.numpy(), gguf.GGMLQuantizationType.BF16)
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.BF16)


def _write_hparams(writer, child, dtype: str) -> None:
    import gguf

    arch, config = child.arch, child.config
    shapes = arch.layer_shapes
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.num_hidden_layers)
    if arch.is_uniform:
        writer.add_feed_forward_length(arch.intermediate_size)
        writer.add_head_count(arch.num_attention_heads)
        writer.add_head_count_kv(arch.num_key_value_heads)
    else:  # `deci`: a layer without attention has 0 query heads as well as 0 KV heads (deci.cpp tests n_head)
        writer.add_feed_forward_length([s.intermediate_size for s in shapes])
        writer.add_head_count([arch.num_attention_heads if s.attention else 0 for s in shapes])
        writer.add_head_count_kv([s.num_key_value_heads for s in shapes])
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_rope_dimension_count(arch.head_dim)
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type({"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                          "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])


def _write_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's `gpt2` BPE: every id's token (ids the tokenizer lacks, up to the embedding's
    rows, as unused padding), its type (special added tokens are control tokens, other added ones user-defined),
    the merges, the special ids, and whether BOS/EOS are added (as the HF tokenizer does on encoding)."""
    import gguf
    from tokenizers import Tokenizer

    # tokenizer.json itself, not transformers' class for the model type (which may add tokens of its own)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tokenizer.get_vocab(with_added_tokens=True)
    added = tokenizer.get_added_tokens_decoder()
    if max(ids.values()) >= vocab_size:
        raise ConfigError(f"--format gguf: {folder}: the tokenizer has ids up to {max(ids.values())} but the model "
                          f"only {vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in ids.items():
        tokens[i] = token
        types[i] = gguf.TokenType.NORMAL if i not in added else \
            gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    probe = tokenizer.encode("a").ids, tokenizer.encode("a", add_special_tokens=False).ids
    special.add_special_token = {"bos": probe[0][:1] != probe[1][:1], "eos": probe[0][-1:] != probe[1][-1:]}
    special.add_to_gguf(writer, quiet=True)
