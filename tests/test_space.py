from pathlib import Path

import pytest
from transformers import AutoConfig

from conftest import ROOT
from nas.cli import main
from nas.errors import ConfigError
from nas.space import enumerate_candidates, infeasible_hint, load_space, parse_space

SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))

# Minitron (2407.14679) lists these 15 feasible 8B candidates: layers/heads/MLP/hidden.
PAPER_8B = {"32/32/12800/5120", "32/32/13824/4608", "32/48/11520/4608", "32/48/16384/4096", "31/32/12800/5120",
            "31/32/16128/4608", "31/48/13824/4608", "31/48/16384/4096", "30/32/12800/5120", "30/32/16128/4608",
            "30/48/13824/4608", "30/48/16384/4096", "29/32/12800/5120", "29/32/16128/4608", "29/48/13824/4608"}


def _config(space):
    data = dict(space.parent_config)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _key(row):
    return f"{row['num_hidden_layers']}/{row['num_attention_heads']}/{row['intermediate_size']}/{row['hidden_size']}"


def test_shipped_spaces_include_the_demo_and_the_papers():
    assert {p.name for p in SPACES} >= {"smollm2-135m-demo.yaml", "nemotron-15b-to-8b.yaml",
                                        "nemotron-15b-to-4b.yaml", "llama-3.1-8b-to-4b.yaml"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_loads_and_has_candidates(path):
    space = load_space(path)
    if space.parent_config:
        assert enumerate_candidates(space, _config(space))


def test_nemotron_8b_space_reproduces_the_papers_candidates():
    space = load_space(ROOT / "search_spaces" / "nemotron-15b-to-8b.yaml")
    assert {_key(r) for r in enumerate_candidates(space, _config(space))} == PAPER_8B


def test_a_plain_8b_plus_minus_5_percent_differs_as_the_readme_says():
    space = load_space(ROOT / "search_spaces" / "nemotron-15b-to-8b.yaml")
    plain = parse_space({**_raw(space), "budget": {"params": 8e9, "tolerance": 0.05}})
    ours = {_key(r) for r in enumerate_candidates(plain, _config(space))}
    assert PAPER_8B - ours == {"31/32/16128/4608", "32/32/12800/5120"}  # 8.43B and 8.49B: above 8.4B
    assert ours - PAPER_8B == {"29/48/16384/4096", "31/32/13824/4608", "31/48/11520/4608", "32/32/16384/4096",
                               "32/48/14336/4096"}


def _raw(space):
    import yaml

    return yaml.safe_load((ROOT / "search_spaces" / "nemotron-15b-to-8b.yaml").read_text())


def test_llama_space_holds_the_follow_up_papers_width_and_depth_models():
    space = load_space(ROOT / "search_spaces" / "llama-3.1-8b-to-4b.yaml")
    keys = {_key(r) for r in enumerate_candidates(space, _config(space))}
    assert {"32/32/9216/3072", "16/32/14336/4096"} <= keys


def test_loading_reports_every_error_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nparent: p\nbudget: {fraction: 1.5, tolerance: 0.1}\n"
                    "axes: {hidden_size: [64], colour: [1]}\nsearch: {sampler: random}\n")
    with pytest.raises(ConfigError) as e:
        load_space(path)
    message = str(e.value)
    # An unknown field does not hide the file's other problems.
    assert "3 problem(s)" in message and "axes.colour: unknown field" in message
    assert "budget.fraction=1.5: must be in (0, 1)" in message and "search.sampler='random'" in message
    path.write_text("name: x\nparent: p\nbudget: {fraction: 0.5}\naxes: {hidden_size: [64]}\ncolour: red\n")
    with pytest.raises(ConfigError, match=r"1 problem\(s\): space.colour: unknown field"):
        load_space(path)
    path.write_text("name: x\nparent: p\nbudget: {fraction: 1.5, tolerance: 0.1}\naxes: {hidden_size: [64]}\n"
                    "search: {sampler: random}\nshort_retrain: {tokens: 2}\n")
    with pytest.raises(ConfigError) as e:
        load_space(path)
    message = str(e.value)
    assert "3 problem(s)" in message and "budget.fraction=1.5: must be in (0, 1)" in message
    assert "search.sampler='random'" in message and "short_retrain.tokens=2: below one step" in message


def test_infeasible_budget_names_the_axis_to_widen():
    space = load_space(ROOT / "search_spaces" / "nemotron-15b-to-8b.yaml")
    tight = parse_space({**_raw(space), "budget": {"params": 3e9, "tolerance": 0.05}})
    hint = infeasible_hint(tight, _config(space))
    assert hint.startswith("no candidate within budget [2,850,000,000, 3,150,000,000] (total parameters): "
                           "the smallest has ") and hint.endswith("add smaller values to axes.mlp_expansion")


def test_candidates_cli_prints_a_table_or_one_error_line(capsys, tmp_path):
    assert main(["candidates", str(ROOT / "search_spaces" / "nemotron-15b-to-8b.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("15 feasible candidates") and "L32-H48-KV8-M16384-E4096" in out
    raw = Path(ROOT / "search_spaces" / "nemotron-15b-to-8b.yaml").read_text()
    (tmp_path / "big.yaml").write_text(raw.replace("params: 8.18e9", "params: 20e9"))
    assert main(["candidates", str(tmp_path / "big.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "add larger values to axes." in err[0]


def test_several_workers_need_a_shared_folder_not_a_uri(tmp_path, tiny_tokenizer):
    from conftest import tiny_space
    from nas.search import run_search

    space = parse_space(tiny_space(tmp_path, tiny_tokenizer, resources={"workers_per_trial": 2},
                                   storage=f"sqlite:///{tmp_path}/study.db"))
    with pytest.raises(ConfigError, match="need a run folder on a filesystem every node mounts, not a URI"):
        run_search(space, f"file://{tmp_path}/runs")
    with pytest.raises(ConfigError, match="short_retrain.batch_size=4: must be a multiple of the 3 workers"):
        parse_space(tiny_space(tmp_path, tiny_tokenizer, resources={"workers_per_trial": 3}))
