"""The `nas` command line. Each subcommand parses flags and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from nas.errors import NasError

log = logging.getLogger("nas")


def _add_parent_data(p: argparse.ArgumentParser, data_default: str | None = "shakespeare") -> None:
    p.add_argument("--parent", default="smollm2-135m", help="HF directory, hub id, or 'smollm2-135m' (default)")
    p.add_argument("--data", default=data_default, help="text/JSONL/parquet file or directory, 'shakespeare', "
                                                        "or a datasets name")
    p.add_argument("--text-field", default="text", help="JSONL/parquet field holding the text")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def _device(args):
    import torch

    return torch.device(args.device) if args.device else None


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


def cmd_prune(args) -> None:
    from nas.architecture import Architecture
    from nas.importance import Importances, select_layers
    from nas.parents import load_parent
    from nas.prune import PruneOptions, prune

    model, tokenizer = load_parent(args.parent, _device(args))
    importances = _load_importances(args.importance, Importances)
    try:
        data = json.loads(Path(args.arch).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NasError(f"--arch {args.arch}: cannot read architecture JSON ({e})") from None
    if "layers" not in data and "num_hidden_layers" in data:
        data["layers"] = select_layers(importances, int(data["num_hidden_layers"]), args.layer_method)
    arch = Architecture.from_dict(data)
    child = prune(model, importances, arch, PruneOptions(rescale_norms=not args.no_rescale_norms,
                                                        residual_heads=args.residual_heads))
    from nas.files import atomic_dir

    with atomic_dir(args.out) as tmp:
        child.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "architecture.json").write_text(json.dumps(arch.to_dict(), indent=2) + "\n")
    n = sum(p.numel() for p in child.parameters())
    print(f"pruned {args.parent} -> {arch.short()} ({n:,} parameters) -> {args.out}")


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

    p = sub.add_parser("prune", help="cut one architecture from a parent")
    p.add_argument("--parent", default="smollm2-135m")
    p.add_argument("--arch", required=True, help="architecture JSON (HF config keys + optional 'layers')")
    p.add_argument("--importance", required=True, help="scores from `nas importance`")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--layer-method", choices=("bi", "drop", "block"), default="bi",
                   help="how to pick kept layers when the JSON has no 'layers'")
    p.add_argument("--no-rescale-norms", action="store_true")
    p.add_argument("--residual-heads", action="store_true")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    if not args.verbose:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    try:
        args.func(args)
    except NasError as e:
        print(f"nas {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
