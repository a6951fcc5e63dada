"""The `nas` command line. Each subcommand parses flags and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from nas.errors import NasError

log = logging.getLogger("nas")

DEMO_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "smollm2-135m-demo.yaml"


def _add_parent_data(p: argparse.ArgumentParser, data_default: str | None = "shakespeare") -> None:
    p.add_argument("--parent", default="smollm2-135m", help="HF directory, hub id, or 'smollm2-135m' (default)")
    p.add_argument("--data", default=data_default, help="text/JSONL/parquet file or directory, a token-shard folder "
                                                        "(`nas tokenize`), 'shakespeare', or a datasets name")
    p.add_argument("--text-field", default="text", help="JSONL/parquet field holding the text")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def _device(args):
    import torch

    return torch.device(args.device) if args.device else None


def cmd_tokenize(args) -> None:
    from transformers import AutoTokenizer

    from nas.data import tokenize
    from nas.parents import resolve_parent

    tokens = tokenize(args.data, AutoTokenizer.from_pretrained(resolve_parent(args.parent)), args.seq_len, args.out,
                      args.text_field)
    index = tokens.index
    print(f"tokenized {args.data} -> {args.out}: {index['rows']:,} sequences of {index['seq_len']} "
          f"({index['tokens']:,} tokens, {tokens.dtype.name}) in {len(index['shard_rows'])} shards")


def cmd_importance(args) -> None:
    from nas.data import load_tokens
    from nas.importance import ImportanceSettings, cached_importance
    from nas.parents import load_parent

    settings = ImportanceSettings(seq_agg=args.seq_agg, batch_agg=args.batch_agg, neuron_source=args.neuron_source,
                                  head_source=args.head_source,
                                  drop_samples=args.drop_samples, block_sizes=tuple(args.block_sizes),
                                  batch_size=args.batch_size)
    model, tokenizer = load_parent(args.parent, _device(args))
    tokens = load_tokens(args.data, tokenizer, args.seq_len, args.text_field, min_sequences=args.samples)
    imp = cached_importance(model, tokens[: args.samples], args.out, settings)
    print(f"importance of {args.parent} on {args.samples}x{args.seq_len} tokens -> {args.out} "
          f"(base loss {imp.base_loss:.4f})")


def cmd_arch(args) -> None:
    from nas.architecture import LAYER_KEYS, PER_LAYER
    from nas.errors import ArchitectureError
    from nas.families import Parent
    from nas.parents import parent_config

    parent = Parent.of(parent_config(args.parent))
    # A parent whose layers differ in size by kind (a hybrid) also lists how many of each kind it has: a child's
    # JSON may give those counts instead of `layers`, and `nas prune` keeps each kind's best layers.
    arch = parent.architecture
    data = {**arch.to_dict(), **parent.kind_counts(arch.layers)}
    if args.per_layer:  # every layer listed with its widths, to edit into a per-layer child
        if problem := parent.family.per_layer_refusal():
            raise ArchitectureError(f"--per-layer: {parent.family.model_type} takes no per-layer architecture: {problem}")
        data[PER_LAYER] = {str(j): {k: getattr(shape, k) for k in LAYER_KEYS} for j, shape in enumerate(arch.layer_shapes)}
    text = json.dumps(data, indent=2) + "\n"
    if args.out:
        from nas.files import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(text)
    print(text, end="")


def cmd_prune(args) -> None:
    import math

    from transformers import AutoTokenizer

    from nas.architecture import KIND_AXIS, Architecture
    from nas.exports import check as check_export, written
    from nas.families import Parent
    from nas.files import atomic_dir
    from nas.importance import Importances
    from nas.parents import load_parent, parent_config, resolve_parent
    from nas.prune import PruneOptions, SafetensorsReader, prune, prune_checkpoint
    from nas.space import kept_layers

    importances = _load_importances(args.importance, Importances)
    try:
        data = json.loads(Path(args.arch).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NasError(f"--arch {args.arch}: cannot read architecture JSON ({e})") from None
    counts = {k: v for k, v in data.items() if k.startswith(KIND_AXIS)}
    if "layers" in data and counts and isinstance(data["layers"], list):
        # Counts beside the layers (as `nas arch` writes both) must describe them: which to follow is the user's call.
        held = Parent.of(parent_config(args.parent)).kind_counts(tuple(data["layers"]))
        if wrong := {k: v for k, v in counts.items() if held.get(k) != v}:
            raise NasError(f"--arch {args.arch}: {', '.join(f'{k}={v}' for k, v in wrong.items())} but its 'layers' "
                           f"holds {', '.join(f'{held.get(k, 0)}' for k in wrong)}: drop 'layers' and "
                           f"'num_hidden_layers' to keep each kind's best layers by importance, or make them agree")
    if "layers" not in data and ("num_hidden_layers" in data or any(k.startswith(KIND_AXIS) for k in data)):
        # Chosen by importance: overall, or each kind's own best (`layers.<kind>`: counts of a hybrid's kinds).
        data["layers"] = kept_layers(data, parent_config(args.parent), importances, args.layer_method)
        data["num_hidden_layers"] = len(data["layers"])
    arch = Architecture.from_dict({k: v for k, v in data.items() if not k.startswith(KIND_AXIS)})
    options = PruneOptions(rescale_norms=not args.no_rescale_norms, residual_heads=not args.no_residual_heads)
    location = resolve_parent(args.parent)
    if args.format != "hf":  # an export the engines cannot run is refused before the parent is read
        check_export(parent_config(args.parent).to_dict(), arch, args.format,
                     location if Path(location).is_dir() else None)
    with written(args.out, args.format, args.dtype) as target, atomic_dir(target) as tmp:
        if Path(location).is_dir() and args.device is None:
            # A checkpoint on disk is pruned file to file: the parent is never loaded whole.
            prune_checkpoint(location, importances, arch, tmp, options)
            AutoTokenizer.from_pretrained(location).save_pretrained(tmp)
            n = sum(math.prod(e["shape"]) for _, _, e in SafetensorsReader(tmp).entries.values())
        else:
            model, tokenizer = load_parent(args.parent, _device(args))
            child = prune(model, importances, arch, options)
            child.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            n = sum(p.numel() for p in child.parameters())
        (tmp / "architecture.json").write_text(json.dumps(arch.to_dict(), indent=2) + "\n")
    print(f"pruned {args.parent} -> {arch.short()} ({n:,} parameters) -> {args.out}"
          + (f" ({args.format})" if args.format != "hf" else ""))


def _train_val(args, tokenizer):
    from nas.data import load_tokens, split

    tokens = load_tokens(args.data, tokenizer, args.seq_len, args.text_field, min_sequences=2)
    return split(tokens, args.val_fraction, args.seed)


def _distill_config(args, **overrides):
    from nas.distill import DistillConfig

    fields = dict(tokens=args.tokens, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                  warmup_steps=args.warmup_steps, temperature=args.temperature, kd=args.kd, ce_weight=args.ce_weight,
                  intermediate=args.intermediate, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                  seed=args.seed, grad_checkpointing=args.grad_checkpointing)
    return DistillConfig(**{**fields, **overrides})


def _check_student(path: str, flag: str = "--student") -> None:
    if not (Path(path) / "config.json").exists():
        raise NasError(f"{flag} {path}: not an HF checkpoint directory (make one with `nas prune`)")


def _load_student(path: str, device, flag: str = "--student"):
    import torch

    from nas.loader import load
    from nas.parents import default_device

    _check_student(path, flag)
    # fp32 master weights; bf16 autocast on CUDA does the fast part. A per-layer child needs nas's loader.
    return load(path, dtype=torch.float32, device=device or default_device())


def _check_resume(args) -> None:
    out = Path(args.out)
    if not args.resume and ((out / "checkpoint").exists() or (out / "result.json").exists()):
        raise NasError(f"--out {out} already holds a run; pass --resume to continue it, or choose another --out")


def _distill_inputs(args, device):
    """The `nas distill` inputs, built where they are used (this process, or each Ray Train worker)."""
    from nas.parents import load_parent
    from nas.teacher_cache import TopKShards
    from nas.workers import DistillInputs

    teacher, tokenizer = load_parent(args.teacher, device)
    train, val = _train_val(args, tokenizer)
    arch_file = Path(args.student) / "architecture.json"
    layer_map = json.loads(arch_file.read_text())["layers"] if arch_file.exists() else None
    topk = TopKShards(Path(args.out) / "teacher_topk") if args.teacher_topk else None
    return DistillInputs(_load_student(args.student, device), teacher, train, val, layer_map, topk)


def cmd_distill(args) -> None:
    import functools

    from transformers import AutoTokenizer

    from nas.parents import default_device, load_parent, resolve_parent
    from nas.teacher_cache import cached_topk
    from nas.workers import DistillJob, run_here, run_on_workers

    if args.teacher_topk and args.kd != "forward":
        raise NasError(f"--teacher-topk {args.teacher_topk}: the cache holds the teacher's top-K for forward KL; "
                       f"--kd {args.kd} needs the whole teacher distribution: drop --teacher-topk or use --kd forward")
    _check_resume(args)
    if args.workers < 1:
        raise NasError(f"--workers {args.workers}: must be at least 1")
    _check_student(args.student)
    cfg = _distill_config(args)
    if cfg.batch_size % args.workers:
        raise NasError(f"--batch-size {cfg.batch_size}: must be a multiple of --workers {args.workers} (each worker "
                       f"takes an equal share of every micro-batch)")
    device = _device(args) or default_device()
    tokenizer = AutoTokenizer.from_pretrained(resolve_parent(args.teacher))
    if args.teacher_topk:  # computed once, here; every worker reads the file
        teacher, _ = load_parent(args.teacher, device)
        cached_topk(teacher, _train_val(args, tokenizer)[0], args.teacher_topk, args.out, "teacher_topk",
                    cfg.temperature, cfg.batch_size)
        del teacher
    job = DistillJob(functools.partial(_distill_inputs, args), cfg, args.out, threads=torch_threads(args.workers))
    if args.workers == 1:
        result = run_here(job, device, progress=not args.quiet)
    else:
        from nas.search import init_ray

        init_ray(args.address, Path(args.out).resolve(), num_cpus=args.workers if device.type == "cpu" else None)
        result = run_on_workers(job, args.workers, gpus_per_worker=1 if device.type == "cuda" else 0,
                                max_failures=args.max_failures)
    tokenizer.save_pretrained(Path(args.out) / "model")
    print(f"distilled -> {args.out}/model: val loss {result['val_loss']:.4f}, val KD {result.get('val_kd', 0):.4f}"
          f" ({args.workers} worker{'s' if args.workers > 1 else ''})")


def torch_threads(workers: int) -> int:
    """CPU threads per worker: this machine's cores shared among the workers it runs."""
    import os

    return max(1, (os.cpu_count() or 1) // workers)


def cmd_correct_teacher(args) -> None:
    from nas.distill import Distiller
    from nas.parents import load_parent

    _check_resume(args)
    parent, tokenizer = load_parent(args.parent, _device(args))
    parent = parent.float()
    train, val = _train_val(args, tokenizer)
    # 2408.11796: a light fine-tune on the distillation data, peak LR a fifth of pre-training's.
    cfg = _distill_config(args, lr=args.pretrain_lr / 5, kd="none", ce_weight=1.0, intermediate="off")
    result = Distiller(parent, None, train, val, args.out, cfg).run(progress=not args.quiet)
    tokenizer.save_pretrained(Path(args.out) / "model")
    print(f"corrected teacher -> {args.out}/model: val loss {result['val_loss']:.4f}")


def cmd_eval(args) -> None:
    import torch
    from transformers import AutoTokenizer

    from nas.data import load_tokens
    from nas.evaluate import heldout, lm_eval_tasks

    model = _load_student(args.model, _device(args), "--model").eval()
    if args.device is None and not torch.cuda.is_available():
        model = model.float()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    report = {}
    if args.data:
        tokens = load_tokens(args.data, tokenizer, args.seq_len, args.text_field)[: args.max_sequences]
        report["heldout"] = heldout(model, tokens, args.batch_size)
    if args.tasks:
        report["lm_eval"] = lm_eval_tasks(model, tokenizer, args.tasks.split(","), args.limit, args.batch_size)
    if not report:
        raise NasError("nothing to evaluate: give --data for held-out loss and/or --tasks for lm-eval")
    text = json.dumps(report, indent=2)
    if args.out:
        from nas.files import write_json

        write_json(args.out, report)
    print(text)


def cmd_plan(args) -> None:
    from nas.plan import Cluster, plan, table, to_dict
    from nas.space import load_space, space_config

    space = load_space(args.space)
    defaults = Cluster()
    cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb,
                      node_memory_gb=args.node_memory_gb or defaults.node_memory_gb, tflops=args.tflops, mfu=args.mfu)
    stages = plan(space, space_config(space), cluster)
    print(json.dumps(to_dict(stages), indent=1) if args.json else
          f"{space.name} on {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs of {cluster.gpu_memory_gb:g} GiB:\n"
          + table(stages, cluster))
    if not all(s.fits for s in stages):
        raise NasError(next(s.fix for s in stages if not s.fits))


def cmd_candidates(args) -> None:
    import pandas as pd
    import torch

    from nas.engine_latency import engine_problem
    from nas.files import cache_dir
    from nas.space import enumerate_candidates, infeasible_hint, load_space, row_axes, space_config
    from nas.storage import RunStorage

    space = load_space(args.space)
    config = space_config(space)
    if problem := engine_problem(space, config):  # before the block scores and timings below
        raise NasError(f"{args.space}: {problem}")
    if space.budget.speed_caps and space.budget.device == "cuda" and not torch.cuda.is_available():
        raise NasError(f"{args.space}: budget.device=cuda: this machine has no GPU to measure on; run `nas "
                       f"candidates` on a node with the target GPU (`nas search` measures there as a Ray task)")
    # Timings here, on this machine's budget.device, are cached in $NAS_CACHE/measured.
    measured = RunStorage(cache_dir(), "measured")
    if space.per_layer is None:
        rows = enumerate_candidates(space, config)
    else:  # the program's children (`nas.search.per_layer_preview`), then the axes' uniform ones where it asks
        from nas.search.per_layer_preview import listed_candidates

        rows = listed_candidates(space, config, args.space, args.block_scores, measured, _stderr)
    if not rows:
        raise NasError(f"{args.space}: {infeasible_hint(space, config)}")
    outside: list[dict] = []
    if space.budget.speed_caps:
        from nas.latency import measure_candidates

        rows, outside = measure_candidates(space, config, rows, measured, echo=_stderr)
    if args.json:  # every figure of every candidate: memory at the budget's context and batch, speed if measured
        print(json.dumps([{"label": r["label"], **row_axes(r), "params": r["params"],
                           "active_params": r.get("active_params", r["params"]),
                           "memory_bytes": r["memory_bytes"], "context": space.budget.context, "batch": space.budget.batch,
                           **{k: r[k] for k in ("latency_ms", "prefill_ms", "throughput", "device_name", "infeasible",
                                                "per_layer_config", "block_score") if k in r}}
                          for r in rows + outside], indent=1))
        return
    for row in outside:
        print(f"infeasible: {row['label']}: {row['infeasible']}")
    if not rows:
        raise NasError(f"{args.space}: no candidate is within the speed budget")
    # "counted" is the budget's kind of count; shown when it is none of the counts already shown.
    shown = space.budget.kind == "total" or (space.budget.kind == "active" and "active_params" in rows[0])
    frame = pd.DataFrame(rows).drop(columns=["counted"] if shown else [])
    if space.per_layer is not None:  # the program's children's widths a layer as text, not their tables
        from nas.search.per_layer import DIGEST
        from nas.search.per_layer_preview import strip_columns

        frame = frame.drop(columns=[c for c in (DIGEST, "per_layer_config") if c in frame])
        frame = frame.assign(**strip_columns(rows, config))
    for column in ("params", "active_params", "counted"):
        if column in frame:
            frame[column] = frame[column].map("{:,}".format)
    frame = frame.rename(columns={"memory_bytes": "memory_gb"})
    frame["memory_gb"] = frame["memory_gb"].map(lambda b: f"{b / 2**30:.2f}")
    for column, spec in (("latency_ms", "{:.3g}"), ("prefill_ms", "{:.3g}"), ("throughput", "{:.4g}")):
        if column in frame:
            frame[column] = frame[column].map(spec.format)
    frame["share_of_parent"] = frame["share_of_parent"].map("{:.1%}".format)
    b = space.budget
    at = f" (memory: weights and KV cache at context {b.context} x batch {b.batch})"
    if "device_name" in frame:
        from nas.latency import settings_of

        at += f" (speed: measured on {', '.join(sorted(set(frame.pop('device_name'))))} in {settings_of(b).dtype}, " \
              f"batch {b.batch} after a prefill of {b.context} tokens)"
    print(f"{len(rows)} feasible candidates for {space.name}{at}:")
    print(frame.to_string(index=False))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_search(args) -> None:
    from nas.search import export_best, run_search, storage_url
    from nas.space import load_space
    from nas.storage import RunStorage

    space = load_space(args.space)
    echo = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    frame = run_search(space, args.root, args.address, echo=echo)
    done = frame[frame["state"] == "COMPLETE"].sort_values("val_loss")
    figures = [k for k in ("params", "active_params", "memory_bytes", "latency_ms", "throughput") if k in done]
    strips = ["kv_heads", "mlp"] if "mlp" in done else []  # a per-layer search: widths a layer, as text
    print(done[["label", *figures, "val_loss", "promoted_val_loss", "wall_s", *strips]].to_string(index=False))
    storage = RunStorage(args.root, space.study)
    with storage.workdir("") as out:
        best = export_best(space.study, storage_url(space, args.root), out / "best.json", root=args.root)
        storage.upload(out / "best.json", "best.json")
    print(f"winner {best['label']} ({best['stage']} val loss {best['val_loss']:.4f}) -> {storage.uri}/best.json")
    for name, view in (("winner", best), ("uniform winner", best.get("uniform_winner"))):
        if view and "strips" in view:  # one character a parent layer (docs/per-layer-search.md)
            print(f"  {name:<15} KV heads {view['strips']['kv_heads']}  MLP {view['strips']['mlp']}"
                  f"{'  ' + view['label'] if view is not best else ''}")


def cmd_export(args) -> None:
    from contextlib import nullcontext

    from nas.exports import written
    from nas.search import export_best
    from nas.storage import is_uri

    if (args.format != "hf" or args.dtype) and not args.checkpoint:
        raise NasError("--format/--dtype: they say how to write --checkpoint; give --checkpoint DIR")
    if args.storage is None and is_uri(args.root):
        raise NasError(f"--storage: the run folder {args.root} is a URI, so the study lives in a database; "
                       f"give its URL (the space's `storage:`)")
    storage = args.storage or f"sqlite:///{(Path(args.root).resolve() / args.study / 'study.db')}"
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).exists():
        raise NasError(f"--storage {storage}: no such sqlite file; give --storage or run `nas search` first")
    with written(args.checkpoint, args.format, args.dtype) if args.checkpoint else nullcontext() as checkpoint:
        best = export_best(args.study, storage, args.out, checkpoint, args.root)
    print(json.dumps(best, indent=2))


def _load_importances(path: str, cls):
    if not Path(path).exists():
        raise NasError(f"--importance {path}: no such file; run `nas importance --out {path}` first")
    try:
        return cls.load(path)
    except Exception as e:
        raise NasError(f"--importance {path}: unreadable or corrupt ({e}); recompute it with `nas importance`") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nas", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenize", help="tokenise a corpus into token shards (any --data may then name the folder)")
    _add_parent_data(p)
    p.add_argument("--out", required=True, help="shard folder (written whole or not at all)")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("importance", help="score heads, neurons, channels and layers of a parent")
    _add_parent_data(p)
    p.add_argument("--out", required=True, help="scores file (.safetensors); reused when it matches")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences")
    p.add_argument("--seq-agg", choices=("mean", "l2", "var"), default="mean")
    p.add_argument("--batch-agg", choices=("mean", "l2", "var"), default="l2")
    p.add_argument("--neuron-source", choices=("pre", "post"), default="pre")
    p.add_argument("--head-source", choices=("output", "attn"), default="output")
    p.add_argument("--drop-samples", type=int, default=8, help="sequences for loss-when-dropped layer scores")
    p.add_argument("--block-sizes", type=int, nargs="*", default=[], help="contiguous layer-block sizes to score")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_importance)

    p = sub.add_parser("arch", help="print a parent's own architecture (every layer kept) as `nas prune --arch` JSON")
    p.add_argument("--parent", default="smollm2-135m")
    p.add_argument("--out", default=None, help="also write it to this file, to edit into a child")
    p.add_argument("--per-layer", action="store_true",
                   help="also list every layer's KV heads and MLP width (per_layer_config), to edit into a per-layer "
                        "child (a layer may instead say \"skip\": [\"attention\"] or [\"mlp\"])")
    p.set_defaults(func=cmd_arch)

    p = sub.add_parser("prune", help="cut one architecture from a parent")
    p.add_argument("--parent", default="smollm2-135m")
    p.add_argument("--arch", required=True, help="architecture JSON (HF config keys + optional 'layers'; without "
                                                 "them, 'num_hidden_layers' or, for a hybrid, 'layers.<kind>' counts "
                                                 "are kept by importance)")
    p.add_argument("--importance", required=True, help="scores from `nas importance`")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--layer-method", choices=("bi", "drop", "block"), default="bi",
                   help="how to pick kept layers when the JSON has no 'layers'")
    p.add_argument("--no-rescale-norms", action="store_true")
    p.add_argument("--no-residual-heads", action="store_true", help="do not fold pruned heads' output projections")
    p.add_argument("--device", default=None, help="load the parent on this device and prune in memory (default: a "
                   "local checkpoint is pruned file to file, tensor by tensor)")
    _add_format(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("distill", help="retrain a pruned student by knowledge distillation")
    p.add_argument("--student", required=True, help="pruned HF checkpoint (from `nas prune`)")
    p.add_argument("--teacher", default="smollm2-135m", help="the parent (or a corrected teacher)")
    _add_training(p)
    p.add_argument("--teacher-topk", type=int, default=0, help="cache the teacher's top-K log-probs (0: online)")
    p.add_argument("--workers", type=int, default=1,
                   help="Ray Train workers, FSDP2-sharded (1: this process, no Ray); each takes 1 GPU on CUDA")
    p.add_argument("--address", default=None, help="Ray cluster to run the workers on (default: a private Ray)")
    p.add_argument("--max-failures", type=int, default=1, help="restarts from the last checkpoint after a worker dies")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("correct-teacher", help="fine-tune the parent on the distillation data (2408.11796)")
    p.add_argument("--parent", default="smollm2-135m")
    p.add_argument("--pretrain-lr", type=float, required=True, help="the parent's peak pre-training LR")
    _add_training(p)
    p.set_defaults(func=cmd_correct_teacher)

    p = sub.add_parser("eval", help="held-out loss and lm-eval tasks of a checkpoint")
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--data", default=None, help="held-out text (file, directory, 'shakespeare', dataset)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-sequences", type=int, default=64)
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks, e.g. nas_cloze,hellaswag")
    p.add_argument("--limit", type=int, default=None, help="examples per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="also write the report as JSON")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("candidates", help="list the feasible candidates of a search space")
    p.add_argument("space", help="search-space YAML")
    p.add_argument("--json", action="store_true", help="one JSON object per candidate: axes, params, active_params, "
                                                       "memory_bytes (at budget.context x budget.batch)")
    p.add_argument("--block-scores", action="store_true",
                   help="a per-layer space: compute the block scores here where they are not cached yet (about half "
                        "a forward of the parent a variant), to list the program's children")
    p.set_defaults(func=cmd_candidates)

    p = sub.add_parser("plan", help="memory, workers, FLOPs and time of each stage of a space, and whether it fits")
    p.add_argument("space")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0)
    p.add_argument("--node-memory-gb", type=float, default=0, help="for CPU stages (default: this machine's)")
    p.add_argument("--tflops", type=float, default=989.0, help="peak TFLOP/s of one GPU (default: H100 bf16)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the wall times assume")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("search", help="run the architecture search (re-running resumes)")
    p.add_argument("space", nargs="?", default=str(DEMO_SPACE), help="search-space YAML (default: the SmolLM2 demo)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: the one RAY_ADDRESS or a Ray job "
                                                    "names, else a private Ray on 127.0.0.1)")
    p.add_argument("--root", default="trials", help="run folder: a path, or a URI every node reaches (s3://..., "
                                                    "gs://..., file:///nfs/...)")
    p.add_argument("--quiet", action="store_true", help="print only errors and the final table")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="write the best architecture of a study as JSON (and its checkpoint)")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: trials/<study>/study.db)")
    p.add_argument("--root", default="trials", help="the search's run folder (path or URI)")
    p.add_argument("--out", required=True, help="JSON file")
    p.add_argument("--checkpoint", default=None, help="also write the winner's checkpoint here (in --format)")
    _add_format(p)
    p.set_defaults(func=cmd_export)
    return parser


def _add_format(p: argparse.ArgumentParser) -> None:
    from nas.exports import DTYPES, FORMATS

    p.add_argument("--format", choices=FORMATS, default="hf", help="hf: a stock HF folder; decilm: a folder vLLM "
                   "runs (DeciLMForCausalLM, trust_remote_code); gguf: a folder holding model.gguf for llama.cpp")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="tensor dtype of a decilm or gguf export "
                   "(default float32)")


def _add_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--tokens", type=int, required=True, help="training tokens")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (a finished one is not redone)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kd", choices=("forward", "reverse", "none"), default="forward")
    p.add_argument("--ce-weight", type=float, default=0.0)
    p.add_argument("--intermediate", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device", default=None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    if not args.verbose:
        import optuna
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        args.func(args)
    except NasError as e:
        print(f"nas {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
