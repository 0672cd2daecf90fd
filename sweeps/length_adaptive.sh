#!/usr/bin/env bash
# Length-Adaptive Transformer on one task, the recipe measured in the README: fine-tune 1 epoch,
# fine-tune 2 more (the unpruned baseline the bar is measured against), LengthDrop sandwich
# training from that baseline, evolutionary search (front scored on the val split, re-scored
# on the report split) next to the constant-ratio curve; front.csv's `bench` column then measures
# each configuration's speed.
#
#   bash sweeps/length_adaptive.sh                          # MiniLM-L6 x rt_sentiment (offline, CPU, ~1 h)
#   ITERATIONS=30 MUTATIONS=30 CROSSOVERS=30 bash sweeps/length_adaptive.sh   # the paper's search size
#   LENGTH_DROP=0.2 LAYER_DROP=0.2 NUM_SANDWICH=2 bash sweeps/length_adaptive.sh   # the paper's training
#
# A killed search resumes from its cache when its tokenprune-search command is rerun with
# TOKENPRUNE_OUTPUTS=<this sweep's folder> (the cache lives there); the script itself always starts
# a new folder (sweeps/methods_table.sh is the one whose rerun does only what is missing).
set -euo pipefail
{  # read whole before anything runs: editing this file cannot change a sweep that is running it
LENGTH_DROP=${LENGTH_DROP:-0.35}
LAYER_DROP=${LAYER_DROP:-0}
NUM_SANDWICH=${NUM_SANDWICH:-4}
SANDWICH_EPOCHS=${SANDWICH_EPOCHS:-2}
SANDWICH_LR=${SANDWICH_LR:-5e-5}
ITERATIONS=${ITERATIONS:-16}
MUTATIONS=${MUTATIONS:-10}
CROSSOVERS=${CROSSOVERS:-10}
EXTRA=${EXTRA:-}
source "$(dirname "$0")/checks.sh"
need_number LENGTH_DROP 0 0.99
need_number LAYER_DROP 0 0.99
need_int NUM_SANDWICH 0
need_int SANDWICH_EPOCHS 1
need_number SANDWICH_LR 1e-9 1
need_int ITERATIONS 1
need_int MUTATIONS 0
need_int CROSSOVERS 0
export TOKENPRUNE_OUTPUTS=${TOKENPRUNE_OUTPUTS:-outputs}/length_adaptive/$(date +%Y-%m-%d_%H-%M-%S)
# every run of this sweep (train, search, bench, compare) in one W&B group
export TOKENPRUNE_GROUP=${TOKENPRUNE_GROUP:-length_adaptive-$(basename "$TOKENPRUNE_OUTPUTS")}
export WANDB_MODE=${WANDB_MODE:-offline}
root=$TOKENPRUNE_OUTPUTS
latest() { ls -t $1 | head -n 1; }

tokenprune-train run_name=finetune trainer.max_epochs=1 $EXTRA
tokenprune-train run_name=baseline module.init_from="$(latest "$root/train/finetune/*/checkpoints/last.ckpt")" \
  trainer.max_epochs=2 module.optimizer.lr=5e-5 $EXTRA
baseline=$(latest "$root/train/baseline/*/checkpoints/last.ckpt")

tokenprune-train run_name=lat pruner=length_adaptive module=length_adaptive module.init_from="$baseline" \
  trainer.max_epochs="$SANDWICH_EPOCHS" module.optimizer.lr="$SANDWICH_LR" module.length_drop="$LENGTH_DROP" \
  module.layer_drop="$LAYER_DROP" module.num_sandwich="$NUM_SANDWICH" $EXTRA
checkpoint=$(latest "$root/train/lat/*/checkpoints/last.ckpt")

tokenprune-search checkpoint="$checkpoint" search=evolution search.length_drop="$LENGTH_DROP" \
  search.iterations="$ITERATIONS" search.mutations="$MUTATIONS" search.crossovers="$CROSSOVERS" \
  'compare_constant_ratios=[0.35,0.4,0.45,0.5,0.55,0.6,0.65,0.7,0.75,0.8,0.85,0.9]'
front=$(latest "$root/search/evolution/*/front.csv")
echo "front: $front (its 'bench' column measures each configuration with tokenprune-bench)"
exit
}
