import random

import pytest

from conftest import ALL_CONFIGS, TINY_CONFIGS, tiny_model
from nas.architecture import Architecture
from nas.errors import ArchitectureError, UnsupportedModelError
from nas.families import FAMILIES, family_of
from nas.importance import Importances
from nas.prune import prune


def _random_arch(config, rng: random.Random) -> Architecture:
    full = Architecture.of_config(config)
    kv = rng.choice([k for k in range(1, full.num_key_value_heads + 1) if full.num_key_value_heads % k == 0])
    per_group = rng.randint(1, full.queries_per_group)
    layers = sorted(rng.sample(range(full.num_hidden_layers), rng.randint(1, full.num_hidden_layers)))
    heads = kv * per_group
    # Stock LlamaConfig insists on hidden_size % num_attention_heads == 0, so draw multiples of heads.
    hidden = heads * rng.randint(1, full.hidden_size // heads)
    return full.replace(num_hidden_layers=len(layers), layers=tuple(layers), num_key_value_heads=kv,
                        num_attention_heads=heads, hidden_size=hidden,
                        intermediate_size=rng.randint(1, full.intermediate_size))


def _uniform_importances(config) -> Importances:
    import torch

    L, H, I = config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
    return Importances(torch.rand(config.hidden_size), torch.rand(L, H), torch.rand(L, I), torch.rand(L))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_parameter_count_matches_materialised_model(name):
    model = tiny_model(name)
    family = family_of(model.config)
    full = Architecture.of_config(model.config)
    assert family.num_parameters(model.config, full) == sum(p.numel() for p in model.parameters())
    rng = random.Random(name)
    importances = _uniform_importances(model.config)
    for _ in range(4):
        arch = _random_arch(model.config, rng)
        child = prune(model, importances, arch)
        assert family.num_parameters(model.config, arch) == sum(p.numel() for p in child.parameters()), arch


def test_every_family_has_a_tiny_model():
    assert {ALL_CONFIGS[n]().model_type for n in ALL_CONFIGS} == set(FAMILIES)


def test_json_round_trip_uses_hf_keys():
    arch = Architecture(2, 32, 4, 2, 8, 64, (0, 3))
    data = arch.to_dict()
    assert set(data) == {"num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                         "head_dim", "intermediate_size", "layers"}
    assert Architecture.from_dict(data) == arch
    assert arch.mlp_expansion == 2.0


_PER_LAYER = {"num_hidden_layers": 4, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
              "head_dim": 64, "intermediate_size": 1536, "layers": [0, 1, 2, 29],
              "per_layer_config": {"1": {"skip": ["attention"]}, "2": {"skip": ["mlp"]},
                                   "3": {"num_key_value_heads": 1, "intermediate_size": 1024}}}


def test_per_layer_json_is_the_uniform_json_plus_transformers_per_layer_config():
    arch = Architecture.from_dict(_PER_LAYER)
    assert [(s.num_key_value_heads, s.intermediate_size) for s in arch.layer_shapes] == \
        [(3, 1536), (0, 1536), (3, 0), (1, 1024)]
    assert not arch.layer_shape(1).attention and not arch.layer_shape(2).mlp
    assert arch.to_dict() == _PER_LAYER and Architecture.from_dict(arch.to_dict()) == arch
    uniform = Architecture.from_dict({k: v for k, v in _PER_LAYER.items() if k != "per_layer_config"})
    assert arch.short().startswith(uniform.short() + "-P") and arch.short() != uniform.short()
    # a table whose every layer takes the global widths is the uniform child, with its JSON and label
    same = Architecture.from_dict({**_PER_LAYER, "per_layer_config": {"0": {"num_key_value_heads": 3}}})
    assert same == uniform and same.to_dict() == uniform.to_dict() and same.short() == uniform.short()
    other = Architecture.from_dict({**_PER_LAYER, "per_layer_config": {"1": {"skip": ["mlp"]}}})
    assert other.short() != arch.short()


@pytest.mark.parametrize("table, match", [
    ({"4": {}}, r"per_layer_config.4: not a child layer index \(0 to 3\)"),
    ({"1": {"skip": "mlp"}}, r"per_layer_config.1.skip='mlp'"),
    ({"1": {"skip": ["moe"]}}, r"per_layer_config.1.skip"),
    ({"1": {"num_key_value_heads": 2}}, "must divide num_attention_heads=9"),
    ({"1": {"num_key_value_heads": -1}}, r"per_layer_config.1.num_key_value_heads=-1"),
    ({"1": {"hidden_size": 1}}, r"per_layer_config.1: a layer sets only"),
    ([1], "must map child layer indices"),
])
def test_invalid_per_layer_tables_name_the_layer_and_field(table, match):
    with pytest.raises(ArchitectureError, match=match):
        Architecture.from_dict({**_PER_LAYER, "per_layer_config": table})


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_attention_heads=5), "multiple of num_key_value_heads"),
    (dict(layers=(0,)), "layers has 1 entries"),
    (dict(layers=(3, 0)), "ascending"),
    (dict(hidden_size=0), "hidden_size=0"),
])
def test_invalid_architectures_name_the_field(kwargs, match):
    base = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=64, layers=(0, 3))
    with pytest.raises(ArchitectureError, match=match):
        Architecture(**{**base, **kwargs})


def test_child_wider_than_parent_is_rejected():
    config = TINY_CONFIGS["llama"]()
    arch = Architecture.of_config(config).replace(intermediate_size=config.intermediate_size + 1)
    with pytest.raises(ArchitectureError, match="intermediate_size=81 is larger than the parent's 80"):
        family_of(config).child_config(config, arch)


def test_unknown_family_lists_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="supported families: bamba, falcon_h1, gemma2, gemma3_text, "
                                                    "gpt_oss, granite, llama, "
                                                    "mistral, mixtral, nemotron, nemotron_h, olmo2, olmo3, olmoe, "
                                                    "phi3, qwen2, qwen2_moe, qwen3, qwen3_5_text, qwen3_moe, "
                                                    "qwen3_next, smollm3$"):
        family_of(GPT2Config())


def test_child_config_slices_per_layer_lists():
    config = TINY_CONFIGS["qwen2"]()
    config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    arch = Architecture.of_config(config).replace(num_hidden_layers=2, layers=(1, 2))
    child = family_of(config).child_config(config, arch)
    assert child.layer_types == ["sliding_attention", "full_attention"]
    assert child.head_dim == config.head_dim and child.num_hidden_layers == 2


def test_stock_config_rejection_is_one_clear_line():
    config = TINY_CONFIGS["llama"]()
    arch = Architecture.of_config(config).replace(hidden_size=41)
    with pytest.raises(ArchitectureError, match=r"^L4-H6-KV2-M80-E41: LlamaConfig rejects it: .*hidden size \(41\)"):
        family_of(config).child_config(config, arch)
