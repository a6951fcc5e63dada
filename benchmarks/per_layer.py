"""`nas-bench per-layer`: the per-layer search (docs/per-layer-search.md) against the uniform one, in three settings:
each search's per-layer winner and uniform winner after equal KD tokens on held-out WikiText-2 (2 seeds), their
decode latency in HF, vLLM and llama.cpp, the block scores' additivity, the short-KD ranking against a 4x longer
one, and the program's winner against random per-layer children of the same budget (resumable)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from benchmarks.common import HELDOUT, RESULTS, ROOT
from nas.data import load_tokens, shuffled_rows
from nas.files import write_json
from nas.search.per_layer import DIGEST, SCORES

FOLDER = RESULTS / "per-layer"
# setting -> (the shipped space it starts from, what it changes). Every search promotes nothing (the benchmark
# retrains the winners itself) and keeps training sequences for 16,384 KD tokens (its `full_retrain`).
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2-demo": ("smollm2-135m-per-layer.yaml", {}),
    # About half of the 106.2M non-embedding parameters, with the demo's variant menu (its narrowest child, every
    # MLP at 768 and no attention, has 39.8M); the uniform candidates at that size are L20-M1024 and L15-M1536.
    "smollm2-half": ("smollm2-135m-per-layer.yaml", {
        "budget": {"fraction": 0.5, "tolerance": 0.05, "kind": "non_embedding"},
        "axes": {"num_hidden_layers": [30, 20, 15], "num_attention_heads": [9], "intermediate_size": [1536, 1024, 768],
                 "hidden_size": [576]}}),
    # The Gemma demo's budget (60% of 100.3M non-embedding parameters, +-10%). Its one KV head leaves a layer's
    # attention kept or dropped; a layer's MLP keeps the parent's 2048 or 1024.
    "gemma3-demo": ("gemma3-270m-demo.yaml", {
        "per_layer": {"kv_heads": [], "mlp_widths": [1024], "skip_attention": True, "candidates": 2,
                      "min_distance": 4, "uniform": True, "samples": 2},
        "axes": {"num_hidden_layers": [18, 14, 12], "num_attention_heads": [4], "intermediate_size": [1536, 1024],
                 "hidden_size": [640]}}),
}
KD_TOKENS, SEEDS = 16384, (0, 1)  # the "16k or more"
# The ranking (item 4): 1,024 tokens against the search's own short retrain, 4x longer (its trials: 4,096).
SHORT_TOKENS, RANK_TOKENS = 1024, 4096
HELD_LEN, HELD_SEQUENCES = 128, 32  # held-out WikiText-2: 4,096 tokens
RANDOM_CHILDREN, RANDOM_TRAINED = 12, 3  # random per-layer children: KL measured (item 3), short-KD trained (item 5)
RANKED = "smollm2-demo"  # the setting whose children are also ranked short against long and against random ones


def space_file(setting: str) -> Path:
    """The setting's space, written beside its results (the shipped one with the setting's changes)."""
    base, changes = SETTINGS[setting]
    data = yaml.safe_load((ROOT / "search_spaces" / base).read_text())
    data.update(changes)
    data["name"] = f"bench-{setting}"
    data["promote"] = 0
    data["full_retrain"] = {**data["full_retrain"], "tokens": KD_TOKENS}
    path = FOLDER / "spaces" / f"{setting}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def searched(setting: str) -> dict[str, Any]:
    """`nas search` of the setting, once: its wall time, or the one line it refused the space with, kept beside its
    run folder (a finished search, one with that record, is not redone; an interrupted one resumes)."""
    path = space_file(setting)
    record = FOLDER / "runs" / f"bench-{setting}.search.json"
    if not record.exists():
        run = FOLDER / "runs" / f"bench-{setting}"
        for other in sorted((FOLDER / "runs").glob(f"*/{SCORES}")):
            # Another setting's block scores: nas reuses them only where their key (parent weights, calibration
            # sequences, importance settings, variants) is this run's too, else it computes its own.
            if not (run / SCORES).exists() and other.parent != run:
                run.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(other, run / SCORES)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "nas.cli", "search", str(path), "--root", str(FOLDER / "runs")],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True)
        if done.returncode == 2:  # nas's one-line refusal of the space (exit 2): the setting's figure
            write_json(record, {"refused": done.stderr.strip().splitlines()[-1]})
        elif done.returncode:
            raise RuntimeError(f"nas search {path} failed (exit {done.returncode}): {done.stderr[-2000:]}")
        else:
            write_json(record, {"seconds": time.perf_counter() - start})
    return json.loads(record.read_text())


class Steps:
    """Finished steps' figures, a JSON file each: a re-run does only the missing ones, and a second process
    (`helper`) can do some of them meanwhile (a step being computed holds a lock file; the other waits for it)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / (key.replace("/", "__") + ".json")

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        path, lock = self._path(key), self._path(key).with_suffix(".lock")
        while not path.exists():
            try:
                with open(lock, "x") as f:
                    f.write(str(os.getpid()))
            except FileExistsError:  # the other process is computing it, unless it died
                holder = lock.read_text().strip()
                if holder and not Path(f"/proc/{holder}").exists():
                    lock.unlink(missing_ok=True)
                time.sleep(5)
                continue
            try:
                start = time.perf_counter()
                value = compute()
                write_json(path, {"value": value, "seconds": time.perf_counter() - start})
                print(f"[per-layer] {key}: {time.perf_counter() - start:.0f} s", flush=True)
            finally:
                lock.unlink()
        return json.loads(path.read_text())["value"]

    def seconds(self) -> float:
        return sum(json.loads(p.read_text())["seconds"] for p in self.folder.glob("*.json"))


@dataclass
class Setting:
    """A searched setting: its space and run, the parent, its importances, its block scores and held-out data."""

    name: str
    shared: Any
    config: Any
    parent: Any
    model: Any
    tokenizer: Any
    importances: Any
    scores: dict[str, Any]
    calibration: torch.Tensor
    held: torch.Tensor
    trial_loss: dict[str, float]  # each trained candidate's val loss after the search's short retrain

    @classmethod
    def open(cls, name: str) -> Setting:
        import pandas as pd
        from transformers import AutoTokenizer

        from nas.families import Parent
        from nas.importance import Importances
        from nas.parents import load_parent, resolve_parent
        from nas.search import prepare
        from nas.space import load_space
        from nas.tokens import TokenSet

        run = FOLDER / "runs" / f"bench-{name}"
        space = load_space(space_file(name))
        shared = prepare(space, FOLDER / "runs")  # all of it read back from the run folder
        model, _ = load_parent(space.parent, device=torch.device("cpu"))
        tokenizer = AutoTokenizer.from_pretrained(resolve_parent(space.parent))
        scores = json.loads((run / SCORES).read_text())
        # The sequences the block scores read: the first of the calibration sample `prepare` drew.
        tokens = TokenSet(run / "tokens")
        imp = space.importance
        rows = np.sort(shuffled_rows(len(tokens), 0, imp.samples, space.search.seed)) \
            if imp.sampling == "random" else np.arange(imp.samples)
        calibration = TokenSet(run / "tokens", rows)[:][:scores["key"]["samples"]]
        held = load_tokens(str(HELDOUT), tokenizer, HELD_LEN)[:HELD_SEQUENCES]
        frame = pd.read_csv(run / "summary.csv")
        done = frame[frame["state"] == "COMPLETE"]
        return cls(name, shared, model.config, Parent.of(model.config), model, tokenizer,
                   Importances.load(run / "importance.safetensors"), scores["scores"], calibration, held,
                   dict(zip(done["label"], done["val_loss"])))

    def arch(self, label: str):
        from nas.space import architecture_of, kept_layers

        row = self.shared.rows[label]
        method = self.shared.space.importance.layer_method
        return architecture_of(row, self.config, kept_layers(row, self.config, self.importances, method))

    def winners(self) -> dict[str, str]:
        """The search's best per-layer candidate and best uniform one, by their short retrain's val loss."""
        best = sorted(self.trial_loss, key=self.trial_loss.get)
        return {"per_layer": next(k for k in best if self.shared.rows[k][DIGEST]),
                "uniform": next(k for k in best if not self.shared.rows[k][DIGEST])}

    def figures(self, label: str) -> dict[str, Any]:
        row = self.shared.rows[label]
        return {"params": row["params"], "counted": row.get("counted", row["params"]),
                "kind": self.shared.space.budget.kind}

    def summed_score(self, label: str) -> float:
        """The sum of the block scores of the blocks `label` changes (what the program minimises)."""
        full, total = self.parent.architecture.uniform_shape, 0.0
        for layer, shape in zip(self.arch(label).layers, self.arch(label).layer_shapes):
            if shape.num_key_value_heads != full.num_key_value_heads:
                total += self.scores[f"{layer}.attention={shape.num_key_value_heads or 'none'}"]["kl"]
            if shape.intermediate_size != full.intermediate_size:
                total += self.scores[f"{layer}.mlp={shape.intermediate_size or 'none'}"]["kl"]
        return total

    @torch.no_grad()
    def measured_kl(self, label: str) -> float:
        """The child's (pruned, untrained) mean KL to the parent on the sequences the block scores read."""
        from nas.block_scores import _kl_and_loss
        from nas.prune import prune

        child = prune(self.model, self.importances, self.arch(label)).float().eval()
        kl = n = 0.0
        for batch in self.calibration.split(2):
            value, _, count = _kl_and_loss(self.model(batch).logits, child(batch).logits, batch)
            kl, n = kl + value, n + count
        return kl / n

    def random_children(self, count: int, seed: int) -> list[str]:
        """`count` per-layer children drawn uniformly among every choice of the space's variants (one a block,
        the parent's own among them) whose exact counted parameters are within the budget's band, added to
        the candidate rows. Exact: the number of choices reaching each partial sum is counted block by block (the
        blocks' costs add up, docs/per-layer-search.md), then a sum and the choices reaching it are drawn."""
        from nas.architecture import LayerShape
        from nas.search.per_layer import _with, chosen_variants
        from nas.space import _counted, _range, axes_of, memory_bytes

        space, parent = self.shared.space, self.parent
        base = _counted(space, parent, parent.architecture)
        by_block: dict[tuple[int, str], list] = {}
        for v in chosen_variants(space, parent):
            by_block.setdefault((v.layer, v.block), [None]).append(v)
        options = [by_block[k] for k in sorted(by_block)]
        costs = [[0 if v is None else _counted(space, parent, _with(parent, v)) - base for v in opts]
                 for opts in options]
        ways = [{0: 1}]
        for block in costs:
            step: dict[int, int] = {}
            for total, n in ways[-1].items():
                for c in block:
                    step[total + c] = step.get(total + c, 0) + n
            ways.append(step)
        low, high = _range(space, parent)
        ends = {s: n for s, n in ways[-1].items() if low <= base + s <= high}
        rng = random.Random(seed)
        labels = []
        for _ in range(count):
            total = rng.choices(list(ends), weights=list(ends.values()))[0]
            picks = []
            for i in range(len(costs) - 1, -1, -1):
                fits = [j for j, c in enumerate(costs[i]) if total - c in ways[i]]
                j = rng.choices(fits, weights=[ways[i][total - costs[i][k]] for k in fits])[0]
                picks.append(options[i][j])
                total -= costs[i][j]
            shapes = [parent.architecture.uniform_shape] * parent.architecture.num_hidden_layers
            for v in picks:
                if v is not None:
                    kept = shapes[v.layer]
                    shapes[v.layer] = LayerShape(v.width, kept.intermediate_size) if v.block == "attention" else \
                        LayerShape(kept.num_key_value_heads, v.width)
            arch = parent.architecture.replace(per_layer=tuple(shapes))
            counted = _counted(space, parent, arch)
            assert low <= counted <= high, (arch.short(), counted)  # the block costs add up to the exact count
            label = arch.short()
            self.shared.rows[label] = {"label": label, **axes_of(parent, arch), DIGEST: int(label[-6:], 16),
                                       "per_layer_config": arch.per_layer_config(),
                                       "params": parent.num_parameters(arch),
                                       "memory_bytes": memory_bytes(space, parent, arch), "counted": counted}
            labels.append(label)
        return labels

    def kd(self, label: str, tokens: int, seed: int) -> dict[str, Any]:
        """`label` pruned from the parent and KD-trained for `tokens` with KD seed `seed`, as a trial retrains
        (the teacher's cached top-K for the short retrain's tokens, the teacher online for longer ones), then
        scored on held-out WikiText-2 and on the search's validation split; the trained child is kept for the
        engines."""
        import tempfile

        from nas.distill import Distiller
        from nas.importance import lm_loss
        from nas.search import candidate_inputs, retrain_config

        space = self.shared.space
        spec = dataclasses.replace(space.short_retrain, tokens=tokens)
        cfg = dataclasses.replace(retrain_config(spec, space.seq_len, seed, checkpoint_tokens=10 * tokens),
                                  eval_every=0)
        inputs = candidate_inputs(self.shared, label, promoted=tokens > space.short_retrain.tokens,
                                  device=torch.device("cpu"))
        zero_shot = lm_loss(inputs.student, self.held)
        with tempfile.TemporaryDirectory() as out:
            result = Distiller(inputs.student, inputs.teacher, inputs.train, inputs.val[:1], out, cfg,
                               inputs.layer_map, inputs.topk).run(progress=False, save_model=False)
        if tokens == KD_TOKENS and seed == 0:
            folder = FOLDER / "children" / self.name / label
            inputs.student.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
        return {"heldout_loss": lm_loss(inputs.student, self.held), "heldout_zero_shot": zero_shot,
                "val_loss": lm_loss(inputs.student, self.shared.val), "tokens_per_s": result.get("tokens_per_s")}


# Engine timing: one greedy decode of DECODE tokens after a CONTEXT-token prompt, after one warm-up, REPEATS times,
# inside the engine's own process (its start-up is not timed), by `nas.engine_latency`.
CONTEXT, DECODE, REPEATS = 128, 16, 3


def engine_latency(setting: Setting, label: str) -> dict[str, Any]:
    """Decode latency (ms a token, batch 1 after CONTEXT tokens, fp32, this CPU) of the KD-trained child in HF
    generate (`nas.latency`: a static cache), vLLM and llama.cpp (its exports, `nas.engine_latency.exported`); an
    engine that is missing or refuses the child gives its one-line reason instead."""
    import tempfile

    from nas.engine_latency import engine_figures, exported
    from nas.errors import NasError
    from nas.latency import SpeedSettings, measure

    threads = torch.get_num_threads()
    timing = SpeedSettings("cpu", "float32", CONTEXT, 1, decode_tokens=DECODE, warmup=1, repeats=REPEATS,
                           threads=threads)
    config = setting.parent.child_config(setting.arch(label)).to_dict()
    out: dict[str, Any] = {"hf": measure(config, timing)["latency_ms"]}
    prompt = torch.randint(0, setting.config.vocab_size, (CONTEXT,), generator=torch.Generator().manual_seed(0))
    folder = FOLDER / "children" / setting.name / label
    for engine in ("vllm", "llama.cpp"):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                model = exported(engine, folder, Path(tmp) / engine)
                out[engine] = engine_figures(engine, model, [prompt.tolist()], DECODE, warmup=1, repeats=REPEATS,
                                             threads=threads)["latency_ms"]
        except NasError as e:  # not installed, a layout it cannot run, or it failed: the reason is the figure
            out[engine] = str(e).splitlines()[0]
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _versus(a: float, b: float) -> str:
    return f"{a:.4f} vs {b:.4f} ({'lower' if a < b else 'higher'} by {abs(a - b):.4f})"


def compare(s: Setting, steps: Steps, findings: list[str]) -> dict[str, Any]:
    """Item 1 and 2: both winners after KD_TOKENS with each seed, and their decode latency in the three engines."""
    from nas.search.per_layer import strips

    out: dict[str, Any] = {}
    for kind, label in steps.get(f"{s.name}/winners", s.winners).items():
        runs = [steps.get(f"{s.name}/kd{KD_TOKENS}/seed{seed}/{label}",
                          lambda label=label, seed=seed: s.kd(label, KD_TOKENS, seed)) for seed in SEEDS]
        out[kind] = {"label": label, **s.figures(label), **strips(s.arch(label), s.parent.architecture),
                     "heldout_loss": {f"seed {seed}": r["heldout_loss"] for seed, r in zip(SEEDS, runs)},
                     "heldout_loss_mean": _mean([r["heldout_loss"] for r in runs]),
                     "heldout_zero_shot": runs[0]["heldout_zero_shot"],
                     "val_loss_mean": _mean([r["val_loss"] for r in runs])}
    for kind in out:
        out[kind]["decode_ms"] = steps.get(f"{s.name}/latency/{out[kind]['label']}",
                                           lambda label=out[kind]["label"]: engine_latency(s, label))
    p, u = out["per_layer"], out["uniform"]
    size = p["counted"] / u["counted"] - 1
    findings.append(f"{s.name}: per-layer {p['label']} ({p['counted']:,} {p['kind']} parameters, {size:+.1%} against "
                    f"the uniform winner's {u['counted']:,}) against uniform {u['label']}: held-out loss after "
                    f"{KD_TOKENS:,} KD tokens, mean of {len(SEEDS)} seeds, {_versus(p['heldout_loss_mean'], u['heldout_loss_mean'])}"
                    f"; per-layer {'wins' if p['heldout_loss_mean'] < u['heldout_loss_mean'] else 'LOSES'} "
                    f"({sum(a < b for a, b in zip(p['heldout_loss'].values(), u['heldout_loss'].values()))} of "
                    f"{len(SEEDS)} seeds lower)")
    for engine, ms in p["decode_ms"].items():
        theirs = u["decode_ms"][engine]
        if isinstance(ms, float) and isinstance(theirs, float):
            findings.append(f"{s.name}: decode latency in {engine}: per-layer {ms:.2f} ms a token against uniform "
                            f"{theirs:.2f} ms ({ms / theirs - 1:+.0%}; per-layer "
                            f"{'slower' if ms > theirs else 'faster'})")
        else:
            findings.append(f"{s.name}: {engine} gave no timing: {ms if isinstance(ms, str) else theirs}")
    return out


def additivity(s: Setting, steps: Steps, program: list[str], findings: list[str]) -> dict[str, Any]:
    """Item 3: summed block scores against the measured KL of the program's children and random ones."""
    from scipy.stats import kendalltau, spearmanr

    children = program + s.random_children(RANDOM_CHILDREN, seed=1)
    summed = [s.summed_score(label) for label in children]
    measured = [steps.get(f"{s.name}/kl/{label}", lambda label=label: s.measured_kl(label)) for label in children]
    out = {"children": len(children), "program": len(program), "tokens": int(s.calibration.numel()),
           "spearman": float(spearmanr(summed, measured).statistic),
           "kendall": float(kendalltau(summed, measured).statistic),
           "rows": {label: {"summed_block_kl": a, "measured_kl": b} for label, a, b in zip(children, summed, measured)}}
    ratio = _mean([b / a for a, b in zip(summed, measured)])
    findings.append(f"{s.name}: additivity over {len(children)} children ({len(program)} of the program's, the rest "
                    f"random in the budget): Spearman {out['spearman']:.2f}, Kendall {out['kendall']:.2f} between "
                    f"summed block KL and measured KL; measured/summed {ratio:.2f} on average")
    return out


def ranking(s: Setting, steps: Steps, winners: dict[str, str], findings: list[str]) -> dict[str, Any]:
    """Items 4 and 5: the search's candidates and random per-layer children of its budget after SHORT_TOKENS of KD
    against the search's own short retrain (RANK_TOKENS, 4x: the search's trials, and the same retrain run here
    for the random children and the winner, whose run checks that it gives the trial's loss); then the winner
    against the random children after that retrain, on held-out data."""
    from scipy.stats import kendalltau

    def run(label: str, tokens: int) -> dict[str, Any]:
        return steps.get(f"{s.name}/kd{tokens}/seed0/{label}", lambda: s.kd(label, tokens, 0))

    randoms = s.random_children(RANDOM_TRAINED, seed=2)
    searched = list(s.trial_loss)
    best = winners["per_layer"]
    long = {label: run(label, RANK_TOKENS) for label in [best, *randoms]}
    short = {label: run(label, SHORT_TOKENS) for label in searched + randoms}
    val_long = {**s.trial_loss, **{k: long[k]["val_loss"] for k in randoms}}
    labels = searched + randoms
    tau = float(kendalltau([short[k]["val_loss"] for k in labels], [val_long[k] for k in labels]).statistic)
    tau_searched = float(kendalltau([short[k]["val_loss"] for k in searched], [val_long[k] for k in searched])
                         .statistic)
    findings.append(f"{s.name}: {SHORT_TOKENS:,}-token KD against the search's {RANK_TOKENS:,}-token retrain, "
                    f"validation loss: Kendall tau {tau:.2f} over {len(labels)} children (the search's "
                    f"{len(searched)} and {len(randoms)} random ones), {tau_searched:.2f} over the search's alone")
    mine = long[best]["heldout_loss"]
    rand = {k: long[k]["heldout_loss"] for k in randoms}
    findings.append(f"{s.name}: the search's per-layer winner after {RANK_TOKENS:,} KD tokens, held-out "
                    f"{_versus(mine, _mean(list(rand.values())))} against the mean of {len(rand)} random per-layer "
                    f"children of the budget (best random {min(rand.values()):.4f}); it beats "
                    f"{sum(mine < v for v in rand.values())} of {len(rand)}")
    return {"short_tokens": SHORT_TOKENS, "long_tokens": RANK_TOKENS, "kendall_tau_val": tau,
            "kendall_tau_val_searched_only": tau_searched,
            "winner_rerun_val_loss": {"here": long[best]["val_loss"], "search_trial": s.trial_loss[best]},
            "val_loss": {k: {"short": short[k]["val_loss"], "long": val_long[k]} for k in labels},
            "random_children": {k: {**s.figures(k), "heldout_loss": v} for k, v in rand.items()},
            "winner": {"label": best, "heldout_loss": mine}}


def run() -> dict[str, Any]:
    """Every setting's search, then its figures; each finished step is kept in results/per-layer/steps/."""
    steps = Steps(FOLDER / "steps")
    findings: list[str] = []
    out: dict[str, Any] = {"kd_tokens": KD_TOKENS, "seeds": list(SEEDS), "short_tokens": SHORT_TOKENS,
                           "heldout": f"{HELD_SEQUENCES} x {HELD_LEN} tokens of {HELDOUT.relative_to(ROOT)}",
                           "settings": {}}
    opened: dict[str, Setting] = {}
    for name in SETTINGS:
        search = searched(name)
        if "refused" in search:
            out["settings"][name] = {"space": str(space_file(name).relative_to(ROOT)), **search}
            findings.append(f"{name}: not measured: `nas search` refuses its space: {search['refused']}")
            continue
        s = Setting.open(name)
        program = [label for label, row in s.shared.rows.items() if row[DIGEST]]  # the program's solutions
        figures = {"space": str(space_file(name).relative_to(ROOT)), "search_s": search["seconds"],
                   "winners": compare(s, steps, findings), "additivity": additivity(s, steps, program, findings)}
        out["settings"][name] = figures
        opened[name] = s
    if RANKED in opened:  # last: its longer retrains are the costliest steps
        s = opened[RANKED]
        winners = {kind: w["label"] for kind, w in out["settings"][RANKED]["winners"].items()}
        out["settings"][RANKED]["ranking"] = ranking(s, steps, winners, findings)
    out["steps_s"] = steps.seconds()
    out["wall_s"] = out["steps_s"] + sum(f.get("search_s", 0) for f in out["settings"].values())
    out["findings"] = findings
    print(summary_table(out))
    return out


def summary_table(out: dict[str, Any]) -> str:
    """The per-layer against uniform table, both seeds, as the README shows it."""
    engines = ("hf", "vllm", "llama.cpp")
    lines = ["| setting | winner | label | params (counted) | " + " | ".join(f"held-out, seed {s}" for s in SEEDS)
             + " | mean | decode ms: " + " / ".join(engines) + " |", "|" + " --- |" * (6 + len(SEEDS))]
    for name, figures in out["settings"].items():
        for kind, w in figures.get("winners", {}).items():
            ms = " / ".join(f"{w['decode_ms'][e]:.2f}" if isinstance(w["decode_ms"][e], float) else "refused"
                            for e in engines)
            lines.append(f"| {name} | {kind} | {w['label']} | {w['params']:,} ({w['counted']:,}) | "
                         + " | ".join(f"{v:.4f}" for v in w["heldout_loss"].values())
                         + f" | {w['heldout_loss_mean']:.4f} | {ms} |")
    return "\n".join(lines)


def helper(name: str = RANKED) -> None:
    """A second process for some of `run`'s steps (the retrains, the uniform winner's timing), taken in another
    order while `run` works: `python -c "from benchmarks.per_layer import helper; helper()"` beside it."""
    s = Setting.open(name)
    steps = Steps(FOLDER / "steps")
    winners = steps.get(f"{name}/winners", s.winners)
    steps.get(f"{name}/kd{KD_TOKENS}/seed1/{winners['uniform']}", lambda: s.kd(winners["uniform"], KD_TOKENS, 1))
    s.random_children(RANDOM_CHILDREN, seed=1)  # (run draws these first: the same draws follow)
    randoms = s.random_children(RANDOM_TRAINED, seed=2)
    todo = [(k, RANK_TOKENS) for k in [winners["per_layer"], *randoms]] + \
        [(k, SHORT_TOKENS) for k in [*s.trial_loss, *randoms]]
    for label, tokens in reversed(todo):
        steps.get(f"{name}/kd{tokens}/seed0/{label}", lambda: s.kd(label, tokens, 0))
