"""Speed measured in a serving engine (`budget.engine: vllm` or `llama.cpp`; `hf`, the default, is `nas.latency`'s
own HF `generate` timing).

The timed model is the one `nas.latency.timed_model` builds (random weights at the candidate's exact shape, in the
serving dtype), saved to a temporary folder and exported with nas's own exporters (`nas.exports`): llama.cpp runs
its `--format gguf` file, vLLM a per-layer child's `--format decilm` folder and a uniform child's stock HF folder.
A small script then times it inside the engine's own venv (`nas.engines.run_script`; the engine's start-up and the
model's load are not timed), with the HF timing's semantics: `batch` copies of one random prompt of `context`
tokens, `warmup` untimed runs, then `repeats` timed ones, each figure the median with its (min, max) spread:
- llama.cpp: prefill_ms from the call to the first token, latency_ms the mean of the next `decode_tokens` tokens,
  clocked at each token within one greedy decode (the prompt evaluated afresh each run: no prefix reuse); its
  own perf counters (`llama_perf_context`) of the last run are kept beside them (`engine_counters`);
- vLLM (its offline `LLM`, one process, eager, prefix caching off): the `generate` API returns only when a request
  is done, so prefill_ms is a 1-token request's time and latency_ms the difference to a (1 + decode_tokens)-token
  request's, over decode_tokens (paired run by run).
What the engines cannot honour is refused before anything runs (`nas.space`, `engine_problem`): llama.cpp's
bindings decode one sequence (batch 1), and the engines built here are CPU builds (device cpu).
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

#: What `budget.engine` may name: transformers' generate (`nas.latency`), and the two engines of `nas.engines`.
ENGINES = ("hf", "vllm", "llama.cpp")
#: The head sizes vLLM's CPU attention runs (`CPUAttentionBackend.get_supported_head_sizes`, vLLM 0.32): another
#: fails at its first forward.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

_VLLM_TIMED = """
import json, sys, time

def main():
    job = json.load(open(sys.argv[1]))
    import torch
    torch.set_num_threads(job["threads"])  # before vLLM's CPU worker, which then keeps torch's count as it is
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["model"], dtype=job["dtype"], seed=0, max_model_len=job["max_len"], enforce_eager=True,
              max_num_seqs=len(job["prompts"]), distributed_executor_backend="uni",
              trust_remote_code=job["trust_remote_code"],
              enable_prefix_caching=False, skip_tokenizer_init=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]

    def timed(n):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return 1000 * (time.perf_counter() - start)

    for _ in range(job["warmup"]):
        timed(job["max_tokens"])
    runs = []
    for _ in range(job["repeats"]):
        first = timed(1)
        runs.append([first, (timed(job["max_tokens"]) - first) / (job["max_tokens"] - 1)])
    json.dump({"runs": runs}, open(sys.argv[2], "w"))

if __name__ == "__main__":  # where vLLM does spawn a process, it imports this file again
    main()
"""

_LLAMA_TIMED = """
import json, sys, time
import llama_cpp
from llama_cpp import Llama

job = json.load(open(sys.argv[1]))
llm = Llama(model_path=job["model"], n_ctx=job["max_len"], n_batch=job["max_len"], n_threads=job["threads"],
            n_threads_batch=job["threads"], seed=0, verbose=False)
prompt = job["prompts"][0]

def run():
    llm.reset()  # the bindings would reuse the cached prompt; a fresh request evaluates it whole
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    stamps = []
    start = time.perf_counter()
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == job["max_tokens"]:
            break
    return [1000 * (stamps[0] - start), 1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1)]

for _ in range(job["warmup"]):
    run()
runs = [run() for _ in range(job["repeats"])]
perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
counters = {"prompt_eval_ms": perf.t_p_eval_ms, "prompt_tokens": perf.n_p_eval, "eval_ms": perf.t_eval_ms,
            "eval_tokens": perf.n_eval}
json.dump({"runs": runs, "counters": counters}, open(sys.argv[2], "w"))
"""


def engine_figures(engine: str, model: str | Path, prompts: list[list[int]], decode_tokens: int, warmup: int = 1,
                   repeats: int = 5, threads: int = 1, dtype: str = "float32", timeout: float = 900
                   ) -> dict[str, Any]:
    """prefill_ms and latency_ms (ms a decoded token), each the median of `repeats` runs with its spread, of the
    exported `model` (vLLM: a folder; llama.cpp: a .gguf file) in `engine`, decoding `decode_tokens` tokens after
    the token-id `prompts` (one a sequence of the batch; llama.cpp takes one), as the module's docstring says."""
    from nas.engines import ENGINES as RUNNERS, run_script
    from nas.exports.decilm import CONFIG_MODULE

    script = {"vllm": _VLLM_TIMED, "llama.cpp": _LLAMA_TIMED}[engine]
    job = dict(model=str(Path(model).resolve()), prompts=prompts, max_tokens=1 + decode_tokens, warmup=warmup,
               repeats=repeats, threads=threads, dtype=dtype, max_len=max(map(len, prompts)) + decode_tokens + 8,
               # The only remote code vLLM may run: the configuration module of nas's own `--format decilm` folder.
               trust_remote_code=(Path(model) / f"{CONFIG_MODULE}.py").is_file())
    done = run_script(engine, script, job, timeout, model, env={"OMP_NUM_THREADS": str(threads)})
    prefill, decode = map(list, zip(*done["runs"]))
    out = {"prefill_ms": statistics.median(prefill), "prefill_ms_spread": [min(prefill), max(prefill)],
           "latency_ms": statistics.median(decode), "latency_ms_spread": [min(decode), max(decode)],
           "engine": RUNNERS[engine][0]}
    if "counters" in done:
        out["engine_counters"] = done["counters"]
    return out


def exported(engine: str, child: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """The saved HF child folder `child` written under `out` as `engine` loads it (see the module's docstring):
    the path to give `engine_figures`."""
    from nas.exports import Child, export

    if engine == "llama.cpp":
        return export(child, out, "gguf", dtype) / "model.gguf"
    return export(child, out, "hf" if Child.read(child).arch.is_uniform else "decilm", dtype)


def measure_in_engine(config: dict[str, Any], settings) -> dict[str, Any]:
    """`nas.latency.measure`'s figures for `settings.engine`: the random model of `config` (a child's config as a
    dict) exported and timed in that engine."""
    import torch

    from nas.latency import device_name, machine, timed_model

    with tempfile.TemporaryDirectory(prefix="nas-timed-") as tmp:
        folder = Path(tmp) / "hf"
        model = timed_model(config, settings)
        model.save_pretrained(folder)
        _timing_tokenizer(model.config.vocab_size).save(str(folder / "tokenizer.json"))
        prompt = torch.randint(0, model.config.vocab_size, (settings.context,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        del model
        path = exported(settings.engine, folder, Path(tmp) / "engine", settings.dtype)
        figures = engine_figures(settings.engine, path, [prompt] * settings.batch, settings.decode_tokens,
                                 settings.warmup, settings.repeats, settings.threads, settings.dtype)
    return {**figures, "throughput": settings.batch * 1000 / figures["latency_ms"],
            "device_name": f"{figures['engine']} on {device_name(torch.device('cpu'), settings.threads)}",
            "machine": machine(settings.device, settings.engine), "settings": asdict(settings)}


def _timing_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer over the first byte symbols and one merge (llama.cpp refuses a vocabulary
    without merges), within `vocab_size` ids: what the GGUF writer needs to read. The timed model is fed token ids,
    so its tokenizer never runs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[:vocab_size - 1]
    vocab = {c: i for i, c in enumerate([*alphabet, alphabet[0] + alphabet[1]])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(alphabet[0], alphabet[1])]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def engine_problem(space, config: Any) -> str | None:
    """Why the space's `budget.engine` cannot time its candidates (one line naming the engine and the fix), or None:
    the engine absent, or the parent's family or the per-layer layouts the space allows not exportable to it. Cheap
    (the parent's config only), so a search checks it before any work."""
    from nas.architecture import LayerShape
    from nas.engines import absent_reason, engine_python
    from nas.errors import ConfigError
    from nas.exports import check
    from nas.families import Parent

    engine, budget = space.budget.engine, space.budget
    if engine == "hf" or not (budget.speed_caps or set(space.search.objectives) & {"latency_ms", "prefill_ms",
                                                                                   "throughput"}):
        return None
    if engine_python(engine) is None:
        return f"budget.engine={engine}: {absent_reason(engine)}; or time in HF generate (budget.engine: hf)"
    arch = Parent.of(config).architecture
    per_layer = space.per_layer
    if per_layer is not None and arch.num_hidden_layers > 1:
        full = arch.uniform_shape  # any layer differing from the others makes the export per-layer
        arch = arch.replace(per_layer=(full, LayerShape(full.num_key_value_heads, full.intermediate_size - 1),
                                       *[full] * (arch.num_hidden_layers - 2)))
    if engine == "vllm" and arch.head_dim not in VLLM_CPU_HEAD_SIZES:
        return (f"budget.engine=vllm: head_dim={arch.head_dim}: vLLM's CPU attention runs head sizes "
                f"{', '.join(map(str, VLLM_CPU_HEAD_SIZES))} only; use budget.engine: llama.cpp or hf")
    fmt = "gguf" if engine == "llama.cpp" else "hf" if arch.is_uniform else "decilm"
    try:
        check(config.to_dict(), arch, fmt)
    except ConfigError as e:
        return f"budget.engine={engine}: {e}; or time in HF generate (budget.engine: hf)"
    if per_layer is not None and per_layer.skip_attention:
        return (f"budget.engine={engine}: per_layer.skip_attention lets the program drop layer 0's attention, and "
                f"neither vLLM nor llama.cpp runs a first layer without one; set skip_attention: false or time in "
                f"HF generate (budget.engine: hf)")
    if per_layer is not None and per_layer.skip_mlp and engine == "llama.cpp":
        return ("budget.engine=llama.cpp: per_layer.skip_mlp gives layers that keep attention without an MLP, whose "
                "attention residual llama.cpp's deci graph skips; set skip_mlp: false or use budget.engine: vllm")
    return None
