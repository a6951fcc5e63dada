"""`nas plan`: activation memory traced on the meta device equals a real run's, the shipped paper spaces fit the
cluster they name, a space that cannot fit gets the fix, and `nas search` refuses it before doing anything."""

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import ROOT, TINY_CONFIGS, tiny_space
from nas.cli import main
from nas.parents import parent_config
from nas.plan import Cluster, plan, saved_bytes, saved_bytes_per_layer
from nas.space import load_space, parse_space, space_config

PAPER_SPACES = ("llama-3.1-8b-to-4b", "nemotron-15b-to-4b", "nemotron-15b-to-8b")


def _real_saved_bytes(config, batch: int, seq_len: int) -> int:
    """Saved-for-backward bytes of one decoder layer run for real on the CPU (stock attention)."""
    one = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 1,
                                      **({"layer_types": config.layer_types[:1]} if getattr(config, "layer_types", None)
                                         else {})})
    model = AutoModelForCausalLM.from_config(one, dtype=torch.float32).train()
    x = torch.randn(batch, seq_len, config.hidden_size, requires_grad=True)
    positions = torch.arange(seq_len)[None].expand(batch, seq_len)
    rotary = model.model.rotary_emb(x, positions)
    return saved_bytes(model, lambda: model.model.layers[0](x, attention_mask=None, position_embeddings=rotary,
                                                            position_ids=positions))


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_traced_activations_equal_a_real_layers(family):
    config = TINY_CONFIGS[family]()
    assert saved_bytes_per_layer(config, 3, 24, torch.float32) == _real_saved_bytes(config, 3, 24)


def test_traced_activations_equal_a_real_layers_at_smollm2_size():
    config = parent_config("smollm2-135m")
    assert saved_bytes_per_layer(config, 2, 128, torch.float32) == _real_saved_bytes(config, 2, 128)


@pytest.mark.parametrize("name", PAPER_SPACES)
def test_shipped_paper_spaces_fit_the_cluster_they_are_sized_for(name, capsys):
    assert main(["plan", str(ROOT / "search_spaces" / f"{name}.yaml"), "--nodes", "1", "--gpus-per-node", "8",
                 "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert out.count(": fits") == 3 and "DOES NOT FIT" not in out


def test_a_plan_that_cannot_fit_names_the_fix_and_the_fix_fits(tmp_path, capsys):
    spec = yaml.safe_load((ROOT / "search_spaces" / "llama-3.1-8b-to-4b.yaml").read_text())
    spec["resources"] = {"cpus_per_trial": 8, "gpus_per_trial": 1, "max_concurrent": 8}  # one GPU a trial
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(spec))
    assert main(["plan", str(tmp_path / "one.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set resources.workers_per_trial >= " in err[0]
    workers = int(err[0].split(">= ")[1].split()[0])
    spec["resources"] |= {"workers_per_trial": workers, "gpus_per_worker": 1, "max_concurrent": 1}
    spec["full_retrain"]["workers"] = 8
    stages = plan(parse_space(spec), space_config(parse_space(spec)), Cluster(gpu_memory_gb=80, gpus_per_node=8))
    assert all(s.fits for s in stages), [s.fix for s in stages]
    # A parent that does not fit one GPU's memory is spread over as many as the fix says, and no fewer
    small = Cluster(gpu_memory_gb=24, gpus_per_node=8)
    fix = plan(parse_space(spec), space_config(parse_space(spec)), small)[0].fix
    assert fix.startswith("set resources.parent_gpus >= ")
    gpus = int(fix.split(">= ")[1].split()[0])
    for n, fits in ((gpus, True), (gpus - 1, False)):
        spec["resources"]["parent_gpus"] = n
        assert plan(parse_space(spec), space_config(parse_space(spec)), small)[0].fits is fits


def test_search_refuses_a_plan_that_cannot_fit_before_it_starts(tmp_path, tiny_tokenizer, capsys):
    spec = tiny_space(tmp_path / "inputs", tiny_tokenizer, name="huge", seq_len=2**21,
                      short_retrain={"tokens": 4 * 2**21}, full_retrain={"tokens": 4 * 2**21})
    (tmp_path / "huge.yaml").write_text(yaml.safe_dump(spec))
    assert main(["search", str(tmp_path / "huge.yaml"), "--root", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit: " in err[0] and "GiB of node memory" in err[0]
    assert not (tmp_path / "runs").exists()  # nothing was started
