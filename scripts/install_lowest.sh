#!/usr/bin/env bash
# A second environment with the lowest transformers that kvpolicy supports (the lower bound pyproject.toml declares),
# for CI's second test run. It is a venv over the main environment (run scripts/install.sh first): kvpolicy, torch
# and the test tools come from there, only transformers and what that release pins differ.
# Usage: bash scripts/install_lowest.sh [VENV]   (default .venv-lowest; then VENV/bin/python -m pytest ...)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-lowest}"
lowest=$(python - <<'PY'
import tomllib

from packaging.requirements import Requirement

deps = [Requirement(d) for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]]
spec = next(r.specifier for r in deps if r.name == "transformers")
print(next(s.version for s in spec if s.operator == ">="))
PY
)
python -m venv --clear --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q "transformers==$lowest"
"$venv/bin/python" -c "import kvpolicy, transformers; print('lowest transformers:', transformers.__version__)"
