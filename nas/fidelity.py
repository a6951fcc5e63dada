"""`nas-bench fidelity`: does a short KD retrain rank candidates the way a longer one would?

Arms, all on the same training tokens in the same order per seed, scored on held-out text never used for
calibration or training:
  ranking      every candidate zero-shot and after each KD budget, per seed; Kendall tau and top-1/top-3
               agreement of each budget's ranking with the longest budget's;
  depth        the depth-only size pruned by loss-when-dropped and by contiguous block (BI is in ranking),
               against the best width-only candidate, at the longest budget;
  init         the best width-only candidate pruned + CE, and randomly initialised + KD (pruned + KD is in
               ranking), at the longest budget;
  departures   our departures from the paper on the best candidate they change, at the middle budget;
  asha         Ray's ASHA stopping rule replayed on the recorded validation curves at the chosen budget.

Every finished run is saved at once (`results[key]`), so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from scipy.stats import kendalltau

from nas.architecture import Architecture
from nas.data import load_tokens
from nas.distill import DistillConfig, Distiller
from nas.families import Parent
from nas.files import write_json
from nas.importance import ImportanceSettings, cached_importance, lm_loss, select_layers
from nas.parents import load_parent
from nas.prune import PruneOptions, prune
from nas.teacher_cache import cached_topk

_LABEL = re.compile(r"L(\d+)-H(\d+)-KV(\d+)-M(\d+)-E(\d+)$")


@dataclass(frozen=True)
class FidelityPlan:
    """What the benchmark runs. `candidates` are labels at about one parameter budget."""

    parent: str
    train_data: str
    heldout_data: str
    candidates: tuple[str, ...]
    budgets: tuple[int, ...]
    seeds: tuple[int, ...] = (0, 1)
    seq_len: int = 128
    batch_size: int = 4
    lr: float = 1e-4
    warmup_steps: int = 2
    calibration: int = 32
    heldout: int = 16
    curve_sequences: int = 4
    reports: int = 4
    topk: int = 64
    drop_samples: int = 4
    departure_aggregations: tuple[tuple[str, str], ...] = (("mean", "mean"), ("l2", "l2"))

    @property
    def longest(self) -> int:
        return max(self.budgets)

    @property
    def middle(self) -> int:
        return sorted(self.budgets)[len(self.budgets) // 2]


def smollm2_plan(root: Path) -> FidelityPlan:
    """SmolLM2-135M at about 2/3 of its parameters (86.7M-90.9M of 134.5M): 3 width-only, 1 depth-only, 4 mixed."""
    return FidelityPlan(
        parent="smollm2-135m", train_data="shakespeare", heldout_data=str(root / "data" / "wikitext-2" / "test.txt"),
        candidates=("L30-H6-KV3-M768-E576", "L30-H9-KV3-M1280-E432", "L30-H3-KV3-M1536-E432",  # width only
                    "L17-H9-KV3-M1536-E576",                                                   # depth only
                    "L26-H9-KV3-M1536-E432", "L22-H9-KV3-M1024-E576", "L20-H9-KV3-M1280-E576",
                    "L18-H6-KV3-M1536-E576"),                                                  # mixed
        budgets=(1024, 4096, 16384),
    )


def parse_label(label: str, parent: Architecture) -> Architecture:
    m = _LABEL.match(label)
    if not m:
        raise ValueError(f"candidate {label!r}: expected a label like L30-H6-KV3-M768-E576")
    layers, heads, kv, mlp, hidden = map(int, m.groups())
    return parent.replace(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                          intermediate_size=mlp, hidden_size=hidden, layers=tuple(range(layers)))


def asha_replay(curves: dict[str, list[float]], reduction: int = 2, grace: int = 1) -> dict[str, int]:
    """Reports each trial gets under Ray's asynchronous ASHA when trials run one after another in the given
    order: at a rung (grace * reduction^k reports) a trial stops if its loss is worse than the
    (1 - 1/reduction) quantile of the losses recorded at that rung so far, its own included."""
    rungs: dict[int, list[float]] = {}
    used = {}
    for label, curve in curves.items():
        used[label] = len(curve)
        for r, value in enumerate(curve[:-1], start=1):
            if not _is_rung(r, grace, reduction):
                continue
            seen = rungs.setdefault(r, [])
            seen.append(value)
            if value > float(torch.tensor(seen).quantile(1 / reduction)):
                used[label] = r
                break
    return used


def _is_rung(r: int, grace: int, reduction: int) -> bool:
    while r > grace and r % reduction == 0:
        r //= reduction
    return r == grace


class Fidelity:
    """Holds the parent, scores, data and the results file; each method runs one arm."""

    def __init__(self, plan: FidelityPlan, results_path: Path, log=print):
        self.plan, self.path, self.log = plan, Path(results_path), log
        self.results: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.cache = self.path.parent / "fidelity-cache"
        self.parent, tokenizer = load_parent(plan.parent, torch.device("cpu"), torch.float32)
        tokens = load_tokens(plan.train_data, tokenizer, plan.seq_len,
                             min_sequences=plan.calibration + plan.longest // plan.seq_len)
        self.calibration = tokens[: plan.calibration]
        self.train = tokens[plan.calibration: plan.calibration + plan.longest // plan.seq_len]
        self.heldout = load_tokens(plan.heldout_data, tokenizer, plan.seq_len, min_sequences=plan.heldout)[: plan.heldout]
        self.full = Parent.of(self.parent.config).architecture
        self.importances = self.scores(ImportanceSettings(drop_samples=plan.drop_samples,
                                                          block_sizes=self._depth_cuts()), "default")
        self.topk = cached_topk(self.parent, self.train, plan.topk, self.cache, "teacher_topk")

    def _depth_cuts(self) -> tuple[int, ...]:
        """Layers dropped by the depth-only candidates: the block sizes whose losses the depth arm needs."""
        full = self.parent.config.num_hidden_layers
        return tuple(sorted({full - parse_label(c, self.full).num_hidden_layers for c in self.depth_only()}))

    def depth_only(self) -> list[str]:
        return [c for c in self.plan.candidates if parse_label(c, self.full).replace(
            num_hidden_layers=self.full.num_hidden_layers, layers=self.full.layers) == self.full]

    def scores(self, settings: ImportanceSettings, name: str):
        return cached_importance(self.parent, self.calibration, self.cache / f"importance-{name}.safetensors", settings)

    def arch(self, label: str, layer_method: str = "bi", importances=None) -> Architecture:
        arch = parse_label(label, self.full)
        return arch.replace(layers=select_layers(importances or self.importances, arch.num_hidden_layers, layer_method))

    # -- one run -----------------------------------------------------------------------------------
    def run(self, key: str, label: str, tokens: int, seed: int, *, layer_method: str = "bi", importances=None,
            options: PruneOptions = PruneOptions(), mode: str = "kd") -> dict[str, Any]:
        """Prune (or randomly initialise), retrain for `tokens`, score on the held-out text; saved under `key`."""
        if key in self.results:
            return self.results[key]
        arch = self.arch(label, layer_method, importances)
        if mode == "random":
            from nas.loader import build

            torch.manual_seed(seed)
            config = Parent.of(self.parent.config).child_config(arch)
            student = build(config, dtype=torch.float32)
        else:
            student = prune(self.parent, importances or self.importances, arch, options).float()
        params = sum(p.numel() for p in student.parameters())
        start = time.perf_counter()
        curve: list[float] = []
        if tokens:
            cfg = DistillConfig(tokens=tokens, batch_size=self.plan.batch_size, lr=self.plan.lr, seed=seed,
                                warmup_steps=self.plan.warmup_steps, checkpoint_every=0,
                                **({"kd": "none", "ce_weight": 1.0} if mode == "ce" else {}))
            cfg = replace(cfg, eval_every=max(1, cfg.steps(self.plan.seq_len) // self.plan.reports))
            with tempfile.TemporaryDirectory() as tmp:
                teacher = None if mode == "ce" else self.parent
                d = Distiller(student, teacher, self.train, self.heldout[: self.plan.curve_sequences], tmp, cfg,
                              list(arch.layers), self.topk if teacher is not None else None)
                d.on_eval = lambda m: curve.append(m["val_loss"])
                d.run(progress=False, save_model=False)
        record = {"label": label, "tokens": tokens, "seed": seed, "params": params, "mode": mode,
                  "layer_method": layer_method, "heldout_loss": lm_loss(student.eval(), self.heldout),
                  "curve": curve, "wall_s": time.perf_counter() - start}
        self.results[key] = record
        write_json(self.path, self.results)
        self.log(f"{key}: held-out {record['heldout_loss']:.4f} ({record['wall_s']:.0f} s)")
        return record

    # -- arms --------------------------------------------------------------------------------------
    def ranking(self) -> None:
        for label in self.plan.candidates:
            self.run(f"zero-shot|{label}", label, 0, 0)
        for seed, tokens, label in itertools.product(self.plan.seeds, sorted(self.plan.budgets), self.plan.candidates):
            self.run(f"kd|{label}|{tokens}|{seed}", label, tokens, seed)

    def losses(self, tokens: int, seed: int | None) -> dict[str, float]:
        """Held-out loss per candidate at a budget, for one seed or (None) the mean over seeds."""
        seeds = self.plan.seeds if seed is None else (seed,)
        if tokens == 0:
            return {c: self.results[f"zero-shot|{c}"]["heldout_loss"] for c in self.plan.candidates}
        return {c: sum(self.results[f"kd|{c}|{tokens}|{s}"]["heldout_loss"] for s in seeds) / len(seeds)
                for c in self.plan.candidates}

    def best(self, keep=lambda arch: True) -> str:
        losses = self.losses(self.plan.longest, None)
        return min((c for c in self.plan.candidates if keep(parse_label(c, self.full))), key=losses.get)

    def width_only(self, arch: Architecture) -> bool:
        return arch.num_hidden_layers == self.full.num_hidden_layers

    def depth(self) -> None:
        for label, method, seed in itertools.product(self.depth_only(), ("drop", "block"), self.plan.seeds):
            self.run(f"depth|{label}|{method}|{seed}", label, self.plan.longest, seed, layer_method=method)

    def init(self) -> None:
        label = self.best(self.width_only)
        for mode, seed in itertools.product(("ce", "random"), self.plan.seeds):
            self.run(f"init|{label}|{mode}|{seed}", label, self.plan.longest, seed, mode=mode)

    def departures(self) -> None:
        for name, (label, kwargs) in self.departure_runs().items():
            for seed in self.plan.seeds:
                self.run(f"departure|{name}|{label}|{seed}", label, self.plan.middle, seed, **kwargs)

    def departure_runs(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Each departure on the best candidate (longest budget) whose child it changes."""
        full = self.full
        prunes_heads = self.best(lambda a: a.num_attention_heads < full.num_attention_heads)
        prunes_hidden = self.best(lambda a: a.hidden_size < full.hidden_size)
        any_width = self.best(lambda a: a.replace(num_hidden_layers=full.num_hidden_layers, layers=full.layers) != full)
        runs = {
            "head metric: attention-output norm (paper)": (prunes_heads, {"importances": self.scores(
                ImportanceSettings(drop_samples=0, head_source="attn"), "head-attn")}),
            "residual heads off": (prunes_heads, {"options": PruneOptions(residual_heads=False)}),
            "RMSNorm rescale off": (prunes_hidden, {"options": PruneOptions(rescale_norms=False)}),
        }
        for seq, batch in self.plan.departure_aggregations:
            runs[f"aggregation seq={seq}, batch={batch}"] = (any_width, {"importances": self.scores(
                ImportanceSettings(drop_samples=0, seq_agg=seq, batch_agg=batch), f"agg-{seq}-{batch}")})
        return runs

    def run_all(self) -> dict[str, Any]:
        for arm in (self.ranking, self.depth, self.init, self.departures):
            arm()
        return self.summary()

    # -- figures -----------------------------------------------------------------------------------
    def agreement(self, tokens: int, seed: int | None) -> dict[str, Any]:
        ref, got = self.losses(self.plan.longest, seed), self.losses(tokens, seed)
        order_ref, order_got = sorted(ref, key=ref.get), sorted(got, key=got.get)
        return {"tau": float(kendalltau([got[c] for c in ref], [ref[c] for c in ref]).statistic),
                "top1": order_got[0] == order_ref[0], "top3": len(set(order_got[:3]) & set(order_ref[:3])) / 3}

    def chosen_budget(self) -> int | None:
        """The smallest shorter budget whose ranking agrees with the longest one's for every seed."""
        for tokens in sorted(b for b in self.plan.budgets if b != self.plan.longest):
            per_seed = [self.agreement(tokens, s) for s in self.plan.seeds]
            # (a tolerance: scipy's tau of 8 concordant pairs in 10, 0.8, comes out as 0.7999999999999999)
            if all(a["tau"] >= 0.8 - 1e-9 and a["top1"] for a in per_seed):
                return tokens
        return None

    def summary(self) -> dict[str, Any]:
        plan = self.plan
        budgets = [0, *sorted(plan.budgets)]
        agreement = {t: {"per_seed": {s: self.agreement(t, s) for s in plan.seeds}, "mean_loss": self.agreement(t, None)}
                     for t in budgets}
        chosen = self.chosen_budget()
        asha_budget = chosen or plan.longest
        asha = {}
        for seed in plan.seeds:
            curves = {c: self.results[f"kd|{c}|{asha_budget}|{seed}"]["curve"] for c in plan.candidates}
            used = asha_replay(curves)
            final = {c: curves[c][-1] for c in plan.candidates}
            survivors = [c for c in plan.candidates if used[c] == len(curves[c])]
            asha[seed] = {"winner": min(survivors, key=final.get), "exhaustive_winner": min(final, key=final.get),
                          "reports_used": sum(used.values()), "reports_exhaustive": sum(map(len, curves.values()))}
        return {"budgets": budgets, "agreement": agreement, "chosen_budget": chosen, "asha_budget": asha_budget,
                "asha": asha, "best_width_only": self.best(self.width_only), "best": self.best()}


# -- the report --------------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[Any]]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def _spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def write_report(fid: Fidelity, summary: dict[str, Any], folder: Path, command: str, machine: str) -> Path:
    """FIDELITY.md and its plots in `folder`, from the saved runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, r = fid.plan, fid.results
    budgets = summary["budgets"]
    name = lambda t: "zero-shot" if t == 0 else f"{t:,} tokens"  # noqa: E731
    per_seed = lambda c, t: ([r[f"zero-shot|{c}"]["heldout_loss"]] if t == 0 else  # noqa: E731
                             [r[f"kd|{c}|{t}|{s}"]["heldout_loss"] for s in plan.seeds])
    out = ["# Fidelity of the search's ranking (SmolLM2-135M)\n",
           f"Command: `{command}` · date {time.strftime('%Y-%m-%d')} · machine: {machine}.",
           f"Held-out: {plan.heldout}x{plan.seq_len} tokens of WikiText-2 test (`{Path(plan.heldout_data).name}`); "
           f"training: `{plan.train_data}`, {plan.longest // plan.seq_len} sequences after {plan.calibration} "
           f"calibration ones; KD = forward KL on the teacher's cached top-{plan.topk} (intermediate-state loss "
           f"where more than 25% of layers are dropped, as in the search); batch {plan.batch_size}, LR {plan.lr}, "
           f"cosine; seeds {list(plan.seeds)} change the data order (same order for every arm). "
           f"Losses are `mean ± half the seed range`.\n",
           "## 1. Ranking stability\n",
           _table(["candidate", "params", *[name(t) for t in budgets]],
                  [[c, f"{r[f'zero-shot|{c}']['params'] / 1e6:.1f}M", *[_spread(per_seed(c, t)) for t in budgets]]
                   for c in plan.candidates]), "",
           "Agreement with the longest budget's ranking (per seed, then of the seed-mean losses):\n",
           _table(["budget", *[f"tau seed {s}" for s in plan.seeds], "tau mean", "top-1 same", "top-3 overlap"],
                  [[name(t), *[summary["agreement"][t]["per_seed"][s]["tau"] for s in plan.seeds],
                    summary["agreement"][t]["mean_loss"]["tau"],
                    "/".join("yes" if summary["agreement"][t]["per_seed"][s]["top1"] else "no" for s in plan.seeds),
                    summary["agreement"][t]["mean_loss"]["top3"]] for t in budgets]), "",
           f"Smallest shorter budget with tau >= 0.8 and the same top-1 for every seed: "
           f"**{summary['chosen_budget'] or 'none'}**.\n", "![ranking](fidelity_ranking.png)\n"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in plan.candidates:
        ax.plot(range(len(budgets)), [sum(per_seed(c, t)) / len(per_seed(c, t)) for t in budgets], marker="o", label=c)
    ax.set_xticks(range(len(budgets)), [name(t) for t in budgets])
    ax.set_ylabel("held-out loss (WikiText-2 test)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "fidelity_ranking.png", dpi=100)
    plt.close(fig)

    width = summary["best_width_only"]
    seeds = lambda prefix: [r[f"{prefix}|{s}"]["heldout_loss"] for s in plan.seeds]  # noqa: E731
    rows = [[f"width only, best: {width}", "-", _spread(per_seed(width, plan.longest))]]
    for key in sorted({k.rsplit("|", 1)[0] for k in r if k.startswith("depth|")}):
        _, label, method = key.split("|")
        rows.append([f"depth only: {label}", method, _spread(seeds(key))])
    rows += [[f"depth only: {c}", "bi", _spread(per_seed(c, plan.longest))] for c in fid.depth_only()]
    out += [f"## 2. Width vs depth after {plan.longest:,} KD tokens\n", _table(["child", "layers by", "held-out loss"], rows), ""]

    init = [["pruned + KD", _spread(per_seed(width, plan.longest))]]
    init += [[f"{'pruned + CE' if m == 'ce' else 'random init + KD'}", _spread(seeds(f"init|{width}|{m}"))]
             for m in ("ce", "random")]
    out += [f"## 3. KD vs CE vs random initialisation ({width}, {plan.longest:,} tokens)\n",
            _table(["student", "held-out loss"], init), ""]

    rows = []
    for dep, (label, _) in fid.departure_runs().items():
        rows.append([dep, label, _spread(per_seed(label, plan.middle)), _spread(seeds(f"departure|{dep}|{label}"))])
    out += [f"## 4. Our departures from the paper, after {plan.middle:,} KD tokens\n",
            _table(["changed to", "on", "ours (default)", "changed"], rows), ""]

    rows = [[s, a["exhaustive_winner"], a["winner"], f"{a['reports_used']}/{a['reports_exhaustive']}"]
            for s, a in summary["asha"].items()]
    out += [f"## 5. ASHA vs exhaustive at {summary['asha_budget']:,} tokens\n",
            "Ray's ASHA rule (reduction 2, grace 1 report) replayed on the recorded validation curves "
            f"({plan.curve_sequences}x{plan.seq_len} held-out tokens, {plan.reports} reports), trials in the listed order.\n",
            _table(["seed", "exhaustive winner", "ASHA winner", "reports used"], rows), ""]
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in plan.candidates:
        curve = r[f"kd|{c}|{summary['asha_budget']}|{plan.seeds[0]}"]["curve"]
        ax.plot([summary["asha_budget"] * (i + 1) / len(curve) for i in range(len(curve))], curve, marker=".", label=c)
    ax.set_xlabel("KD tokens")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "fidelity_curves.png", dpi=100)
    plt.close(fig)
    out.append("![curves](fidelity_curves.png)\n")
    path = folder / "FIDELITY.md"
    path.write_text("\n".join(out) + "\n")
    return path
