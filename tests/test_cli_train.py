import json

import pytest

from transformers import AutoModelForCausalLM

from nas.architecture import Architecture
from nas.cli import main


def _ok(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_prune_distill_eval_and_correct_teacher(capsys, tiny_parent_dir, text_file, tmp_path):
    scores, child, run = tmp_path / "imp.safetensors", tmp_path / "child", tmp_path / "run"
    _ok(capsys, "importance", "--parent", tiny_parent_dir, "--data", text_file, "--out", scores, "--samples", 4,
        "--seq-len", 32, "--drop-samples", 0)
    (tmp_path / "arch.json").write_text(Architecture(2, 36, 6, 2, 12, 40, (0, 3)).to_json())
    _ok(capsys, "prune", "--parent", tiny_parent_dir, "--arch", tmp_path / "arch.json", "--importance", scores,
        "--out", child)
    # A few thousand tokens: the teacher's top-K cache covers all of the training split, and 3 steps use 12 rows.
    small = tmp_path / "small.txt"
    small.write_text(text_file.read_text()[:8000])
    train = ["--data", small, "--seq-len", 32, "--tokens", 4 * 32 * 3, "--quiet", "--lr", 1e-3]
    out = _ok(capsys, "distill", "--student", child, "--teacher", tiny_parent_dir, "--out", run, *train,
              "--teacher-topk", 16)
    assert out.startswith(f"distilled -> {run}/model: val loss")
    result = json.loads((run / "result.json").read_text())
    assert result["intermediate_loss"] is True  # 2 of 4 layers kept: more than 25% dropped
    AutoModelForCausalLM.from_pretrained(run / "model")
    assert main(["distill", "--student", str(child), "--teacher", str(tiny_parent_dir), "--out", str(run),
                 *map(str, train)]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    again = _ok(capsys, "distill", "--student", child, "--teacher", tiny_parent_dir, "--out", run, *train,
                "--teacher-topk", 16, "--resume")
    assert again == out  # finished: resuming returns the same result without training
    report = json.loads(_ok(capsys, "eval", "--model", run / "model", "--data", text_file, "--seq-len", 32,
                            "--tasks", "nas_cloze", "--limit", 4, "--out", tmp_path / "eval.json"))
    assert report["heldout"]["loss"] > 0 and "acc" in report["lm_eval"]["nas_cloze"]
    assert json.loads((tmp_path / "eval.json").read_text()) == report
    out = _ok(capsys, "correct-teacher", "--parent", tiny_parent_dir, "--pretrain-lr", 5e-3,
              "--out", tmp_path / "teacher", *train)
    first = json.loads((tmp_path / "teacher" / "metrics.jsonl").read_text().splitlines()[0])
    peak = 5e-3 / 5  # a fifth of the pre-training LR (2408.11796)
    assert first["lr"] == pytest.approx(peak / 5)  # the first of 5 warm-up steps
    AutoModelForCausalLM.from_pretrained(tmp_path / "teacher" / "model")


def test_reverse_kd_with_a_teacher_cache_is_refused_before_any_work(capsys, tiny_parent_dir, text_file, tmp_path):
    code = main(["distill", "--student", str(tiny_parent_dir), "--teacher", str(tiny_parent_dir), "--data",
                 str(text_file), "--tokens", "4096", "--out", str(tmp_path / "run"), "--kd", "reverse",
                 "--teacher-topk", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--teacher-topk 8" in err[0] and "--kd forward" in err[0]
    assert not (tmp_path / "run").exists()
