#!/usr/bin/env bash
# Token and Head Adaptive Transformer against its parts on one task: from the same fine-tuned start
# and the same training budget, sandwich training that prunes tokens only (Length-Adaptive), heads
# only, and both (THAT); the same evolutionary search over each; one table of the three fronts
# re-scored on the report split (best accuracy within 0.3/0.4/0.5/0.6x FLOPs) and one plot.
#
#   bash sweeps/token_head_adaptive.sh                       # MiniLM-L6 x rt_sentiment (offline, CPU)
#   START=outputs/train/.../checkpoints/last.ckpt bash sweeps/token_head_adaptive.sh   # skip fine-tuning
#   ITERATIONS=30 MUTATIONS=30 CROSSOVERS=30 bash sweeps/token_head_adaptive.sh   # the paper's search size
#   EXTRA="backbone=mobilebert task=sst2 trainer=gpu" bash sweeps/token_head_adaptive.sh   # the paper's setting
#   METHODS="tokens joint" bash sweeps/token_head_adaptive.sh   # a subset of the three
#
# Rerunning after a kill with the same START and TOKENPRUNE_OUTPUTS skips the finished trainings
# (results.json written) and searches (front.csv written); a killed search resumes from its cache.
set -euo pipefail
{  # read whole before anything runs: editing this file cannot change a sweep that is running it
START=${START:-}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-2}
LENGTH_DROP=${LENGTH_DROP:-0.35}
LAYER_DROP=${LAYER_DROP:-0}
NUM_SANDWICH=${NUM_SANDWICH:-2}
SANDWICH_EPOCHS=${SANDWICH_EPOCHS:-1}
SANDWICH_LR=${SANDWICH_LR:-5e-5}
ITERATIONS=${ITERATIONS:-8}
MUTATIONS=${MUTATIONS:-10}
CROSSOVERS=${CROSSOVERS:-10}
BUDGETS=${BUDGETS:-0.3,0.4,0.5,0.6}
METHODS=${METHODS:-tokens heads joint}
EXTRA=${EXTRA:-}
source "$(dirname "$0")/checks.sh"
need_int FINETUNE_EPOCHS 1
need_number LENGTH_DROP 0 0.99
need_number LAYER_DROP 0 0.99
need_int NUM_SANDWICH 0
need_int SANDWICH_EPOCHS 1
need_number SANDWICH_LR 1e-9 1
need_int ITERATIONS 1
need_int MUTATIONS 0
need_int CROSSOVERS 0
need_numbers BUDGETS 0 1
if [[ -n $START && ! -f $START ]]; then echo "START=$START is not a checkpoint file" >&2; exit 2; fi
export TOKENPRUNE_OUTPUTS=${TOKENPRUNE_OUTPUTS:-outputs/token_head_adaptive/$(date +%Y-%m-%d_%H-%M-%S)}
# every run of this sweep (train, search, compare) in one W&B group
export TOKENPRUNE_GROUP=${TOKENPRUNE_GROUP:-token_head_adaptive-$(basename "$TOKENPRUNE_OUTPUTS")}
export WANDB_MODE=${WANDB_MODE:-offline}
root=$TOKENPRUNE_OUTPUTS
latest() { ls -t $1 | head -n 1; }

for prune in $METHODS; do
  [[ $prune =~ ^(tokens|heads|joint)$ ]] || { echo "METHODS=$METHODS: '$prune' is not one of tokens, heads, joint" >&2; exit 2; }
done

if [[ -z $START ]]; then  # one fine-tuned start for every arm, also across reruns
  if ! ls "$root"/train/finetune/*/results.json > /dev/null 2>&1; then
    tokenprune-train run_name=finetune trainer.max_epochs="$FINETUNE_EPOCHS" $EXTRA
  fi
  START=$(latest "$root/train/finetune/*/results.json")
  START=$(dirname "$START")/checkpoints/last.ckpt
fi

fronts=()
for prune in $METHODS; do
  # a rerun with the same TOKENPRUNE_OUTPUTS skips finished trainings and searches
  if ! ls "$root"/train/that-$prune/*/results.json > /dev/null 2>&1; then
    tokenprune-train run_name="that-$prune" pruner=token_head_adaptive module=token_head_adaptive \
      module.prune="$prune" module.init_from="$START" trainer.max_epochs="$SANDWICH_EPOCHS" \
      module.optimizer.lr="$SANDWICH_LR" module.length_drop="$LENGTH_DROP" module.layer_drop="$LAYER_DROP" \
      module.num_sandwich="$NUM_SANDWICH" $EXTRA
  fi
  checkpoint=$(latest "$root/train/that-$prune/*/checkpoints/last.ckpt")
  if ! ls "$root"/search/that-$prune/*/front.csv > /dev/null 2>&1; then
    tokenprune-search checkpoint="$checkpoint" run_name="that-$prune" search=token_head_evolution \
      search.prune="$prune" search.length_drop="$LENGTH_DROP" search.iterations="$ITERATIONS" \
      search.mutations="$MUTATIONS" search.crossovers="$CROSSOVERS"
  fi
  fronts+=(--fronts "$prune=$root/search/that-$prune/*/front.csv")
done

tokenprune-compare --runs "$root/train/that-*/*/results.json" --label "sandwich model, unpruned" \
  "${fronts[@]}" --budgets "$BUDGETS" --out "$root/compare/$(date +%Y-%m-%d_%H-%M-%S)"
echo "table and plot: $(ls -td "$root"/compare/*/ | head -n 1)"
exit
}
