#!/usr/bin/env bash
# Create the peer environment for benchmarks/kvpress_peer.py and run it.
#
# kvpress pins an older transformers (< 5.3) than kvpolicy, so it lives in its own virtualenv.
# torch comes from the CPU wheel pinned below (never a bare `torch`, which could pull a CUDA build).
#
#   bash benchmarks/kvpress_env.sh                      # create .venv-kvpress (once) and run the default peer benchmark
#   bash benchmarks/kvpress_env.sh --setup-only         # only create the environment
#   bash benchmarks/kvpress_env.sh --out bench-results/peer --budgets 0.2 --presses snapkv kvzip
#
# Samples: exported by kvpolicy (same seeds and sizes as `kvpolicy bench`) into $KVPRESS_SAMPLES, from
# SAMPLE_ARGS (default: 2000-token contexts, 1 sample, the sizes of docs/results/index.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVPRESS_VENV:-.venv-kvpress}
TORCH=${KVPRESS_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import kvpress" 2>/dev/null; then
    python -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "$TORCH"
    # kvpress brings the transformers version it pins (< 5.3); gguf for the tokenizer conversion helpers
    "$VENV/bin/pip" install -q kvpress gguf "$TORCH"
fi
"$VENV/bin/python" -c "import kvpress, transformers, torch; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '?', 'transformers', transformers.__version__, 'torch', torch.__version__)"
if [ "${1:-}" = "--setup-only" ]; then
    exit 0
fi
SAMPLES=${KVPRESS_SAMPLES:-bench-results/samples.json}
SAMPLE_ARGS=${SAMPLE_ARGS:---contexts 2000 --samples 1 --continuation 32 --span 48 --cue 8 --gen-tokens 16 --depths 0.5}
python -m kvpolicy.bench.tasks --out "$SAMPLES" $SAMPLE_ARGS
exec "$VENV/bin/python" benchmarks/kvpress_peer.py --samples-file "$SAMPLES" "$@"
