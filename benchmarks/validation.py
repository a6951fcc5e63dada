"""`nas-bench validation`: the demo search's own ranking: its candidates after the short retrain against a 4x longer
one, with 8..128 validation sequences of its split (resumable)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

from benchmarks.common import DEMO_SPACE, RESULTS
from nas.files import write_json


def per_sequence_loss(model, val: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Each validation sequence's mean next-token cross-entropy (their mean is `Distiller.evaluate`'s val_loss)."""
    out = []
    with torch.no_grad():
        for batch in val.split(batch_size):
            logits = model(input_ids=batch).logits[:, :-1].float()
            out += torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none") \
                .mean(1).tolist()
    return out


def run(path: Path, short: int = 4096, factor: int = 4, sizes: tuple[int, ...] = (8, 16, 32, 64, 128)):
    """The demo space's candidates, each short-retrained as a demo trial does (`short` tokens, the teacher's cached
    top-K) and `factor` times longer (the teacher online, as in promotion), then scored on the first n of
    max(sizes) sequences of the demo's own validation split: how many sequences make the short ranking agree with
    the longer one (Kendall tau, same top-1)? Each run is saved to `path` when it ends; a re-run resumes."""
    import tempfile

    from scipy.stats import kendalltau

    from nas.distill import Distiller
    from nas.search import candidate_inputs, prepare, retrain_config
    from nas.space import load_space

    demo = load_space(DEMO_SPACE)
    space = dataclasses.replace(demo, val_sequences=max(sizes), promote=0,
                                full_retrain=dataclasses.replace(demo.full_retrain, tokens=short * factor))
    shared = prepare(space, RESULTS / "validation-trials")
    # The saved runs count only for the same sequences (a change to the space or to how rows are drawn moves them).
    data = hashlib.sha256(shared.val.numpy().tobytes() + shared.train_rows.tobytes()).hexdigest()[:16]
    saved = json.loads(path.read_text()) if path.exists() else {}
    runs = saved.get("runs", {}) if saved.get("data") == data else {}
    for tokens in (short, short * factor):
        spec = dataclasses.replace(space.short_retrain, tokens=tokens)
        # No evaluations on the way (they would cost more than the training): the losses are taken after it.
        cfg = dataclasses.replace(retrain_config(spec, space.seq_len, space.search.seed, checkpoint_tokens=10 * tokens),
                                  eval_every=0)
        for label in shared.rows:
            key = f"{tokens}/{label}"
            if key in runs:
                continue
            start = time.perf_counter()
            inputs = candidate_inputs(shared, label, promoted=tokens > short, device=torch.device("cpu"))
            with tempfile.TemporaryDirectory() as out:
                Distiller(inputs.student, inputs.teacher, inputs.train, inputs.val[:1], out, cfg, inputs.layer_map,
                          inputs.topk).run(progress=False, save_model=False)
            trained = time.perf_counter() - start
            losses = per_sequence_loss(inputs.student, shared.val)
            runs[key] = {"per_sequence": losses, "train_s": trained, "eval_s": time.perf_counter() - start - trained}
            write_json(path, {"data": data, "runs": runs})
            print(f"{key}: val {sum(losses) / len(losses):.4f} (train {trained:.0f} s)", flush=True)
    labels = list(shared.rows)

    def mean(tokens: int, n: int) -> list[float]:
        return [sum(runs[f"{tokens}/{label}"]["per_sequence"][:n]) / n for label in labels]

    longest = mean(short * factor, max(sizes))
    agreement = {}
    for n in sizes:
        ranked, same_n = mean(short, n), mean(short * factor, n)
        agreement[n] = {"tau_vs_long_at_max": float(kendalltau(ranked, longest).statistic),
                        "tau_vs_long_at_n": float(kendalltau(ranked, same_n).statistic),
                        "top1_same": labels[ranked.index(min(ranked))] == labels[longest.index(min(longest))],
                        "eval_s_per_trial_eval": sum(runs[f"{short}/{label}"]["eval_s"] for label in labels)
                        / len(labels) * n / max(sizes)}
    return {"short_tokens": short, "long_tokens": short * factor, "candidates": labels,
            "val_loss": {t: dict(zip(labels, mean(t, max(sizes)))) for t in (short, short * factor)},
            "agreement": agreement}
