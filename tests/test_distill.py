import json
import shutil

import pytest
import torch

from conftest import tiny_model
from nas.architecture import Architecture
from nas.distill import DistillConfig, Distiller, lr_factor, sample_indices
from nas.errors import ConfigError, TrainingError
from nas.importance import ImportanceSettings, compute_importance
from nas.prune import prune
from nas.sharding import latest_checkpoint
from nas.teacher_cache import cached_topk, compute_topk

TRAIN = torch.randint(0, 320, (12, 16), generator=torch.Generator().manual_seed(2))
VAL = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(3))
CFG = DistillConfig(tokens=8 * 4 * 16, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=0)


def _pair(layers=(0, 1, 2, 3), hidden=48):
    teacher = tiny_model("llama")
    imp = compute_importance(teacher, TRAIN, ImportanceSettings(drop_samples=0))
    arch = Architecture.of_config(teacher.config).replace(num_hidden_layers=len(layers), layers=tuple(layers),
                                                          hidden_size=hidden, intermediate_size=40)
    return prune(teacher, imp, arch).train(), teacher, list(layers)


def test_lr_schedule_warms_up_then_decays_to_floor():
    values = [lr_factor(s, 10, 2, 0.1) for s in range(12)]
    assert values[0] == 0.5 and values[1] == 1.0 and values[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[1:], values[2:])) and values[10] == pytest.approx(0.1)


def test_sampling_covers_each_epoch_once():
    cfg = DistillConfig(batch_size=4)
    epoch = torch.cat([sample_indices(s, 0, cfg, 12) for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(12))
    assert torch.equal(sample_indices(5, 0, cfg, 12), sample_indices(5, 0, cfg, 12))


def test_kd_lowers_the_kd_loss_and_writes_a_stock_checkpoint(tmp_path):
    student, teacher, layers = _pair()
    before = Distiller(student, teacher, TRAIN, VAL, tmp_path / "x", CFG, layers).evaluate()
    result = Distiller(student, teacher, TRAIN, VAL, tmp_path / "run", CFG, layers).run(progress=False)
    assert result["finished"] and result["val_kd"] < before["val_kd"]
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(VAL).logits, student.eval()(VAL).logits)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 9)) and "val_loss" in lines[-1]
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_evaluation_equals_the_full_logits_losses(tmp_path):
    """The chunked evaluation (one student forward for both figures) against the reference: HF's own LM loss
    and forward KL over full [batch, seq, vocab] logits, with a chunk smaller than a batch and a ragged last batch."""
    from nas.importance import lm_loss
    from nas.losses import forward_kl

    student, teacher, layers = _pair()
    val = torch.randint(0, 320, (5, 16), generator=torch.Generator().manual_seed(4))
    cfg = DistillConfig(**{**CFG.__dict__, "loss_chunk_tokens": 24})
    got = Distiller(student, teacher, TRAIN, val, tmp_path / "x", cfg, layers).evaluate()
    with torch.no_grad():
        kd = sum(float(forward_kl(student(b).logits, teacher(b).logits, torch.ones(b.shape, dtype=torch.bool)))
                 * b.shape[0] for b in val.split(cfg.batch_size)) / val.shape[0]
    assert got["val_loss"] == pytest.approx(lm_loss(student, val, cfg.batch_size), rel=1e-5)
    assert got["val_kd"] == pytest.approx(kd, rel=1e-5)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg = DistillConfig(**{**CFG.__dict__, "grad_accum": 2, "tokens": 6 * 2 * 4 * 16})
    student, teacher, layers = _pair()
    whole = Distiller(student, teacher, TRAIN, VAL, tmp_path / "whole", cfg, layers).run(progress=False)
    student, teacher, layers = _pair()
    partial = Distiller(student, teacher, TRAIN, VAL, tmp_path / "cut", cfg, layers).run(stop_after=3, progress=False)
    assert partial == {"step": 3, "finished": False} and (tmp_path / "cut" / "checkpoint").exists()
    student, teacher, layers = _pair()  # a fresh process: nothing but the folder carries over
    resumed = Distiller(student, teacher, TRAIN, VAL, tmp_path / "cut", cfg, layers).run(progress=False)
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    again = Distiller(student, teacher, TRAIN, VAL, tmp_path / "cut", cfg, layers).run(progress=False)
    assert again == resumed  # a finished run is not redone

    # A crash while writing leaves a temporary folder, or (crash between the shards and state.json) a step folder
    # without state.json: neither is loaded; the run resumes from the last complete checkpoint.
    student, teacher, layers = _pair()
    Distiller(student, teacher, TRAIN, VAL, tmp_path / "crashed", cfg, layers).run(stop_after=3, progress=False)
    folder = tmp_path / "crashed" / "checkpoint"
    for name in (".step-000005.tmp", "step-000004"):
        shutil.copytree(folder / "step-000003", folder / name)
        (folder / name / "state.json").unlink()
        for f in (folder / name).glob("*.distcp"):
            f.write_bytes(f.read_bytes()[:100])  # truncated
    assert latest_checkpoint(folder).name == "step-000003"
    student, teacher, layers = _pair()
    resumed = Distiller(student, teacher, TRAIN, VAL, tmp_path / "crashed", cfg, layers).run(progress=False)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)


def test_run_in_a_uri_scratch_folder_resumes_from_the_checkpoint_copied_up(tmp_path):
    """A search retrain in a URI run folder trains in a scratch folder removed on exit: each checkpoint is copied
    up, and a new attempt in a fresh scratch folder restores it and ends as an uninterrupted run does, its log
    holding every step once."""
    from nas.search.trials import _restore_checkpoint, _upload_checkpoint
    from nas.storage import RunStorage

    cfg = DistillConfig(**{**CFG.__dict__, "checkpoint_every": 2})
    student, teacher, layers = _pair()
    whole = Distiller(student, teacher, TRAIN, VAL, tmp_path / "whole", cfg, layers).run(progress=False)
    storage = RunStorage(f"file://{tmp_path}/runs", "study")
    student, teacher, layers = _pair()
    killed = Distiller(student, teacher, TRAIN, VAL, tmp_path / "scratch-1", cfg, layers)
    killed.on_checkpoint = lambda out: _upload_checkpoint(storage, "L2", out)
    killed.run(stop_after=5, progress=False)  # checkpoints at 2, 4 and 5 (the stop)
    assert storage.listdir("L2/checkpoint") == ["step-000005"]  # the older ones dropped
    shutil.rmtree(tmp_path / "scratch-1")

    _restore_checkpoint(storage, "L2", tmp_path / "scratch-2")
    student, teacher, layers = _pair()
    resumed = Distiller(student, teacher, TRAIN, VAL, tmp_path / "scratch-2", cfg, layers).run(progress=False)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)
    lines = [json.loads(line) for line in (tmp_path / "scratch-2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 9))
    assert [r["resumed_at_step"] for r in lines if "resumed_at_step" in r] == [5]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    student, teacher, layers = _pair()
    run = Distiller(student, teacher, TRAIN, VAL, tmp_path / "run", CFG, layers)
    run.run(stop_after=2, progress=False)
    with torch.no_grad():  # the teacher is not in the checkpoint, so resuming cannot undo this
        teacher.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="non-finite loss nan at step 2; the last good checkpoint"):
        run.run(progress=False)
    state = json.loads((latest_checkpoint(tmp_path / "run" / "checkpoint") / "state.json").read_text())
    assert state["step"] == 2


def test_cached_teacher_with_exact_storage_equals_online_kd(tmp_path):
    student, teacher, layers = _pair()
    exact = cached_topk(teacher, TRAIN, 320, tmp_path, "t", dtype=torch.float32, rows_per_shard=5)
    online = Distiller(student, teacher, TRAIN, VAL, tmp_path / "a", CFG, layers)
    cached = Distiller(student, teacher, TRAIN, VAL, tmp_path / "b", CFG, layers, teacher_topk=exact)
    idx = torch.tensor([0, 5, 7, 11])  # rows from all three shards
    with torch.no_grad():
        assert float(cached.loss(idx)["kd"]) == pytest.approx(float(online.loss(idx)["kd"]), rel=1e-5)
    whole = compute_topk(teacher, TRAIN, 320, dtype=torch.float32)
    assert torch.equal(exact.read_all().index, whole.index) and torch.equal(exact.read_all().logprobs, whole.logprobs)
    small = compute_topk(teacher, TRAIN[:2], 8)
    assert small.logprobs.dtype == torch.float16 and small.index.shape == (2, 16, 8)


def test_intermediate_loss_turns_on_when_depth_drops_past_threshold(tmp_path):
    student, teacher, layers = _pair(layers=(0, 3), hidden=36)
    run = Distiller(student, teacher, TRAIN, VAL, tmp_path / "deep", CFG, layers)
    assert run.intermediate and run.projection.weight.shape == (48, 36)
    parts = run.loss(torch.tensor([0, 1]))
    assert {"kd", "is", "loss"} <= set(parts) and torch.isfinite(parts["loss"])
    # dynamic alpha: the intermediate term is scaled to the logit term's size
    assert float(parts["loss"].detach()) == pytest.approx(2 * float(parts["kd"].detach()), rel=1e-5)
    shallow, teacher, layers = _pair(layers=(0, 1, 3))
    assert not Distiller(shallow, teacher, TRAIN, VAL, tmp_path / "s", CFG, layers).intermediate


def test_plain_cross_entropy_needs_no_teacher(tmp_path):
    student, _, _ = _pair()
    cfg = DistillConfig(**{**CFG.__dict__, "kd": "none", "ce_weight": 1.0})
    result = Distiller(student, None, TRAIN, VAL, tmp_path / "ce", cfg).run(progress=False)
    assert result["finished"] and "val_kd" not in result
    with pytest.raises(ConfigError, match="kd='none' needs ce_weight > 0"):
        DistillConfig(kd="none")


def test_lm_eval_runs_the_shipped_task_offline(tiny_tokenizer):
    from nas.evaluate import lm_eval_tasks

    model = tiny_model("llama")
    scores = lm_eval_tasks(model, tiny_tokenizer, ["nas_cloze"], limit=6, batch_size=4)
    assert 0.0 <= scores["nas_cloze"]["acc"] <= 1.0 and "acc_norm" in scores["nas_cloze"]


def test_teacher_cache_recomputes_only_damaged_or_missing_shards(tmp_path):
    _, teacher, _ = _pair()
    first = cached_topk(teacher, TRAIN, 16, tmp_path, "t", rows_per_shard=4)
    shards = [tmp_path / "t" / name for name in first.index["shards"]]
    assert len(shards) == 3
    stamps = [p.stat().st_mtime_ns for p in shards]
    shards[1].write_bytes(shards[1].read_bytes()[:200])  # damaged
    shards[2].unlink()  # never written: a crash before its rename leaves only a hidden temp file
    (tmp_path / "t" / f".{shards[2].name}.x.tmp").write_bytes(b"half")
    again = cached_topk(teacher, TRAIN, 16, tmp_path, "t", rows_per_shard=4)
    assert shards[0].stat().st_mtime_ns == stamps[0]  # the intact shard was kept, not recomputed
    assert torch.equal(again.read_all().index, first.read_all().index)
    assert torch.equal(again.read_all().logprobs, first.read_all().logprobs)
    other = cached_topk(teacher, TRAIN, 8, tmp_path, "t", rows_per_shard=4)  # another K: new shards, new index
    assert other.read_all().index.shape == (12, 16, 8) and len(list((tmp_path / "t").glob("shard-*"))) == 6


def test_teacher_cache_filled_by_parts_equals_one_process(tmp_path):
    from nas.storage import RunStorage
    from nas.teacher_cache import TopKShards, publish, topk_plan, write_part

    _, teacher, _ = _pair()
    one = cached_topk(teacher, TRAIN, 16, tmp_path, "one", rows_per_shard=2).read_all()
    storage, plan = RunStorage(tmp_path, ""), topk_plan(teacher, TRAIN, 16, rows_per_shard=2)
    for part in (2, 0):  # as three tasks would, in any order; part 1 is missing
        write_part(teacher, TRAIN, storage, "three", plan, part, 3)
    assert sorted(p.name[:11] for p in (tmp_path / "three").glob("shard-*")) == [
        "shard-00000", "shard-00002", "shard-00003", "shard-00005"]
    write_part(teacher, TRAIN, storage, "three", plan, 1, 3)
    publish(storage, "three", plan)
    parallel = TopKShards(tmp_path / "three").read_all()
    assert torch.equal(parallel.index, one.index) and torch.equal(parallel.logprobs, one.logprobs)
