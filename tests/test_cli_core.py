import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from nas.architecture import Architecture
from nas.cli import main
from nas.families import family_of


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def _importance(capsys, parent, data, out, samples=4):
    return _run(capsys, "importance", "--parent", parent, "--data", data, "--out", out, "--samples", samples,
                "--seq-len", 32, "--drop-samples", 2)


def test_importance_then_prune_writes_a_stock_checkpoint(capsys, tiny_parent_dir, text_file, tmp_path):
    scores = tmp_path / "imp.safetensors"
    assert _importance(capsys, tiny_parent_dir, text_file, scores) == (0, "")
    arch = {"num_hidden_layers": 3, "hidden_size": 36, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 12, "intermediate_size": 40}  # no "layers": picked by Block Importance
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    code, err = _run(capsys, "prune", "--parent", tiny_parent_dir, "--arch", tmp_path / "arch.json",
                     "--importance", scores, "--out", tmp_path / "child")
    assert (code, err) == (0, "")
    child = AutoModelForCausalLM.from_pretrained(tmp_path / "child")
    saved = Architecture.from_dict(json.loads((tmp_path / "child" / "architecture.json").read_text()))
    assert saved.num_hidden_layers == 3 and len(saved.layers) == 3
    parent_config = AutoModelForCausalLM.from_pretrained(tiny_parent_dir).config
    assert sum(p.numel() for p in child.parameters()) == family_of(parent_config).num_parameters(parent_config, saved)
    with torch.no_grad():
        assert torch.isfinite(child(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("change, message", [
    ({"intermediate_size": 81}, "intermediate_size=81 is larger than the parent's 80"),
    ({"num_attention_heads": 5}, "num_attention_heads=5 must be a multiple of num_key_value_heads=2"),
])
def test_bad_architecture_is_one_line(capsys, tiny_parent_dir, text_file, tmp_path, change, message):
    scores = tmp_path / "imp.safetensors"
    _importance(capsys, tiny_parent_dir, text_file, scores)
    arch = {**Architecture(4, 48, 6, 2, 12, 80, (0, 1, 2, 3)).to_dict(), **change}
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    code, err = _run(capsys, "prune", "--parent", tiny_parent_dir, "--arch", tmp_path / "arch.json",
                     "--importance", scores, "--out", tmp_path / "child")
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "child").exists()


def test_unknown_family_is_one_line(capsys, tmp_path, text_file):
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    code, err = _importance(capsys, tmp_path / "gpt2", text_file, tmp_path / "imp.safetensors")
    assert code == 2 and "model_type='gpt2' is not supported; supported families: bamba, falcon_h1, gemma2, " \
                         "gemma3_text, gpt_oss, granite, llama" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("text, message", [("", "holds no text"), ("a few words only", "need at least 4")])
def test_empty_or_short_calibration_data_is_one_line(capsys, tiny_parent_dir, tmp_path, text, message):
    data = tmp_path / "short.txt"
    data.write_text(text)
    code, err = _importance(capsys, tiny_parent_dir, data, tmp_path / "imp.safetensors")
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_missing_and_corrupt_importance_files(capsys, tiny_parent_dir, tmp_path):
    (tmp_path / "arch.json").write_text(Architecture(4, 48, 6, 2, 12, 80, (0, 1, 2, 3)).to_json())
    args = ["prune", "--parent", tiny_parent_dir, "--arch", tmp_path / "arch.json", "--out", tmp_path / "c"]
    code, err = _run(capsys, *args, "--importance", tmp_path / "none.safetensors")
    assert code == 2 and "no such file; run `nas importance" in err
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    code, err = _run(capsys, *args, "--importance", tmp_path / "bad.safetensors")
    assert code == 2 and "unreadable or corrupt" in err and len(err.splitlines()) == 1


def test_console_script_exits_non_zero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nas.cli", "importance", "--parent", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("no such checkpoint directory (or use a hub id, or 'smollm2-135m' or "
                                          "'gemma3-270m')")


def test_eval_with_a_bad_model_folder_names_the_model_flag(capsys, tmp_path):
    assert main(["eval", "--model", str(tmp_path), "--tasks", "nas_cloze"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nas eval: error: --model {tmp_path}: not an HF checkpoint") and len(err.splitlines()) == 1


def test_export_from_a_uri_run_folder_needs_the_database_url(capsys):
    assert main(["export", "--study", "s", "--root", "s3://bucket/runs", "--out", "best.json"]) == 2
    err = capsys.readouterr().err
    assert "--storage: the run folder s3://bucket/runs is a URI" in err and len(err.splitlines()) == 1


def test_tokenize_writes_shards_that_any_data_flag_reads(capsys, tiny_parent_dir, text_file, tmp_path):
    shards = tmp_path / "shards"
    assert main(["tokenize", "--parent", str(tiny_parent_dir), "--data", str(text_file), "--seq-len", "32",
                 "--out", str(shards)]) == 0
    assert capsys.readouterr().out.startswith(f"tokenized {text_file} -> {shards}: ")
    from_text, from_shards = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _importance(capsys, tiny_parent_dir, text_file, from_text) == (0, "")
    assert _importance(capsys, tiny_parent_dir, shards, from_shards) == (0, "")
    from safetensors.torch import load_file

    a, b = load_file(str(from_text)), load_file(str(from_shards))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same tokens, so the same scores


def test_prune_refuses_kind_counts_that_disagree_with_the_layers_beside_them(capsys, tmp_path, tiny_tokenizer,
                                                                            text_file):
    """`nas arch` writes a hybrid's `layers` and its count of each kind; a count edited while `layers` stays is
    refused in one line (before, `layers` silently won and every layer was kept), and dropping `layers` makes the
    counts pick each kind's best layers."""
    from conftest import tiny_model

    tiny_model("nemotron_h").save_pretrained(tmp_path / "parent")
    tiny_tokenizer.save_pretrained(tmp_path / "parent")
    p, scores = tmp_path / "parent", tmp_path / "imp.safetensors"
    assert main(["arch", "--parent", str(p), "--out", str(tmp_path / "keep.json")]) == 0
    assert _importance(capsys, p, text_file, scores) == (0, "")
    arch = json.loads((tmp_path / "keep.json").read_text())
    assert arch["layers.linear_attention"] == 2
    arch["layers.linear_attention"] = 1
    (tmp_path / "cut.json").write_text(json.dumps(arch))
    args = ["prune", "--parent", p, "--arch", tmp_path / "cut.json", "--importance", scores]
    code, err = _run(capsys, *args, "--out", tmp_path / "refused")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "layers.linear_attention=1" in err and "holds 2" in err and "drop 'layers'" in err
    assert not (tmp_path / "refused").exists()
    (tmp_path / "cut.json").write_text(json.dumps({k: v for k, v in arch.items() if k != "layers"}))
    assert _run(capsys, *args, "--out", tmp_path / "child") == (0, "")
    assert json.loads((tmp_path / "child" / "config.json").read_text())["layers_block_type"].count(
        "linear_attention") == 1
