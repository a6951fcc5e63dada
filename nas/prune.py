"""Structured pruning (paper §2.3): (parent, importances, Architecture) -> a fresh, stock HF model.

The child is built from its own config; each of its tensors is an index-selected slice of the parent's,
copied through an explicit map from parameter name to the axes it spans. The parent is never modified.
`prune` works on a loaded model; `prune_checkpoint` streams a checkpoint folder to a checkpoint folder without
loading the parent (the same tensors, bit for bit).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nas.architecture import Architecture, LayerShape
from nas.blocks import MLP, Attention, GatedDeltaNet, Mamba2, MoE
from nas.errors import NasError
from nas.families import Parent
from nas.importance import Importances
from nas.loader import build

@dataclass(frozen=True)
class PruneOptions:
    """Choices beyond the Architecture itself.

    Attributes:
        rescale_norms: scale kept RMSNorm weights by sqrt(parent_hidden / child_hidden), so that channels
            whose activations were zero leave the normalised outputs unchanged (RMS is a mean over width). In a
            family whose embeddings are multiplied by sqrt(hidden_size) (Gemma) the embeddings are scaled by the
            same factor, so that the child's residual stream starts at the parent's size; when they are also the
            LM head, the final norm is left unscaled, which keeps the logits the parent's.
        residual_heads: add each pruned query head's output projection onto the most important kept head
            of its KV group (the paper's residual-head idea; exact only when both heads attend alike). On by
            default: after KD it lowered held-out loss by 0.49 nats (seed noise 0.02; benchmarks/FIDELITY.md).

        expert_score: which `nas.importance.EXPERT_SCORES` measure ranks the experts of a mixture of experts.
    """

    rescale_norms: bool = True
    residual_heads: bool = True
    expert_score: str = "weighted"


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores, in ascending index order (keeps the parent's layout)."""
    return scores.float().topk(k).indices.sort().values


def head_selection(scores: Tensor, arch: Architecture, parent_kv: int, kv: int | None = None) -> tuple[Tensor, Tensor]:
    """Kept query heads and KV heads of one layer.

    The `kv` (default: `arch.num_key_value_heads`) groups with the highest summed head score are kept; within each,
    the num_attention_heads / kv best query heads. With every KV head kept this is the paper's GQA default.

    Args:
        scores: [H] per query head.
    Returns:
        (query head indices [H'], KV head indices [K']), ascending.
    """
    kv = kv or arch.num_key_value_heads
    per_group = scores.numel() // parent_kv
    grouped = scores.float().view(parent_kv, per_group)
    groups = _top(grouped.sum(1), kv)
    queries = [g * per_group + _top(grouped[g], arch.num_attention_heads // kv) for g in groups.tolist()]
    return torch.cat(queries), groups


def layer_heads(scores: Tensor, arch: Architecture, kv: int, parent_arch: Architecture) -> tuple[Tensor, Tensor, int]:
    """Kept query heads of a layer with `kv` KV heads, the parent KV heads each child KV head is made of, and how
    many that is (1: a slice).

    Where whole parent groups can serve the layer's groups (num_attention_heads / kv <= the parent's queries per
    group) this is `head_selection`. Fewer KV heads than that cannot be sliced: the layer keeps the query heads of the
    architecture's global selection, grouped in order, and each child KV head is the mean of the parent KV heads of
    its query heads (one per query head; the GQA paper's mean-pooling, Ainslie et al. 2023). That is exact where the
    pooled heads are equal, and a keep-all child still equals the parent.
    """
    per_group = parent_arch.queries_per_group
    if arch.num_attention_heads // kv <= per_group:
        queries, groups = head_selection(scores, arch, parent_arch.num_key_value_heads, kv)
        return queries, groups, 1
    queries, _ = head_selection(scores, arch, parent_arch.num_key_value_heads)
    return queries, queries // per_group, arch.num_attention_heads // kv


def prune(parent: nn.Module, importances: Importances, arch: Architecture,
          options: PruneOptions = PruneOptions()) -> nn.Module:
    """A new model of the parent's class, shaped by `arch`, holding slices of the parent's weights.

    Args:
        parent: an HF causal LM of a supported family (left untouched).
        importances: scores from `nas.importance` for this parent.
        arch: the child; `arch.layers` names the parent layers kept.
    Returns:
        The child on the parent's device and dtype, in eval mode.
    """
    child_config = Parent.of(parent.config).child_config(arch)
    source = parent.state_dict()
    device, dtype = next(parent.parameters()).device, next(parent.parameters()).dtype
    with torch.device(device):
        child = build(child_config, dtype=dtype)
    expected = child.state_dict()
    state = dict(child_tensors(source.__getitem__, parent.config, expected, importances, arch, options))
    child.load_state_dict(state, strict=True)
    if getattr(child_config, "tie_word_embeddings", False):
        child.tie_weights()
    return child.eval()


def child_tensors(source: Callable[[str], Tensor], parent_config, expected: dict[str, Tensor],
                  importances: Importances, arch: Architecture,
                  options: PruneOptions = PruneOptions()) -> Iterator[tuple[str, Tensor]]:
    """The child's tensors one decoder layer at a time, each sliced from `source(parent name)`: the parent is
    read tensor by tensor, so it never has to be in memory whole. `expected` holds the child's names and shapes
    (a meta-device child will do)."""
    parent = Parent.of(parent_config)
    family, parent_arch = parent.family, parent.architecture
    hidden = _top(importances.hidden, arch.hidden_size)
    factor = math.sqrt(parent_arch.hidden_size / arch.hidden_size) \
        if options.rescale_norms and arch.hidden_size != parent_arch.hidden_size else 1.0
    scaled_embedding = family.scaled_embedding and factor != 1.0
    tied = getattr(parent_config, "tie_word_embeddings", False)
    embedding = f"{family.embeddings}.weight"
    embeddings = {embedding, "lm_head.weight"} if tied else {embedding}
    final_norm = f"{family.final_norm}.weight"

    def take(name: str, parent_name: str, axes: tuple[str | None, ...], index: dict[str, Tensor]) -> Tensor:
        tensor = _slice(source(parent_name), axes, index)
        if "kv_pool" in index:
            tensor = _pooled(tensor, axes, int(index["kv_pool"]), arch.head_dim)
        if scaled_embedding and name in embeddings:
            tensor = tensor * factor
        elif factor != 1.0 and family.is_norm(name) and not (scaled_embedding and tied and name == final_norm):
            tensor = family.norm.rescaled(tensor, factor)
        assert tensor.shape == expected[name].shape, \
            f"{name}: sliced {tuple(tensor.shape)} != {tuple(expected[name].shape)}"
        return tensor

    for j, i in enumerate(arch.layers):
        index = {"hidden": hidden}
        shape = arch.layer_shape(j)
        slots = kept_slots(family, parent_config, i, shape)
        for _, unit in slots:
            index.update(_unit_indices(unit, importances, i, parent_config, arch, parent_arch, options, shape))
        prefix, parent_prefix = f"model.layers.{j}.", f"model.layers.{i}."
        axes = family.layer_axes(parent_config, i)
        layer = {}
        for name in expected:
            if name.startswith(prefix):
                inner = name[len(prefix):]
                if inner not in axes:
                    raise AssertionError(f"{family.model_type}: no slicing rule for parameter {name}")
                layer[name] = take(name, parent_prefix + inner, axes[inner], index)
        for path, unit in slots:
            if isinstance(unit, Attention) and options.residual_heads:
                o_proj = f"{path}.o_proj.weight"
                _fold_pruned_heads(layer[prefix + o_proj], source(parent_prefix + o_proj), importances.heads[i],
                                   index["heads"], index, arch, parent_arch)
            elif isinstance(unit, Mamba2) and options.rescale_norms and unit.has_norm(parent_config):
                norm = f"{prefix}{path}.norm.weight"
                layer[norm] = layer[norm] * unit.norm_factor(arch, parent_arch)
        yield from layer.items()
    for name in expected:
        if not name.startswith("model.layers."):
            yield name, take(name, name, family.outside_axes[name], {"hidden": hidden})


def kept_slots(family, config, i: int, shape: LayerShape) -> list[tuple[str, Any]]:
    """The slots of the parent layer i that a child layer of `shape` keeps (a skipped block has no tensors)."""
    return [(path, unit) for path, unit in family.slots(config, i)
            if not (isinstance(unit, Attention) and not shape.attention)
            and not (isinstance(unit, MLP) and path == family.ffn and not shape.mlp)]


def _unit_indices(unit, importances: Importances, i: int, config, arch: Architecture, parent_arch: Architecture,
                  options: PruneOptions, shape: LayerShape) -> dict[str, Tensor]:
    """The kept-index sets of one unit of the parent layer i, chosen by importance, for a child layer of `shape`."""
    if isinstance(unit, Attention):
        q_heads, kv_heads, pool = layer_heads(importances.heads[i], arch, shape.num_key_value_heads, parent_arch)
        out = unit.indices(q_heads, kv_heads, arch.head_dim, parent_arch)
        return {**out, "kv_pool": torch.tensor(pool)} if pool > 1 else out
    if isinstance(unit, MoE):
        return _expert_indices(unit, importances, i, arch, parent_arch, options.expert_score)
    if isinstance(unit, Mamba2):
        heads, channels = unit.select(importances.mixer_heads[i], importances.mixer_channels[i], config, arch)
        return unit.indices(heads, channels, config, parent_arch)
    if isinstance(unit, GatedDeltaNet):
        values, keys = unit.select(importances.mixer_heads[i], arch, parent_arch)
        return unit.indices(values, keys, config, parent_arch)
    return unit.indices(_top(importances.neurons[i], shape.intermediate_size), parent_arch.intermediate_size)


def _expert_indices(moe, importances: Importances, i: int, arch: Architecture, parent_arch: Architecture,
                    score: str) -> dict[str, Tensor]:
    """Layer i's kept experts (the best by `score`) and, in each, its own best neurons, as many in every expert."""
    experts = _top(importances.experts[score][i], arch.get(moe.count_key))
    width = arch.get(moe.width_key)
    neurons = torch.stack([_top(importances.expert_neurons[i, e], width) for e in experts.tolist()])
    shared = _top(importances.shared_neurons[i], arch.get(moe.shared_key)) if moe.shared_key else None
    return moe.indices(experts, neurons, parent_arch.get(moe.width_key), shared)


def _slice(tensor: Tensor, axes: tuple[str | None, ...], index: dict[str, Tensor]) -> Tensor:
    """`tensor` with each dimension cut to its axis's kept indices. A 2-D index set holds one row of indices per
    entry of dimension 0 (each kept expert's own neurons), which is cut first."""
    out = tensor
    for dim, axis in enumerate(axes):
        if axis is None:
            continue
        kept = index[axis].to(out.device)
        if kept.dim() == 1:
            out = out.index_select(dim, kept)
        else:
            shape = [kept.shape[0]] + [1] * (out.dim() - 1)
            shape[dim] = kept.shape[1]
            out = out.take_along_dim(kept.view(shape), dim)
    return out.clone() if out is tensor else out  # index_select already made a copy


def _pooled(tensor: Tensor, axes: tuple[str | None, ...], n: int, head_dim: int) -> Tensor:
    """`tensor` with each run of `n` sliced KV heads (along its "kv" dimensions) replaced by their mean, in fp32."""
    for dim, axis in enumerate(axes):
        if axis == "kv":
            heads = tensor.unflatten(dim, (-1, n, head_dim))
            tensor = heads.float().mean(dim + 1).to(tensor.dtype).flatten(dim, dim + 1)
    return tensor


def _fold_pruned_heads(o_child: Tensor, o_parent: Tensor, scores: Tensor, kept: Tensor, index: dict[str, Tensor],
                       arch: Architecture, parent_arch: Architecture) -> None:
    """Add each pruned query head's o_proj columns (of the parent's `o_parent`) onto the best kept head of the same
    KV group, in the child's `o_child`.

    Heads of one group read the same values, so a pruned head's output is approximated by the kept head's
    attention over those values; folding keeps its write direction into the residual stream.
    """
    d, per_group = arch.head_dim, parent_arch.queries_per_group
    o_parent = o_parent.index_select(0, index["hidden"].to(o_child.device))
    position = {h: n for n, h in enumerate(kept.tolist())}
    for head in range(parent_arch.num_attention_heads):
        if head in position:
            continue
        group = [h for h in position if h // per_group == head // per_group]
        if not group:
            continue  # the whole KV group was pruned: its values are gone
        target = position[max(group, key=lambda h: float(scores[h]))]
        o_child[:, target * d:(target + 1) * d] += o_parent[:, head * d:(head + 1) * d]


# -- pruning a checkpoint on disk, tensor by tensor ---------------------------------------------------

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsReader:
    """Tensors of an HF checkpoint folder (one `model.safetensors` or shards named by its index), read one at a
    time with plain file reads: no tensor stays in memory after its caller drops it, and the file is never
    mapped (a mapping's pages would stay resident and count as this process's memory)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise NasError(f"--parent {folder}: no model.safetensors or model.safetensors.index.json to prune from")
        self.entries: dict[str, tuple[Path, int, dict]] = {}
        for name in files:
            path = folder / name
            for key, entry in self.header(path).items():
                self.entries[key] = (path, entry.pop("_base"), entry)

    @staticmethod
    def header(path: Path) -> dict[str, dict]:
        """A safetensors file's tensor entries (dtype, shape, data_offsets, and `_base`: where the data starts)."""
        with path.open("rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        return {key: {**entry, "_base": 8 + size} for key, entry in header.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __call__(self, name: str) -> Tensor:
        path, base, entry = self.entries[name]
        start, end = entry["data_offsets"]
        data = bytearray(end - start)
        with path.open("rb") as f:
            f.seek(base + start)
            f.readinto(data)
        return torch.frombuffer(data, dtype=_DTYPES[entry["dtype"]]).view(entry["shape"]) if data else \
            torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])


def prune_checkpoint(parent_dir: str | Path, importances: Importances, arch: Architecture, out: str | Path,
                     options: PruneOptions = PruneOptions(), max_shard_bytes: int = 2 * 2**30) -> Path:
    """`prune` from a checkpoint folder into the folder `out` (weights and config; the caller makes it atomic and
    adds the tokenizer), streaming: the parent is read tensor by tensor and the child written in shards of up to
    `max_shard_bytes`, so peak memory is about one parent tensor plus one child shard, never the parent. The
    child's tensors equal `prune`'s bit for bit (in the dtype stored on disk)."""
    from nas.parents import parent_config as read_config

    parent_config = read_config(str(parent_dir))
    parent = Parent.of(parent_config)
    reader = _Renamed.of(SafetensorsReader(parent_dir), parent.family)
    moe = parent.family.moe
    child_config = parent.child_config(arch)
    with torch.device("meta"):
        expected = build(child_config).state_dict()
    tied = getattr(child_config, "tie_word_embeddings", False)
    if tied:  # stored once, as the embedding (as save_pretrained does)
        expected.pop("lm_head.weight", None)

    stored_dtype = getattr(parent_config, "dtype", None) or torch.bfloat16  # of a quantised parent's dequantised experts
    if isinstance(stored_dtype, str):
        stored_dtype = getattr(torch, stored_dtype)

    def source(name: str) -> Tensor:
        if moe and (tensor := moe.read_stored(name, reader, parent.architecture.get(moe.count_key),
                                              stored_dtype)) is not None:
            return tensor  # one layer's experts, stacked from the checkpoint's per-expert tensors
        # A tied parent stores its LM head only as the embedding.
        embedding = f"{parent.family.embeddings}.weight"
        return reader(embedding if name == "lm_head.weight" and name not in reader else name)

    tensors = child_tensors(source, parent_config, expected, importances, arch, options)
    if moe:  # written under the checkpoint's own names, as save_pretrained writes them
        tensors = (entry for name, tensor in tensors for entry in moe.stored(name, tensor))
    root = parent.family.stored_root
    if root != "model":
        tensors = ((_rooted(name, root), tensor) for name, tensor in tensors)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = list(_shards(tensors, max_shard_bytes, out))
    if len(files) == 1:
        (out / files[0]).rename(out / "model.safetensors")
    else:
        weight_map = {}
        for name in files:
            weight_map.update({k: name for k in SafetensorsReader.header(out / name)})
        total = sum((out / f).stat().st_size for f in files)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    child_config.save_pretrained(out)
    return out


def _rooted(name: str, root: str) -> str:
    """An in-memory name under the checkpoint's own root (`model.layers.0...` -> `backbone.layers.0...`)."""
    return root + name[len("model"):] if name.startswith("model.") else name


@dataclass(frozen=True)
class _Renamed:
    """A checkpoint's tensors under their in-memory names: transformers renames the checkpoint's root on load
    (Nemotron-H's `backbone.`, a vision-language checkpoint's `model.language_model.` for its text decoder)."""

    reader: SafetensorsReader
    root: str

    @classmethod
    def of(cls, reader: SafetensorsReader, family) -> _Renamed:
        suffix = family.embeddings[len("model"):] + ".weight"
        roots = (family.stored_root, "model", "model.language_model")
        return cls(reader, next((r for r in roots if r + suffix in reader), "model"))

    def __contains__(self, name: str) -> bool:
        return _rooted(name, self.root) in self.reader

    def __call__(self, name: str) -> Tensor:
        return self.reader(_rooted(name, self.root))


def _shards(tensors: Iterator[tuple[str, Tensor]], max_bytes: int, out: Path) -> Iterator[str]:
    """Write (name, tensor) pairs into numbered safetensors files of up to `max_bytes`; yields the file names."""
    shard: dict[str, Tensor] = {}
    size, n = 0, 0
    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_bytes:
            n += 1
            yield _write_safetensors(out / f"model-{n:05d}.safetensors", shard)
            shard, size = {}, 0
        shard[key] = tensor.contiguous()
        size += nbytes
    n += 1
    yield _write_safetensors(out / f"model-{n:05d}.safetensors", shard)


def _write_safetensors(path: Path, tensors: dict[str, Tensor]) -> str:
    """A safetensors file written tensor by tensor (`safetensors.torch.save_file` first builds the whole file in
    memory: another copy of the shard). Format: 8-byte header length, JSON header, then the raw tensors."""
    dtypes = {v: k for k, v in _DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in tensors.values():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return path.name
