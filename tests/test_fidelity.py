"""`nas-bench fidelity` end to end on the tiny model with tiny budgets (the benchmark itself is not a test)."""

import json

import pytest

from conftest import WIKITEXT, tiny_model
from nas.fidelity import Fidelity, FidelityPlan, asha_replay, kendall_tau, write_report

CANDIDATES = ("L4-H6-KV2-M40-E48", "L3-H6-KV2-M80-E48", "L4-H4-KV2-M80-E36", "L3-H6-KV2-M40-E36")


def test_kendall_tau_and_asha_replay():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    # Rungs at reports 1 and 2: "b" is worse than the median at report 1 and stops there; "c" at report 2.
    used = asha_replay({"a": [3.0, 2.0, 1.5, 1.0], "b": [4.0, 3.0, 2.0, 1.8], "c": [2.5, 2.5, 2.0, 1.2]})
    assert used == {"a": 4, "b": 1, "c": 2}


def test_fidelity_runs_every_arm_resumes_and_reports(tmp_path, tiny_tokenizer):
    tiny_model("llama").save_pretrained(tmp_path / "parent")
    tiny_tokenizer.save_pretrained(tmp_path / "parent")
    (tmp_path / "train.txt").write_text((WIKITEXT / "valid.txt").read_text()[:80_000])
    (tmp_path / "held.txt").write_text((WIKITEXT / "test.txt").read_text()[:20_000])
    plan = FidelityPlan(parent=str(tmp_path / "parent"), train_data=str(tmp_path / "train.txt"),
                        heldout_data=str(tmp_path / "held.txt"), candidates=CANDIDATES, budgets=(64, 128),
                        seq_len=16, batch_size=2, calibration=4, heldout=4, curve_sequences=2, topk=8, drop_samples=2,
                        warmup_steps=1)
    results = tmp_path / "out" / "fidelity.json"
    summary = Fidelity(plan, results).run_all()
    runs = json.loads(results.read_text())
    assert len([k for k in runs if k.startswith("kd|")]) == len(CANDIDATES) * 2 * 2
    assert {k.split("|")[2] for k in runs if k.startswith("depth|")} == {"drop", "block"}
    assert summary["agreement"][128]["mean_loss"]["tau"] == 1.0  # the longest budget agrees with itself
    assert all(len(r["curve"]) >= 2 for k, r in runs.items() if k.startswith("kd|"))
    # Training moves the loss, and seeds (data order) change it.
    c = CANDIDATES[0]
    assert runs[f"kd|{c}|128|0"]["heldout_loss"] != runs[f"zero-shot|{c}"]["heldout_loss"]
    assert runs[f"kd|{c}|128|0"]["heldout_loss"] != runs[f"kd|{c}|128|1"]["heldout_loss"]

    # A second benchmark object resumes from the file: no run is redone, the summary is the same.
    again = Fidelity(plan, results, log=lambda line: pytest.fail(f"re-ran {line}"))
    assert again.run_all() == summary
    report = write_report(again, summary, tmp_path / "out", "nas-bench fidelity", "test")
    text = report.read_text()
    for heading in ("Ranking stability", "Width vs depth", "KD vs CE", "departures", "ASHA"):
        assert heading in text
    assert (tmp_path / "out" / "fidelity_ranking.png").stat().st_size > 1000
