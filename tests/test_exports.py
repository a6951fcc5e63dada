"""Exports for the serving engines (nas/exports): vLLM's DeciLM folder and llama.cpp's GGUF.

Format-level checks run everywhere: what an engine reads back from the files (the GGUF through the gguf package's
own reader, the DeciLM config through transformers with its shipped configuration module) against the saved child
they came from. The refusals are one line, exit 2, before any pruning."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

import nas
from conftest import tiny_model
from nas.architecture import Architecture
from nas.cli import main
from nas.errors import ConfigError
from nas.exports import export
from nas.importance import ImportanceSettings, compute_importance
from nas.prune import prune

#: The mixed child of a tiny parent (4 layers, 6 query heads, 2 KV heads, MLP 80): layer 1 without attention,
#: layer 2 with 1 KV head and MLP 40, layer 3 without an MLP. Its GGUF form (llama.cpp cannot run an MLP-free
#: layer that keeps attention, nor an MLP-free last layer): layer 1 without either block, layer 3 without attention.
MIXED = {"1": {"skip": ["attention"]}, "2": {"num_key_value_heads": 1, "intermediate_size": 40},
         "3": {"skip": ["mlp"]}}
MIXED_GGUF = {"1": {"skip": ["attention", "mlp"]}, "2": MIXED["2"], "3": {"skip": ["attention"]}}


def _saved(tmp_path: Path, name: str, tokenizer, per_layer: dict | None = None, **config) -> Path:
    """A child of the tiny `name` parent saved as `nas prune` saves it: pruned to the layer table `per_layer` (a
    `per_layer_config`; none: the uniform parent itself), with config.json entries `config` changed (settings only
    the exports read)."""
    folder = tmp_path / f"{name}-child"
    model = tiny_model(name)
    if per_layer:
        tokens = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
        importances = compute_importance(model, tokens, ImportanceSettings(drop_samples=0))
        arch = Architecture.of_config(model.config)
        model = prune(model, importances, Architecture.from_dict({**arch.to_dict(), "per_layer_config": per_layer}))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if config:
        (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **config}))
    return folder


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return reader, {key: field.contents() for key, field in reader.fields.items()}


def _rope_hf(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """transformers' RoPE of one head's vector at position `pos` (dimension i rotates with i + d/2)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d = x.shape[-1]
    freqs = pos / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    emb = torch.cat([freqs, freqs])
    out, _ = apply_rotary_pos_emb(x[None, None].double(), x[None, None].double(), emb.cos()[None], emb.sin()[None])
    return out[0, 0]


def _rope_pairs(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """llama.cpp's `llama`/`deci` RoPE (ggml's normal mode) of one head's vector: dimensions 2i and 2i+1 rotate
    together by pos * theta^(-2i/d)."""
    d, x = x.shape[-1], x.double()
    angle = pos / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    even, odd = x[0::2], x[1::2]
    out = torch.empty_like(x)
    out[0::2] = even * angle.cos() - odd * angle.sin()
    out[1::2] = even * angle.sin() + odd * angle.cos()
    return out


def test_gguf_of_a_per_layer_child_reads_back_as_deci(tiny_tokenizer, tmp_path):
    child = _saved(tmp_path, "llama", tiny_tokenizer, MIXED_GGUF)
    path = export(child, tmp_path / "out", "gguf") / "model.gguf"
    reader, fields = _fields(path)
    assert fields["general.architecture"] == "deci"
    # Per layer, as the table above says: 6 query heads where attention is kept, KV heads, MLP widths (exact: no
    # rounding to 256, which would make 40 and 80 into 256).
    assert fields["deci.attention.head_count"] == [6, 0, 6, 0]
    assert fields["deci.attention.head_count_kv"] == [2, 0, 1, 0]
    assert fields["deci.feed_forward_length"] == [80, 0, 40, 80]
    assert fields["deci.attention.key_length"] == 12 and fields["deci.embedding_length"] == 48
    saved = load_file(child / "model.safetensors")
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.DECI, 4)
    assert len(tensors) == len(saved)  # untied: lm_head is output.weight; no tensor for a skipped block
    assert not [n for n in tensors if n.startswith(("blk.1.", "blk.3.attn"))]
    for key, value in saved.items():
        if ".q_proj." not in key and ".k_proj." not in key:
            assert torch.equal(tensors[names.get_name(key, try_suffixes=(".weight", ".bias"))], value), key
    # q/k rows are reordered for llama.cpp's RoPE: what matters is that every attention score is unchanged.
    torch.manual_seed(0)
    x, theta = torch.randn(48), 10000.0
    for j, kv in ((0, 2), (2, 1)):
        prefix = f"model.layers.{j}.self_attn"
        q_hf = (saved[f"{prefix}.q_proj.weight"] @ x + saved[f"{prefix}.q_proj.bias"]).view(6, 12)
        k_hf = (saved[f"{prefix}.k_proj.weight"] @ x + saved[f"{prefix}.k_proj.bias"]).view(kv, 12)
        q_gg = (tensors[f"blk.{j}.attn_q.weight"] @ x + tensors[f"blk.{j}.attn_q.bias"]).view(6, 12)
        k_gg = (tensors[f"blk.{j}.attn_k.weight"] @ x + tensors[f"blk.{j}.attn_k.bias"]).view(kv, 12)
        for h in range(6):
            g = h // (6 // kv)
            hf = _rope_hf(q_hf[h], 5, theta) @ _rope_hf(k_hf[g], 2, theta)
            gg = _rope_pairs(q_gg[h], 5, theta) @ _rope_pairs(k_gg[g], 2, theta)
            assert math.isclose(hf, gg, rel_tol=1e-9, abs_tol=1e-9), (j, h)


@pytest.mark.parametrize("name, arch", [("llama-tied", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"),
                                        ("qwen3", "qwen3")])
def test_gguf_of_a_uniform_child_is_the_family_architecture(tiny_tokenizer, tmp_path, name, arch):
    child = _saved(tmp_path, name, tiny_tokenizer)
    reader, fields = _fields(export(child, tmp_path / "out", "gguf") / "model.gguf")
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.attention.head_count"] == 6 and fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields[f"{arch}.feed_forward_length"] == 80
    saved = load_file(child / "model.safetensors")
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert len(tensors) == len(saved)  # a tied lm_head is not stored, in either
    if arch != "llama":  # qwen2/qwen3 in llama.cpp rotate halves, as transformers does: tensors as they are
        names = gguf.TensorNameMap(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.QWEN3, 4)
        for key, value in saved.items():
            assert torch.equal(tensors[names.get_name(key, try_suffixes=(".weight", ".bias"))], value), key


def test_gguf_tokenizer_is_the_childs(tiny_tokenizer, tmp_path):
    child = _saved(tmp_path, "llama", tiny_tokenizer)
    _, fields = _fields(export(child, tmp_path / "out", "gguf") / "model.gguf")
    tokenizer = AutoTokenizer.from_pretrained(child)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 320 and all(tokens[i] == token for i, token in by_id.items())
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    assert fields["tokenizer.ggml.eos_token_id"] == eos
    assert fields["tokenizer.ggml.token_type"][eos] == gguf.TokenType.CONTROL
    merges = json.loads((child / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert fields["tokenizer.ggml.add_bos_token"] is False


def test_gguf_in_bfloat16_keeps_vectors_in_float32(tiny_tokenizer, tmp_path):
    child = _saved(tmp_path, "llama", tiny_tokenizer)
    reader, _ = _fields(export(child, tmp_path / "out", "gguf", dtype="bfloat16") / "model.gguf")
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["token_embd.weight"] == gguf.GGMLQuantizationType.BF16
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    values = torch.from_numpy(embed.data.copy().view("<u2").astype("int32") << 16).view(torch.float32)
    saved = load_file(child / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(values.view(saved.shape), saved.bfloat16().float())


def test_decilm_folder_config_and_tensors(tiny_tokenizer, tmp_path):
    child = _saved(tmp_path, "llama", tiny_tokenizer, MIXED)
    out = export(child, tmp_path / "out", "decilm")
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["DeciLMForCausalLM"] and raw["model_type"] == "nemotron-nas"
    assert "per_layer_config" not in raw
    assert raw["block_configs"] == [
        {"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 3},
         "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": 80}},
        {"attention": {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None},
         "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": 80}},
        {"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 6},
         "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": 40}},
        {"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 3},
         "ffn": {"no_op": True, "replace_with_linear": False, "intermediate_size": None}}]
    # The shipped configuration module gives vLLM's attribute reads, with no `ffn_mult` (vLLM would round it).
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert config.block_configs[1].attention.no_op and config.block_configs[2].ffn.intermediate_size == 40
    assert not hasattr(config.block_configs[2].ffn, "ffn_mult")
    assert config.num_attention_heads // config.block_configs[2].attention.n_heads_in_group == 1
    assert load_file(out / "model.safetensors").keys() == load_file(child / "model.safetensors").keys()
    assert not [k for k in load_file(out / "model.safetensors") if k.startswith(("model.layers.1.self_attn",
                                                                                "model.layers.3.mlp"))]
    assert AutoTokenizer.from_pretrained(out)("a b").input_ids == AutoTokenizer.from_pretrained(child)("a b").input_ids


def test_decilm_in_bfloat16_casts_the_tensors(tiny_tokenizer, tmp_path):
    child = _saved(tmp_path, "qwen2", tiny_tokenizer, MIXED)
    out = export(child, tmp_path / "out", "decilm", dtype="bfloat16")
    saved, cast = load_file(child / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(cast[k], v.bfloat16()) for k, v in saved.items())
    raw = json.loads((out / "config.json").read_text())
    assert raw["dtype"] == "bfloat16" and raw["qkv_bias"] and not raw["attention_bias"]


@pytest.mark.parametrize("name, per_layer, fmt, message", [
    ("llama", {"2": {"skip": ["mlp"]}}, "gguf", "child layer 2 keeps attention but has no MLP, and llama.cpp's "
                                                "src/models/deci.cpp"),
    ("llama", {"3": {"skip": ["attention", "mlp"]}}, "gguf", "child layer 3, the last, has no MLP"),
    ("llama", {"0": {"skip": ["attention"]}}, "decilm", "child layer 0 has no attention"),
    ("llama", {"0": {"skip": ["attention"]}}, "gguf", "child layer 0 has no attention"),
    ("qwen3", {}, "decilm", "no q/k norms"),
    ("qwen3", {"1": {"intermediate_size": 40}}, "gguf", "`deci` architecture, whose layers have no q/k norms"),
    ("nemotron", {}, "gguf", "exports cover llama, mistral, qwen2, qwen3"),
    *((n, {"1": {"num_key_value_heads": 1}}, fmt, f"a per-layer {n} child runs in neither engine")
      for n in ("gemma2", "gemma3_text") for fmt in ("decilm", "gguf")),
])
def test_refusals_name_the_reason(tiny_tokenizer, tmp_path, name, per_layer, fmt, message):
    child = _saved(tmp_path, name, tiny_tokenizer, per_layer)
    with pytest.raises(ConfigError, match=re.escape(message)):
        export(child, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def test_refusals_of_what_the_engines_would_run_differently(tiny_tokenizer, tmp_path):
    windowed = _saved(tmp_path / "w", "mistral", tiny_tokenizer, sliding_window=16)
    with pytest.raises(ConfigError, match="sliding_window=16 is shorter than the context"):
        export(windowed, tmp_path / "out", "decilm")
    scaled = _saved(tmp_path / "r", "llama", tiny_tokenizer,
                    rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match="rope_type=linear"):
        export(scaled, tmp_path / "out", "gguf")
    plain = _saved(tmp_path / "t", "llama", tiny_tokenizer)
    spec = json.loads((plain / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (plain / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=re.escape("its pre-tokenizer (Whitespace) is none that llama.cpp names")):
        export(plain, tmp_path / "out", "gguf")


def test_prune_refuses_before_pruning_in_one_line(capsys, tiny_parent_dir, text_file, tmp_path):
    scores = tmp_path / "imp.safetensors"
    assert main(["importance", "--parent", str(tiny_parent_dir), "--data", str(text_file), "--out", str(scores),
                 "--samples", "4", "--seq-len", "32"]) == 0
    arch = {"num_hidden_layers": 4, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
            "head_dim": 12, "intermediate_size": 80, "layers": [0, 1, 2, 3],
            "per_layer_config": {"2": {"skip": ["mlp"]}}}
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    capsys.readouterr()
    code = main(["prune", "--parent", str(tiny_parent_dir), "--arch", str(tmp_path / "arch.json"), "--importance",
                 str(scores), "--out", str(tmp_path / "child"), "--format", "gguf"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "child layer 2 keeps attention but has no MLP" in err
    assert not (tmp_path / "child").exists()


def test_prune_and_export_write_the_format(capsys, tiny_parent_dir, text_file, tmp_path):
    scores = tmp_path / "imp.safetensors"
    assert main(["importance", "--parent", str(tiny_parent_dir), "--data", str(text_file), "--out", str(scores),
                 "--samples", "4", "--seq-len", "32"]) == 0
    arch = {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
            "head_dim": 12, "intermediate_size": 40}
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    common = ["prune", "--parent", str(tiny_parent_dir), "--arch", str(tmp_path / "arch.json"), "--importance",
              str(scores)]
    assert main([*common, "--out", str(tmp_path / "hf")]) == 0
    assert main([*common, "--out", str(tmp_path / "gg"), "--format", "gguf", "--dtype", "float16"]) == 0
    capsys.readouterr()
    reader, fields = _fields(tmp_path / "gg" / "model.gguf")
    assert fields["llama.block_count"] == 3 and fields["llama.feed_forward_length"] == 40
    assert json.loads((tmp_path / "gg" / "architecture.json").read_text()) == \
        json.loads((tmp_path / "hf" / "architecture.json").read_text())
    down = next(t for t in reader.tensors if t.name == "blk.2.ffn_down.weight")
    hf = load_file(tmp_path / "hf" / "model.safetensors")["model.layers.2.mlp.down_proj.weight"]
    assert torch.equal(torch.from_numpy(down.data.copy()), hf.half())
    assert main(["prune", *common[1:], "--out", str(tmp_path / "bad"), "--dtype", "float16"]) == 2
    assert "--dtype float16: applies to --format decilm and gguf" in capsys.readouterr().err



def test_export_takes_a_format_only_for_its_checkpoint(capsys, tmp_path):
    assert main(["export", "--study", "s", "--out", str(tmp_path / "best.json"), "--format", "gguf"]) == 2
    assert "--format/--dtype: they say how to write --checkpoint; give --checkpoint DIR" in capsys.readouterr().err

# The engines run the exports of children of the real SmolLM2-135M with the greedy tokens of nas's own loader
# (fp32, 24 tokens, two prompts given as text: each engine tokenizes them, llama.cpp with the GGUF's vocabulary).

#: The per-layer child of the issue's bar: layer 3 without attention, layer 7 without an MLP, 1 KV head (of 3) in
#: layers 10, 11 and 14, MLP widths 512 (layers 12-13) and 1024 (14-15) of 1536; all 30 layers kept.
BAR = {"3": {"skip": ["attention"]}, "7": {"skip": ["mlp"]}, "10": {"num_key_value_heads": 1},
       "11": {"num_key_value_heads": 1}, "12": {"intermediate_size": 512}, "13": {"intermediate_size": 512},
       "14": {"num_key_value_heads": 1, "intermediate_size": 1024}, "15": {"intermediate_size": 1024}}
#: The uniform demo winner's shape, L20-H9-KV3-M1280-E576 (its 20 layers kept by importance).
WINNER = {"num_hidden_layers": 20, "intermediate_size": 1280}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M's importances on a little of the plays, saved for `nas prune`, and a folder to work in."""
    from nas.data import load_tokens
    from nas.parents import load_parent

    folder = tmp_path_factory.mktemp("smollm2")
    model, tokenizer = load_parent("smollm2-135m", device=torch.device("cpu"), dtype=torch.float32)
    compute_importance(model, load_tokens("shakespeare", tokenizer, 64)[:8],
                       ImportanceSettings(drop_samples=0)).save(folder / "imp.safetensors")
    return folder


def _pruned(capsys, folder: Path, name: str, arch: dict, fmt: str = "hf") -> Path:
    """`nas prune` of SmolLM2 to `arch` (its own JSON updated) in format `fmt`."""
    parent = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
              "head_dim": 64, "intermediate_size": 1536, "layers": list(range(30))}
    full = {**parent, **arch}
    if full["num_hidden_layers"] != 30:
        del full["layers"]  # kept by importance
    (folder / f"{name}.json").write_text(json.dumps(full))
    out = folder / f"{name}-{fmt}"
    assert main(["prune", "--arch", str(folder / f"{name}.json"), "--importance", str(folder / "imp.safetensors"),
                 "--out", str(out), "--format", fmt]) == 0, capsys.readouterr().err
    return out


def _reference(child: Path) -> tuple[list[list[int]], list[list[int]]]:
    """The prompts' token ids and nas.load's greedy continuations of them."""
    from test_engines import NEW_TOKENS, PROMPTS, greedy

    model = nas.load(child, dtype=torch.float32).eval()
    ids = [AutoTokenizer.from_pretrained(child)(p).input_ids for p in PROMPTS]
    return ids, [greedy(model, i, NEW_TOKENS) for i in ids]


def _vllm_matches(child: Path, decilm: Path) -> None:
    from nas.engines import vllm_greedy
    from test_engines import NEW_TOKENS, PROMPTS

    prompt_ids, reference = _reference(child)
    runs = vllm_greedy(decilm, PROMPTS, NEW_TOKENS, trust_remote_code=True)
    assert [r.prompt_ids for r in runs] == prompt_ids
    assert [r.token_ids for r in runs] == reference


def _llama_cpp_matches(child: Path, gguf_folder: Path) -> None:
    from nas.engines import llama_greedy
    from test_engines import NEW_TOKENS, PROMPTS

    prompt_ids, reference = _reference(child)
    runs = llama_greedy(gguf_folder / "model.gguf", PROMPTS, NEW_TOKENS)
    assert [r.prompt_ids for r in runs] == prompt_ids  # the GGUF's vocabulary splits text as the HF tokenizer
    assert [r.token_ids for r in runs] == reference


@pytest.mark.slow
@pytest.mark.engine("vllm")
def test_vllm_runs_the_decilm_export_of_a_per_layer_smollm2_child(capsys, smollm2):
    arch = {"per_layer_config": BAR}
    _vllm_matches(_pruned(capsys, smollm2, "bar", arch), _pruned(capsys, smollm2, "bar", arch, "decilm"))
    # The same child as a GGUF is refused, in one line, for its MLP-free layer.
    (smollm2 / "gguf-try").mkdir()
    assert main(["prune", "--arch", str(smollm2 / "bar.json"), "--importance", str(smollm2 / "imp.safetensors"),
                 "--out", str(smollm2 / "gguf-try" / "out"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "child layer 7 keeps attention but has no MLP" in err[0]


@pytest.mark.slow
@pytest.mark.engine("llama.cpp")
def test_llama_cpp_runs_the_gguf_export_of_the_child_without_its_mlp_free_layer(capsys, smollm2):
    arch = {"per_layer_config": {k: v for k, v in BAR.items() if k != "7"}}
    _llama_cpp_matches(_pruned(capsys, smollm2, "bar-gguf", arch),
                       _pruned(capsys, smollm2, "bar-gguf", arch, "gguf"))


@pytest.mark.slow
@pytest.mark.engine("vllm")
def test_vllm_runs_the_decilm_export_of_the_uniform_winner(capsys, smollm2):
    _vllm_matches(_pruned(capsys, smollm2, "winner", WINNER), _pruned(capsys, smollm2, "winner", WINNER, "decilm"))


@pytest.mark.slow
@pytest.mark.engine("llama.cpp")
def test_llama_cpp_reads_widths_exactly_and_runs_a_layer_without_either_block(tiny_tokenizer, tmp_path):
    """MLP widths 80 and 40 (no multiple of 256: llama.cpp would fail to load them rounded), a layer without
    either block, one without attention, and Llama's biases: llama.cpp's tokens are nas.load's."""
    from nas.engines import llama_greedy
    from test_engines import greedy

    child = _saved(tmp_path, "llama", tiny_tokenizer, MIXED_GGUF)
    prompts = [[5, 17, 33, 101, 7], [250, 3, 64, 12, 199, 42]]
    runs = llama_greedy(export(child, tmp_path / "out", "gguf") / "model.gguf", prompts, 12)
    model = nas.load(child, dtype=torch.float32).eval()
    assert [r.token_ids for r in runs] == [greedy(model, p, 12) for p in prompts]
