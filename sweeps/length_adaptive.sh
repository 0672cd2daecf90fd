#!/usr/bin/env bash
# Length-Adaptive Transformer on one task: fine-tune, LengthDrop sandwich training, evolutionary
# search (front scored on the search split, re-scored on the report split) next to the
# constant-ratio curve, then the measured speed of the front's configurations.
#
#   bash sweeps/length_adaptive.sh                          # MiniLM-L6 x rt_sentiment (offline, CPU)
#   ITERATIONS=30 MUTATIONS=30 CROSSOVERS=30 bash sweeps/length_adaptive.sh   # the paper's search size
#
# Killing the search and rerunning this script's last step resumes it from its cache.
set -euo pipefail
ITERATIONS=${ITERATIONS:-15}
MUTATIONS=${MUTATIONS:-8}
CROSSOVERS=${CROSSOVERS:-8}
EXTRA=${EXTRA:-}
export TOKENPRUNE_OUTPUTS=${TOKENPRUNE_OUTPUTS:-outputs}/length_adaptive/$(date +%Y-%m-%d_%H-%M-%S)
export WANDB_MODE=${WANDB_MODE:-offline}
root=$TOKENPRUNE_OUTPUTS
latest() { ls -t $1 | head -n 1; }

tokenprune-train experiment=length_adaptive run_name=lat $EXTRA
checkpoint=$(latest "$root/train/lat/*/length_adaptive/checkpoints/last.ckpt")

tokenprune-search checkpoint="$checkpoint" search=evolution search.iterations="$ITERATIONS" \
  search.mutations="$MUTATIONS" search.crossovers="$CROSSOVERS" \
  'compare_constant_ratios=[0.5,0.6,0.7,0.75,0.8,0.85,0.9,0.95]'
front=$(latest "$root/search/evolution/*/front.csv")
echo "front: $front (its 'bench' column measures each configuration with tokenprune-bench)"
