"""Measured speed of a candidate on the device it will serve on (`budget.latency_ms`, `prefill_ms`, `throughput`).

A candidate is measured before anything is trained, on a randomly initialised model of its exact shape (its
config; a per-layer child's layers each at their own widths, attention-free and MLP-free ones without those
blocks, as nas's loader builds them) in the serving dtype: speed does not depend on the weights' values. The model runs HF `generate` with a
static cache and SDPA attention, `batch` sequences after a prefill of `context` tokens, and a logits processor
notes the time at each generated token (after a device synchronisation), within the one `generate` call:
- prefill_ms: from the call to the first token (the prompt's forward, with the static cache's allocation);
- latency_ms: the time of each of the next `decode_tokens` tokens (their mean within a run);
- throughput: decoded tokens a second over the batch, batch x 1000 / latency_ms.
Each is the median of `repeats` timed runs after `warmup` untimed ones (at least one: on CUDA transformers
compiles the decoding step on first use), with the spread (min, max) beside it. On a CPU the model runs with
`threads` threads (a trial's CPUs), which are part of the cached figure's key.

Measurements run as Ray tasks on one node with the device (`budget.device`; a GPU type is a Ray resource label,
`budget.device_resource`): the driver's own node where it has what a timing needs, else the first such node by
id, so that the figures of one search compare. They are cached by (shape, settings, machine) in the run folder's
`latency/`, the machine being what a figure depends on beside them (`machine`): a figure from another machine is
never reused.

`budget.engine` names what runs the model: `hf` (the default) is the above; `vllm` and `llama.cpp` time the same
random model exported to that engine and run in its own venv (`nas.engine_latency`), the engine and its version
then part of the settings and the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from nas.errors import ConfigError


@dataclass(frozen=True)
class SpeedSettings:
    """How a candidate is timed (from the space's `budget`)."""

    device: str = "cpu"
    dtype: str = "float32"
    context: int = 4096
    batch: int = 1
    decode_tokens: int = 16
    warmup: int = 1
    repeats: int = 5
    device_resource: str | None = None
    threads: int = 1
    engine: str = "hf"  # what runs the model: HF generate here, or an engine (`nas.engine_latency`)

    def keyed(self) -> dict[str, Any]:
        """These settings as cache keys hold them: without the engine where it is HF's, so that the figures timed
        before there was a choice of engine keep their keys."""
        out = asdict(self)
        if self.engine == "hf":
            del out["engine"]
        return out

    def key(self, config: dict[str, Any], machine: str) -> str:
        """The cache key: the child's shape (its config, without bookkeeping entries), these settings and the
        `machine` that times it."""
        shape = {k: v for k, v in config.items() if k not in ("transformers_version", "architectures", "dtype",
                                                             "torch_dtype", "_name_or_path")}
        text = json.dumps({"shape": shape, "settings": self.keyed(), "machine": machine}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def device_name(device: torch.device, threads: int | None = None) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x {threads or torch.get_num_threads()} threads"


def machine(device: str, engine: str = "hf") -> str:
    """What a timing on `device` depends on beside the shape and settings: the GPU's model (and CUDA's version),
    or the CPU's model and core count, and the versions of torch and transformers, which run the model (and
    build an engine's export), and of the engine that runs it where it is not HF's."""
    import transformers

    if device == "cuda":
        hardware = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        hardware = f"{_cpu_model()} x {os.cpu_count()} cores"
    out = f"{hardware}; torch {torch.__version__}; transformers {transformers.__version__}"
    if engine != "hf":
        from nas.engines import engine_version

        out += f"; {engine_version(engine)}"
    return out


def _cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what `platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(config: dict[str, Any], settings: SpeedSettings) -> dict[str, Any]:
    """Time a random model of `config` (a child's config as a dict) as the module's docstring says, or in the
    engine the settings name (`nas.engine_latency`)."""
    if settings.engine != "hf":
        from nas.engine_latency import measure_in_engine

        return measure_in_engine(config, settings)
    threads = torch.get_num_threads()
    if settings.device == "cpu":
        torch.set_num_threads(settings.threads)
    try:
        return _timed(config, settings)
    finally:  # the caller's own thread count (a search times in its driver when Ray is not up)
        torch.set_num_threads(threads)


def timed_model(config: dict[str, Any], settings: SpeedSettings) -> torch.nn.Module:
    """The random model a candidate is timed as: its exact shape (a per-layer child's layers at their own widths,
    built by nas's loader), in the serving dtype, on the device, with SDPA attention where the family's attention
    runs in it (transformers refuses it for Gemma 2's logit softcap, which then runs its default, eager)."""
    from transformers import AutoConfig

    from nas.loader import build

    data = dict(config)
    child = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    with torch.device(settings.device):
        try:
            return build(child, dtype=getattr(torch, settings.dtype), attn_implementation="sdpa").eval()
        except ValueError:
            torch.manual_seed(0)
            return build(child, dtype=getattr(torch, settings.dtype)).eval()


@torch.no_grad()
def _timed(config: dict[str, Any], settings: SpeedSettings) -> dict[str, Any]:
    from transformers import LogitsProcessorList

    device = torch.device(settings.device)
    model = timed_model(config, settings)
    prompt = torch.randint(0, model.config.vocab_size, (settings.batch, settings.context), device=device,
                           generator=torch.Generator(device).manual_seed(0))

    def run() -> tuple[float, float]:
        """(prefill ms, mean ms of a decoded token) of one generate call."""
        stamps: list[float] = []

        def clock(_input_ids, scores):  # called once a token, when its logits are ready
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())
            return scores

        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1 + settings.decode_tokens,
                       min_new_tokens=1 + settings.decode_tokens, do_sample=False, cache_implementation="static",
                       pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        return (stamps[0] - start) * 1000, (stamps[-1] - stamps[0]) * 1000 / settings.decode_tokens

    for _ in range(settings.warmup):
        run()
    prefill, decode = map(list, zip(*(run() for _ in range(settings.repeats))))
    latency = statistics.median(decode)
    return {"prefill_ms": statistics.median(prefill), "prefill_ms_spread": [min(prefill), max(prefill)],
            "latency_ms": latency, "latency_ms_spread": [min(decode), max(decode)],
            "throughput": settings.batch * 1000 / latency,
            "device_name": device_name(device), "machine": machine(settings.device), "settings": asdict(settings)}


def over_cap(figures: dict[str, Any], caps: dict[str, float | None]) -> str | None:
    """Why measured `figures` break a cap (latency and prefill are maxima, throughput a minimum), or None."""
    for cap, value in caps.items():
        if value is None:
            continue
        got = figures[cap]
        if (got < value) if cap == "throughput" else (got > value):
            unit = "tokens/s" if cap == "throughput" else "ms"
            side = "below" if cap == "throughput" else "above"
            return f"{cap} {got:.3g} {unit} on {figures['device_name']}, {side} budget.{cap}={value:g}"
    return None


def settings_of(budget, threads: int = 1) -> SpeedSettings:
    """The timing settings of a space's `budget`, on `threads` CPU threads."""
    dtype = budget.serve_dtype or ("bfloat16" if budget.device == "cuda" else "float32")
    return SpeedSettings(budget.device, dtype, budget.context, budget.batch, budget.decode_tokens, budget.warmup,
                         budget.repeats, budget.device_resource, threads, budget.engine)


def timer(space) -> tuple[SpeedSettings, str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """(the settings the space's budget times at, the machine that times, a function timing a child's config dict
    there): a Ray task on one node with the budget's device when Ray is up (`_timing_node`), else this process. On
    a CPU the thread count is part of the figure: a trial's CPUs, here and in a task alike."""
    import ray

    budget = space.budget
    cpus = 1 if budget.device == "cuda" else space.resources.cpus_per_trial
    settings = settings_of(budget, cpus)
    if not ray.is_initialized():
        return settings, machine(settings.device, settings.engine), lambda data: measure(data, settings)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    needs = {"GPU": 1} if budget.device == "cuda" else {"CPU": cpus}
    resources = {budget.device_resource: 0.001} if budget.device_resource else {}
    node = _timing_node({**needs, **resources})
    if node is None:  # Ray would keep the task pending for ever
        raise ConfigError(f"budget.device={budget.device}"
                          f"{f', budget.device_resource={budget.device_resource}' if resources else ''}: no "
                          f"node of the Ray cluster has {', '.join(f'{k} {v:g}' for k, v in needs.items())}"
                          f"{f' and {budget.device_resource}' if resources else ''} to measure on; add such a node "
                          f"or change the budget")
    options = dict(num_cpus=cpus, num_gpus=1 if budget.device == "cuda" else 0, resources=resources,
                   scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    # On CUDA a fresh worker each (max_calls=1): no compiled step or CUDA graph of one candidate stays for the next.
    # A CPU timing leaves neither (transformers compiles the step on CUDA only), so its workers are reused: a fresh
    # one costs seconds of imports a candidate, per-layer block scores time dozens.
    task = ray.remote(max_calls=1 if settings.device == "cuda" else 0)(measure).options(**options)
    where = ray.get(ray.remote(machine).options(**options).remote(settings.device, settings.engine))
    return settings, where, lambda data: ray.get(task.remote(data, settings))


def cached_measure(storage, settings: SpeedSettings, where: str, data: dict[str, Any],
                   timing: Callable[[dict[str, Any]], dict[str, Any]], label: str) -> tuple[dict[str, Any], bool]:
    """(the figures of the model of config `data`, whether they were measured now): read from the run folder
    `storage`'s latency/ where that shape was timed with these settings on this machine, else timed and kept."""
    rel = f"latency/{settings.key(data, where)}.json"
    if (figures := storage.read_json(rel)) is not None:
        return figures, False
    figures = timing(data)
    storage.write_json(rel, {"label": label, **figures})
    return figures, True


def measure_candidates(space, config, rows: list[dict[str, Any]], storage, echo=lambda line: None
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the rows within the space's speed caps, the rows outside them with their `infeasible` reason), each row
    with its measured figures. Each candidate is measured once per (shape, settings, machine), kept in the run
    folder `storage` under latency/; as Ray tasks on one node with the budget's device when Ray is up (`timer`),
    one at a time so that no two timings share a machine, else in this process. A candidate is timed with the
    layers its memory figure counts (`Parent.served`): the worst case of those it may keep."""
    from nas.families import Parent
    from nas.space import architecture_of

    budget = space.budget
    parent = Parent.of(config)
    shapes = {r["label"]: parent.child_config(parent.served(architecture_of(r, config), budget.context))
              for r in rows}
    settings, where, timing = timer(space)
    within, outside = [], []
    for n, row in enumerate(rows, 1):
        figures, fresh = cached_measure(storage, settings, where, shapes[row["label"]].to_dict(), timing,
                                        row["label"])
        if fresh:
            echo(f"[measured {n}/{len(rows)}] {row['label']}: {figures['latency_ms']:.3g} ms/token, prefill "
                 f"{figures['prefill_ms']:.3g} ms on {figures['device_name']}")
        measured = {**row, **{k: figures[k] for k in ("latency_ms", "prefill_ms", "throughput")},
                    "device_name": figures["device_name"]}
        problem = over_cap(figures, budget.speed_caps)
        (outside if problem else within).append({**measured, "infeasible": problem} if problem else measured)
    return within, outside


def _timing_node(needs: dict[str, float]) -> str | None:
    """The id of the node every timing of a search runs on, so that its figures compare: the driver's own where it
    has the resources a timing `needs`, else the first such node by id; None where no live node has them."""
    import ray

    able = sorted(node["NodeID"] for node in ray.nodes()
                  if node["Alive"] and all(node["Resources"].get(k, 0) >= v for k, v in needs.items()))
    here = ray.get_runtime_context().get_node_id()
    return here if here in able else next(iter(able), None)
