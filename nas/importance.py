"""Activation-based importance of heads, neurons, channels and layers (paper §2.2), computed once.

Scores are data: an `Importances` value of tensors, saved as safetensors with JSON metadata and passed to
`nas.prune.prune` as an argument. Activations are never stored: each hook reduces its tensor over the
sequence at once and folds the result into a running fp32 accumulator over samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import align_module_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from nas.architecture import Architecture
from nas.blocks import Attention, GatedDeltaNet, Mamba2, MoE
from nas.families import Family, family_of
from nas.files import atomic_path

log = logging.getLogger(__name__)

AGGREGATIONS = ("mean", "l2", "var")
LAYER_METHODS = ("bi", "drop", "block")
NEURON_SOURCES = ("pre", "post")
HEAD_SOURCES = ("output", "attn")
#: How an expert is scored from the tokens routed to it: "output" sums the L2 norm of its output (ModelOpt's),
#: "weighted" the same norm times the routing weight the token gives it (what it adds to the residual stream),
#: "frequency" counts its tokens.
EXPERT_SCORES = ("output", "weighted", "frequency")


@dataclass(frozen=True)
class ImportanceSettings:
    """How scores are aggregated. Defaults follow the paper's best: batch=l2, seq=mean (§4, Table 4).

    Attributes:
        seq_agg: reduction over tokens of one sample.
        batch_agg: reduction over samples.
        neuron_source: "pre" scores `X W1^T` (the paper), "post" the down projection's input.
        head_source: "output" scores each head by the norm of its contribution through its slice of
            o_proj, "attn" by the norm of its attention output (the paper's literal metric). Under GQA
            the heads of a group read the same values, so "attn" barely separates them (see docs/method.md).
        drop_samples: samples used for the loss-when-dropped scores (each costs a forward per layer set);
            0 skips them (then only "bi" can select layers).
        block_sizes: sizes k for which the loss of dropping every contiguous block of k layers is scored.
        batch_size: samples per forward.
    """

    seq_agg: str = "mean"
    batch_agg: str = "l2"
    neuron_source: str = "pre"
    head_source: str = "output"
    drop_samples: int = 8
    block_sizes: tuple[int, ...] = ()
    batch_size: int = 8

    def __post_init__(self) -> None:
        for key in ("seq_agg", "batch_agg"):
            if getattr(self, key) not in AGGREGATIONS:
                raise ValueError(f"{key}={getattr(self, key)!r}: must be one of {AGGREGATIONS}")
        if self.neuron_source not in NEURON_SOURCES:
            raise ValueError(f"neuron_source={self.neuron_source!r}: must be one of {NEURON_SOURCES}")
        if self.head_source not in HEAD_SOURCES:
            raise ValueError(f"head_source={self.head_source!r}: must be one of {HEAD_SOURCES}")
        object.__setattr__(self, "block_sizes", tuple(sorted({int(k) for k in self.block_sizes})))


@dataclass(frozen=True)
class Importances:
    """Importance scores of one parent; higher means keep.

    Attributes:
        hidden: [hidden_size] embedding channels, summed over every norm layer.
        heads: [num_layers, num_attention_heads] per query head.
        neurons: [num_layers, intermediate_size] per MLP neuron.
        layer_bi: [num_layers] Block Importance, mean of 1 - cos(input, output) over tokens.
        block_loss: k -> [num_layers - k + 1]: LM loss with layers start..start+k-1 dropped
            (k = 1 is the loss of dropping each layer alone).
        base_loss: LM loss of the intact parent on the same samples.
        meta: fingerprints, settings and sample count.
        experts: in a mixture of experts, each `EXPERT_SCORES` measure -> [num_layers, experts] (dense layers'
            rows are zero); empty in a dense model.
        expert_neurons: [num_layers, experts, expert width]: each expert's neurons on its routed tokens only
            (the root of their summed squares), or None.
        shared_neurons: [num_layers, shared width]: the shared expert's neurons as a dense MLP's, or None.
        mixer_heads: in a hybrid, [num_layers, recurrent heads]: each Mamba2 head, or each Gated DeltaNet value
            head, scored as attention heads are (rows of other layers are zero); None in other families.
        mixer_channels: [num_layers, Mamba2 head_dim]: each channel of the Mamba2 heads, over all heads, or None.
    """

    hidden: Tensor
    heads: Tensor
    neurons: Tensor
    layer_bi: Tensor
    block_loss: dict[int, Tensor] = field(default_factory=dict)
    base_loss: float = float("nan")
    meta: dict[str, Any] = field(default_factory=dict)
    experts: dict[str, Tensor] = field(default_factory=dict)
    expert_neurons: Tensor | None = None
    shared_neurons: Tensor | None = None
    mixer_heads: Tensor | None = None
    mixer_channels: Tensor | None = None

    def save(self, path: str | Path) -> None:
        tensors = {"hidden": self.hidden, "heads": self.heads, "neurons": self.neurons, "layer_bi": self.layer_bi}
        tensors |= {f"block_loss.{k}": v for k, v in self.block_loss.items()}
        tensors |= {f"experts.{k}": v for k, v in self.experts.items()}
        tensors |= {k: v for k in _OPTIONAL if (v := getattr(self, k)) is not None}
        meta = {"nas": json.dumps({**self.meta, "base_loss": self.base_loss})}
        with atomic_path(path) as tmp:
            save_file({k: v.float().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Importances:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["nas"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        blocks = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("block_loss.")}
        experts = {k.split(".")[1]: v for k, v in tensors.items() if k.startswith("experts.")}
        base_loss = meta.pop("base_loss")
        return cls(tensors["hidden"], tensors["heads"], tensors["neurons"], tensors["layer_bi"], blocks, base_loss, meta,
                   experts, **{k: tensors.get(k) for k in _OPTIONAL})

    def shuffled(self, seed: int) -> Importances:
        """Random scores of the same shapes: the baseline that importance must beat (every expert measure draws
        the same random order)."""
        g = torch.Generator().manual_seed(seed)
        rand = lambda t: None if t is None else torch.rand(t.shape, generator=g)  # noqa: E731
        experts = rand(next(iter(self.experts.values()), None))
        return replace(self, hidden=rand(self.hidden), heads=rand(self.heads), neurons=rand(self.neurons),
                       experts={k: experts for k in self.experts},
                       **{k: rand(getattr(self, k)) for k in _OPTIONAL})


#: The scores only some families have.
_OPTIONAL = ("expert_neurons", "shared_neurons", "mixer_heads", "mixer_channels")


class _Running:
    """Streaming reduction over samples of per-sample score vectors, in fp32."""

    def __init__(self, how: str):
        self.how, self.n, self.sum, self.sumsq = how, 0, 0.0, 0.0

    def add(self, x: Tensor) -> None:  # x: [B, N]
        x = x.float()
        self.n += x.shape[0]
        self.sum = self.sum + x.sum(0)
        self.sumsq = self.sumsq + x.pow(2).sum(0)

    def result(self) -> Tensor:
        """On the CPU (layers of a model spread over devices reduce on their own)."""
        total, squares = torch.as_tensor(self.sum).cpu(), torch.as_tensor(self.sumsq).cpu()
        if self.how == "l2":
            return squares.sqrt()
        mean = total / self.n
        return mean if self.how == "mean" else (squares / self.n - mean.pow(2)).clamp_min(0)


def _over_sequence(x: Tensor, how: str) -> Tensor:
    """[B, S, N] -> [B, N] in fp32."""
    x = x.float()
    if how == "mean":
        return x.mean(1)
    if how == "l2":
        return x.norm(dim=1)
    return x.var(1, unbiased=False)


def _decoder(model: nn.Module) -> nn.Module:
    return model.model


@contextlib.contextmanager
def _hooks(model: nn.Module, family: Family, settings: ImportanceSettings) -> Iterator[dict[str, Any]]:
    """Install the scoring hooks; yields the accumulators they fill."""
    layers = _decoder(model).layers
    config = model.config
    acc: dict[str, Any] = {
        "heads": [_Running(settings.batch_agg) for _ in layers],
        "neurons": [_Running(settings.batch_agg) for _ in layers],
        # Every layer norm's output, in layer order, then the final norm's.
        "norms": [_Running(settings.batch_agg) for _ in range(len(family.layer_norms) * len(layers) + 1)],
        "bi_sum": torch.zeros(len(layers), dtype=torch.float64),
        "bi_tokens": 0,
        # Mixture of experts, per sparse layer: each measure's sums over routed tokens, and the experts' neurons'
        # summed squares; the shared expert's neurons as a dense MLP's.
        "experts": {},
        "shared": [_Running(settings.batch_agg) for _ in layers],
        # A hybrid's recurrent mixer: its heads, and (Mamba2) the channels of its heads.
        "mixer_heads": [_Running(settings.batch_agg) for _ in layers],
        "mixer_channels": [_Running(settings.batch_agg) for _ in layers],
    }
    seq = settings.seq_agg

    def heads_hook(i: int, head_dim: int, scores: str, channels: str | None = None):
        """Score the heads of width `head_dim` whose outputs enter an output projection side by side (attention,
        and the recurrent mixers' heads after their gated norm); `channels`: also each of a head's channels over
        all heads."""
        grams: list[Tensor] = []  # computed at the first call, on the layer's device, with its weight in place

        def record(o_proj, x):
            x = x.float().unflatten(-1, (-1, head_dim))  # [B, S, H, d]: per-head outputs before o_proj
            if channels:
                acc[channels][i].add(_over_sequence(x.norm(dim=2), seq))
            if settings.head_source == "attn":
                norms = x.norm(dim=-1)
            else:
                if not grams:
                    # ||W_o,h a_h||^2 = a_h^T (W_o,h^T W_o,h) a_h: a [d, d] Gram matrix per head, not a full
                    # projection. An offloaded o_proj (accelerate) is loaded only for its forward, after this hook.
                    with align_module_device(o_proj, x.device):
                        w = o_proj.weight.detach().float().unflatten(1, (-1, head_dim))  # [hidden, H, d]
                        grams.append(torch.einsum("ohd,ohe->hde", w, w))
                norms = torch.einsum("bshd,hde,bshe->bsh", x, grams[0], x).clamp_min(0).sqrt()
            acc[scores][i].add(_over_sequence(norms, seq))
        return record

    def neurons_record(i: int):
        return lambda x: acc["neurons"][i].add(_over_sequence(x, seq))

    def experts_record(i: int):
        def record(e: int, weights: Tensor, pre: Tensor, post: Tensor, out: Tensor) -> None:
            sums = acc["experts"].get(i)
            if sums is None:
                n, width = moe_shape(i)
                sums = acc["experts"][i] = {**{k: torch.zeros(n, dtype=torch.float64) for k in EXPERT_SCORES},
                                            "neurons": torch.zeros(n, width, dtype=torch.float64)}
            norms = out.float().norm(dim=-1)
            sums["output"][e] += float(norms.sum())
            sums["weighted"][e] += float((norms * weights.float()).sum())
            sums["frequency"][e] += norms.numel()
            x = pre if settings.neuron_source == "pre" else post
            sums["neurons"][e] += x.float().pow(2).sum(0).double().cpu()
        return record

    def moe_shape(i: int) -> tuple[int, int]:
        experts = layers[i].get_submodule(family.ffn).experts
        return experts.num_experts, experts.down_proj.shape[-1 if family.moe.layout == "stacked" else 1]

    def norm_hook(j: int):
        def hook(_mod, _args, out):
            acc["norms"][j].add(_over_sequence(out, seq))
        return hook

    def bi_hook(i: int):
        def hook(_mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            acc["bi_sum"][i] += (1 - cos).sum().double().cpu()
            if i == 0:
                acc["bi_tokens"] += cos.numel()
        return hook

    handles = []
    per_layer = len(family.layer_norms)
    pre = settings.neuron_source == "pre"
    head_dim = Architecture.of_config(config).head_dim
    for i, layer in enumerate(layers):
        for path, unit in family.slots(config, i):
            module = layer.get_submodule(path)
            if isinstance(unit, Attention):
                handles += unit.hooks(module, heads_hook(i, head_dim, "heads"))
            elif isinstance(unit, Mamba2):
                handles += unit.hooks(module, heads_hook(i, getattr(config, unit.head_dim_key), "mixer_heads",
                                                         "mixer_channels"))
            elif isinstance(unit, GatedDeltaNet):
                handles += unit.hooks(module, heads_hook(i, config.linear_value_head_dim, "mixer_heads"))
            elif isinstance(unit, MoE):
                handles += unit.hooks(module, experts_record(i))
                if unit.shared_key:  # it runs on the flattened tokens: [B * S, width]
                    handles += family.mlp.hooks(module.shared_expert, pre, lambda x, i=i: acc["shared"][i].add(
                        _over_sequence(x.view(acc["batch"], -1, x.shape[-1]), seq)))
            else:
                handles += unit.hooks(module, pre, neurons_record(i))
        handles += [layer.get_submodule(name).register_forward_hook(norm_hook(per_layer * i + n))
                    for n, name in enumerate(family.layer_norms)]
        handles.append(layer.register_forward_hook(bi_hook(i), with_kwargs=True))
    final_norm = model.get_submodule(family.final_norm)
    handles.append(final_norm.register_forward_hook(norm_hook(per_layer * len(layers))))
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()


def _batches(tokens: Tensor, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, tokens.shape[0], batch_size):
        yield tokens[start : start + batch_size]


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: its embedding's device (the CPU when accelerate offloads the embedding)."""
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


@torch.no_grad()
def lm_loss(model: nn.Module, tokens: Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy of `model` over `tokens` [N, S], weighted by token count."""
    device = input_device(model)
    total, count = 0.0, 0
    # Fewer sequences a forward when their logits would pass 2^28 elements (1 GiB in fp32): a paper-scale
    # sequence (8k tokens, 128k vocabulary) goes one at a time.
    batch_size = max(1, min(batch_size, 2**28 // (tokens.shape[1] * model.config.vocab_size)))
    for batch in _batches(tokens, batch_size):
        batch = batch.to(device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        n = batch.shape[0] * (batch.shape[1] - 1)
        total, count = total + float(loss) * n, count + n
    return total / count


@contextlib.contextmanager
def _without_layers(model: nn.Module, drop: set[int]) -> Iterator[None]:
    """Temporarily run the model with some decoder layers removed (restored on exit)."""
    decoder = _decoder(model)
    full = decoder.layers
    decoder.layers = nn.ModuleList([layer for i, layer in enumerate(full) if i not in drop])
    try:
        yield
    finally:
        decoder.layers = full


def block_losses(model: nn.Module, tokens: Tensor, k: int, batch_size: int = 8) -> Tensor:
    """[L - k + 1]: LM loss with each contiguous block of k layers dropped."""
    num_layers = len(_decoder(model).layers)
    out = []
    for start in range(num_layers - k + 1):
        with _without_layers(model, set(range(start, start + k))):
            out.append(lm_loss(model, tokens, batch_size))
    return torch.tensor(out)


@torch.no_grad()
def compute_importance(model: nn.Module, tokens: Tensor, settings: ImportanceSettings = ImportanceSettings()) -> Importances:
    """Score every head, neuron, channel and layer of `model` on calibration `tokens` [N, S].

    The model is run as it is (its dtype and devices: one, or spread over several and offloaded by accelerate's
    `device_map`); every reduction is done in fp32 on the device of the layer it scores.
    """
    family = family_of(model.config)
    was_training = model.training
    model.eval()
    device = input_device(model)
    try:
        with _hooks(model, family, settings) as acc:
            for batch in _batches(tokens, settings.batch_size):
                acc["batch"] = batch.shape[0]
                model(input_ids=batch.to(device), use_cache=False, logits_to_keep=1)  # the hooks need no logits
        base_loss, blocks = float("nan"), {}
        if settings.drop_samples > 0:
            drop_tokens = tokens[: settings.drop_samples]
            base_loss = lm_loss(model, drop_tokens, settings.batch_size)
            blocks = {k: block_losses(model, drop_tokens, k, settings.batch_size) for k in {1, *settings.block_sizes}}
    finally:
        model.train(was_training)
    norms = torch.stack([r.result() for r in acc["norms"]])
    parent = Architecture.of_config(model.config, family.unit_keys)
    return Importances(
        hidden=_magnitude(norms, settings.batch_agg).sum(0).cpu(),
        heads=_per_layer(acc["heads"], parent.num_attention_heads).cpu(),
        neurons=_magnitude(_per_layer(acc["neurons"], model.config.intermediate_size), settings.batch_agg).cpu(),
        layer_bi=(acc["bi_sum"] / max(acc["bi_tokens"], 1)).float(),
        block_loss=blocks,
        base_loss=base_loss,
        meta={"samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]), "settings": _settings_dict(settings)},
        **(_expert_scores(acc, model, family, settings) if family.moe else {}),
        **(_mixer_scores(acc, model.config, family, parent) if family.recurrent else {}),
    )


def _per_layer(running: list[_Running], width: int) -> Tensor:
    """[num_layers, width] from per-layer accumulators; zeros for the layers whose unit the hook never saw (a
    dense MLP's neurons in a sparse layer)."""
    return torch.stack([r.result() if r.n else torch.zeros(width) for r in running])


def _mixer_scores(acc: dict[str, Any], config: Any, family: Family, parent: Architecture) -> dict[str, Tensor]:
    """A hybrid's recurrent heads (and Mamba2's head channels), with zero rows for its other layers."""
    if family.mamba:
        return {"mixer_heads": _per_layer(acc["mixer_heads"], parent.get(family.mamba.heads_key)),
                "mixer_channels": _per_layer(acc["mixer_channels"], parent.get(family.mamba.head_dim_key))}
    return {"mixer_heads": _per_layer(acc["mixer_heads"], config.linear_num_value_heads)}


def _expert_scores(acc: dict[str, Any], model: nn.Module, family: Family, settings: ImportanceSettings) -> dict:
    """The experts' scores, their neurons' and the shared expert's, with zero rows for dense layers (and for an
    expert no calibration token reached)."""
    layers = _decoder(model).layers
    sparse = [i for i in range(len(layers)) if family.is_sparse(model.config, i)]
    experts = getattr(model.config, family.moe.count_key)
    width = getattr(model.config, family.moe.width_key)
    empty = {**{k: torch.zeros(experts, dtype=torch.float64) for k in EXPERT_SCORES},
             "neurons": torch.zeros(experts, width, dtype=torch.float64)}
    sums = [acc["experts"].get(i, empty) if i in sparse else empty for i in range(len(layers))]
    out: dict[str, Any] = {
        "experts": {k: torch.stack([s[k] for s in sums]).float() for k in EXPERT_SCORES},
        "expert_neurons": torch.stack([s["neurons"] for s in sums]).sqrt().float(),
    }
    if family.moe.shared_key:
        shared = _per_layer(acc["shared"], getattr(model.config, family.moe.shared_key))
        out["shared_neurons"] = _magnitude(shared, settings.batch_agg).cpu()
    return out


def _magnitude(scores: Tensor, batch_agg: str) -> Tensor:
    # Signed activations (pre-activations, norm outputs) averaged over samples can be negative;
    # rank by magnitude. l2 and var are already non-negative.
    return scores.abs() if batch_agg == "mean" else scores


def _settings_dict(settings: ImportanceSettings) -> dict[str, Any]:
    d = dict(settings.__dict__)
    d["block_sizes"] = list(settings.block_sizes)
    return d


def select_layers(importances: Importances, num_layers: int, method: str = "bi",
                  kinds: dict[str, tuple[int, ...]] | None = None,
                  counts: dict[str, int] | None = None) -> tuple[int, ...]:
    """Indices of the `num_layers` parent layers to keep.

    Methods: "bi" keeps the highest Block Importance; "drop" keeps the layers whose removal alone raises
    the loss most; "block" drops the contiguous block whose removal raises the loss least (2408.11796).
    With `counts` (kind -> layers to keep, over the parent's layers of each kind in `kinds`), each kind keeps its
    own best layers by "bi" or "drop", so that a hybrid keeps, say, every attention layer and drops recurrent ones.
    """
    total = importances.heads.shape[0]
    k = total - num_layers
    if k < 0:
        raise ValueError(f"num_hidden_layers={num_layers} exceeds the parent's {total} layers")
    if k == 0:
        return tuple(range(total))
    if counts and sum(counts.values()) != num_layers:
        raise ValueError(f"the layers kept of each kind {counts} do not add up to num_hidden_layers={num_layers}")
    if method == "block":
        if counts:
            raise ValueError("layer method 'block' drops one contiguous block of layers, which cannot keep a number of "
                             "each kind; use 'bi' or 'drop'")
        if k not in importances.block_loss:
            raise ValueError(f"no block losses for k={k} dropped layers; compute importance with block_sizes including {k}")
        start = int(importances.block_loss[k].argmin())
        return tuple(i for i in range(total) if not start <= i < start + k)
    if method == "bi":
        scores = importances.layer_bi
    elif method == "drop":
        if 1 not in importances.block_loss:
            raise ValueError("no loss-when-dropped scores; compute importance with drop_samples > 0")
        scores = importances.block_loss[1]
    else:
        raise ValueError(f"layer method {method!r}: must be one of {LAYER_METHODS}")
    if counts:
        kept = [kinds[kind][j] for kind, n in counts.items()
                for j in scores[list(kinds[kind])].topk(n).indices.tolist()]
        return tuple(sorted(kept))
    return tuple(sorted(scores.topk(num_layers).indices.tolist()))


def fingerprint_model(model: nn.Module) -> str:
    """A cheap, weight-dependent fingerprint: config plus per-tensor shape, dtype and sums."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in _state_tensors(model):
            stats = (float(p.double().sum()), float(p.double().abs().sum())) if p.is_floating_point() else (0.0, 0.0)
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{stats}".encode())
    return h.hexdigest()[:16]


def _state_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The state dict's (name, tensor) in its order, with the weights accelerate offloads loaded one module at a
    time."""
    for prefix, module in model.named_modules():
        with align_module_device(module):
            own = [*module.named_parameters(recurse=False),
                   *((n, b) for n, b in module.named_buffers(recurse=False)
                     if n not in module._non_persistent_buffers_set)]
            for name, tensor in own:
                if tensor is not None:
                    yield f"{prefix}.{name}" if prefix else name, tensor


def fingerprint_tokens(tokens) -> str:
    """Which tokens: a hash of a tensor's ids, or a `TokenSet`'s own key (its shards are not read)."""
    if hasattr(tokens, "fingerprint"):
        return tokens.fingerprint()
    return hashlib.sha256(tokens.cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def fingerprints(model: nn.Module, tokens: Tensor, settings: ImportanceSettings) -> dict[str, Any]:
    """What importance scores depend on, as their `meta` records it: the parent's weights, the tokens, the
    settings (what block scores are keyed by, found without computing the scores)."""
    return {"parent": fingerprint_model(model), "data": fingerprint_tokens(tokens), "settings": _settings_dict(settings)}


def cached_importance(model: nn.Module, tokens: Tensor, path: str | Path,
                      settings: ImportanceSettings = ImportanceSettings()) -> Importances:
    """Load scores from `path` when they were made from this parent, data and settings; else compute and save.

    A corrupt or mismatched file is recomputed (and replaced atomically), never trusted.
    """
    key = fingerprints(model, tokens, settings)
    path = Path(path)
    if path.exists():
        try:
            cached = Importances.load(path)
            if all(cached.meta.get(k) == v for k, v in key.items()):
                log.info("importance: reusing %s", path)
                return cached
            log.info("importance: %s was made from another parent, data or settings; recomputing", path)
        except Exception as e:  # a truncated or foreign file: recompute rather than fail
            log.warning("importance: %s is unreadable (%s); recomputing", path, e)
    result = compute_importance(model, tokens, settings)
    result = replace(result, meta={**result.meta, **key})
    path.parent.mkdir(parents=True, exist_ok=True)
    result.save(path)
    return result

