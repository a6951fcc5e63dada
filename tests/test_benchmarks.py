"""`nas-bench`: the benchmarks in their own package, one module each, all listed and reachable by name (the
benchmarks themselves are measurements, not tests)."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest
import torch

import benchmarks
from benchmarks.cli import main

ROOT = Path(__file__).resolve().parents[1]
NOT_BENCHMARKS = {"cli", "common", "__main__"}


def test_bare_nas_bench_lists_every_benchmark_module(capsys):
    """Against the package's folder: each module there is listed under its command name and has `run`."""
    modules = {m.name for m in pkgutil.iter_modules(benchmarks.__path__)} - NOT_BENCHMARKS
    assert len(modules) >= 13
    assert main([]) == 2
    listing = capsys.readouterr().err.split("benchmarks:\n", 1)[1]
    listed = {line.split()[0] for line in listing.splitlines() if not line.startswith("   ")}
    assert listed == {m.replace("_", "-") for m in modules}
    for name in modules:
        assert callable(importlib.import_module(f"benchmarks.{name}").run)


def test_entry_point_is_the_benchmarks_cli():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["nas-bench"].split(":")
    assert getattr(importlib.import_module(module), func) is main


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures the GPU here instead of refusing")
def test_gpu_benchmark_without_cuda_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["gpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nas-bench gpu: no CUDA device")
    assert not out.exists()  # nothing measured, nothing written


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", None)])
def test_gpu_peak_by_device_name(name, peak):
    """NVIDIA's dense bf16 figures (data sheets: the sparse figure halved); an H100 PCIe is not an SXM part."""
    from benchmarks.gpu import peak_bf16_tflops

    assert peak_bf16_tflops(name) == peak
