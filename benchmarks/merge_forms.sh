#!/usr/bin/env bash
# Issue 12: KVMerger's value rules (|S|-scaled, weighted mean, +log|S| bias) and Elastic Cache's merge forms
# (faithful, +log n, value-only) on the embedded SmolLM2, 2000-token Austen contexts, budgets 0.1 / 0.2 / 0.5,
# with H2O and the full cache as references; then docs/results/merge-forms.md. One `kvpolicy bench` at a time
# (each took 2 to 17 minutes on 2 cores shared with other jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
ARGS="--budgets 0.1 0.2 0.5 --contexts 2000 --samples 1 --continuation 32 --span 48 --cue 8 --gen-tokens 16 --depths 0.5 --threads 1 --no-plots"
C=benchmarks/configs
EXACT="$C/kvmerger-exact-scaled.yaml $C/kvmerger-exact-mean.yaml $C/kvmerger-exact-bias.yaml"
ELASTIC="elastic-cache elastic-cache-mass elastic-cache-vonly"
kvpolicy bench --policies $EXACT --seed 0 $ARGS --out bench-results/i12-kvmerger-exact-s0
kvpolicy bench --policies $ELASTIC h2o --seed 0 $ARGS --out bench-results/i12-elastic-s0
for seed in 1 2; do
  kvpolicy bench --policies $EXACT h2o --seed $seed $ARGS --out bench-results/i12-kvmerger-exact-s$seed
  kvpolicy bench --policies $ELASTIC --seed $seed $ARGS --out bench-results/i12-elastic-s$seed
done
kvpolicy bench --policies kvmerger $C/kvmerger-capped-scaled.yaml --seed 0 $ARGS --out bench-results/i12-kvmerger-presets-s0
kvpolicy bench --policies $C/elastic-cache-vonly-nobias.yaml --seed 0 $ARGS --out bench-results/i12-elastic-nobias-s0
kvpolicy bench --policies $C/elastic-cache-nomerge.yaml --seed 0 $ARGS --out bench-results/i12-elastic-nomerge-s0
python benchmarks/results_page.py --ours bench-results/i12-kvmerger-exact-s{0,1,2} bench-results/i12-elastic-s{0,1,2} \
    bench-results/i12-kvmerger-presets-s0 bench-results/i12-elastic-nobias-s0 bench-results/i12-elastic-nomerge-s0 \
    --out docs/results --page merge-forms.md --plot-prefix merge-forms_ \
    --title "Results: KVMerger value rules and Elastic Cache merge forms (issue 12)" \
    --load-note "one benchmark process at a time on a machine shared with other jobs (load average 5 to 9): timings are indicative only" \
    --commands benchmarks/merge_forms.sh --notes benchmarks/merge_forms_notes.md
