#!/usr/bin/env bash
# One command per table: every method and baseline on one task, SEEDS seeds, from the same
# fine-tuned start per seed, at matched relative-FLOPs levels, in one table and one Pareto plot.
#
#   bash sweeps/methods_table.sh                                  # rt_sentiment, seeds 1,2,3 (offline, CPU)
#   TASK=spam_assassin bash sweeps/methods_table.sh               # the long-document table (after make data)
#   PRESET=reference bash sweeps/methods_table.sh                 # the reference implementations' settings
#   TOKENPRUNE_OUTPUTS=<that run's folder> bash sweeps/methods_table.sh   # after a kill: only what is missing
#   EXTRA="backbone=bert_base task=sst2 trainer=gpu" bash sweeps/methods_table.sh   # GLUE x BERT-base on a GPU
#   PRESET=reference METHODS=ltp,length_adaptive,token_head_adaptive bash sweeps/methods_table.sh   # a subset
#   BENCH_WARMUP=1 BENCH_REPEATS=5 TASK=spam_assassin bash sweeps/methods_table.sh   # fewer timed passes per bench
#
# Seed by seed (so a complete table of the first seed exists early), every training a Hydra
# multirun with skip_done=true, so a rerun into the same TOKENPRUNE_OUTPUTS skips finished runs
# and stages and continues a killed one from its last epoch's checkpoint;
# searches with a front.csv are skipped and killed ones resume from their cache; benches listed in
# table/bench_plan.txt run once:
#  1. fine-tune (run_name unpruned-s<seed>): the start of every method and the reference
#  2. LTP over LAMBDAS (soft + hard stage); top-k retrained pruned for the hard stage's epochs over
#     KEEP_RATIOS (the LTP paper's baseline: the first max(3, ceil(0.15 L)) layers unpruned)
#  3. post hoc on the fine-tuned model: top-k, SpAtten, random (keep-ratio grids), manual threshold
#  4. Length-Adaptive and Token+Head Adaptive: sandwich training, then their evolutionary searches
#  5. ACC: fine-tuned with elimination at ACC_SC, then offline tuning over SC (measures speed itself)
#  6. tokenprune-table: table.md/csv, pareto.png; after the first seed, the benches it lists (that
#     seed's chosen points); at the end the table with W&B and the results page (PAGE, default
#     docs/results/<task>.md) beside the papers' figures
set -euo pipefail
{  # read whole before anything runs: editing this file cannot change a sweep that is running it
TASK=${TASK:-rt_sentiment}
SEEDS=${SEEDS:-1,2,3}
LEVELS=${LEVELS:-0.3,0.4,0.5,0.6,0.7}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-2}
HARD_EPOCHS=${HARD_EPOCHS:-2}
LAMBDAS=${LAMBDAS:-0.02,0.04,0.08,0.15}
KEEP_RATIOS=${KEEP_RATIOS:-0.3,0.45,0.6}
SANDWICH_EPOCHS=${SANDWICH_EPOCHS:-2}
LENGTH_DROP=${LENGTH_DROP:-0.35}
ITERATIONS=${ITERATIONS:-8}
ACC_SC=${ACC_SC:-0.85}
PRESET=${PRESET:-}
PAGE=${PAGE:-docs/results/$TASK${PRESET:+-$PRESET}.md}
EXTRA=${EXTRA:-}
BENCH_WARMUP=${BENCH_WARMUP:-3}  # untimed passes over the report split per bench variant
BENCH_REPEATS=${BENCH_REPEATS:-10}  # timed passes (the bench reports their median and spread)
ALL_METHODS="ltp topk_retrained topk spatten random manual_threshold length_adaptive token_head_adaptive acc"
METHODS=${METHODS:-${ALL_METHODS// /,}}  # the fine-tuned start (unpruned) always runs
source "$(dirname "$0")/checks.sh"
need_numbers SEEDS 0 4294967295
need_numbers LEVELS 0.01 1
need_int FINETUNE_EPOCHS 1
need_int HARD_EPOCHS 1
need_numbers LAMBDAS 0 10
need_numbers KEEP_RATIOS 0.01 1
need_int SANDWICH_EPOCHS 1
need_number LENGTH_DROP 0 0.99
need_int ITERATIONS 1
need_number ACC_SC 0.01 2
need_int BENCH_WARMUP 0
need_int BENCH_REPEATS 1
need_choices METHODS $ALL_METHODS
[[ $PRESET =~ ^(|reference)$ ]] || { echo "PRESET=$PRESET is not one of: '' (our defaults), reference" >&2; exit 2; }
export TOKENPRUNE_OUTPUTS=${TOKENPRUNE_OUTPUTS:-outputs/methods_table/$TASK${PRESET:+-$PRESET}-$(date +%Y-%m-%d_%H-%M-%S)}
# every run of this sweep (train, search, bench, table) in one W&B group
export TOKENPRUNE_GROUP=${TOKENPRUNE_GROUP:-methods_table-$(basename "$TOKENPRUNE_OUTPUTS")}
export WANDB_MODE=${WANDB_MODE:-offline}
root=$TOKENPRUNE_OUTPUTS
seeds=${SEEDS//,/ }
common="task=$TASK skip_done=true $EXTRA"
if [[ $PRESET == reference ]]; then
  ltp=ltp_reference evolution=evolution_reference token_head=token_head_evolution_reference
  sandwich="module.layer_drop_passes=all module.min_length=2 module.kd_direction=reverse pruner.scores_after_dropout=true"
else
  ltp=ltp evolution=evolution token_head=token_head_evolution sandwich=""
fi
want() { [[ ,$METHODS, == *,$1,* ]]; }
searched() { ls "$root"/search/"$1"/*/front.csv > /dev/null 2>&1; }
# last checkpoint of the newest run named $1: this invocation's (a reused run's results point to the original)
trained() {
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["last_checkpoint"])' \
    "$(grep -l "\"run_name\": \"$1\"" "$root"/multirun/*/*/results.json | tail -n 1)"
}
benches() {
  tokenprune-table "$root" --levels "$LEVELS"
  while read -r command; do
    [[ -n $command ]] && eval "$command warmup=$BENCH_WARMUP repeats=$BENCH_REPEATS"
  done < "$root/table/bench_plan.txt"
}
mkdir -p "$root/start"

for seed in $seeds; do
  # 1. fine-tuned start; start/s<seed>.ckpt links to it
  tokenprune-train -m run_name="unpruned-s$seed" seed="$seed" trainer.max_epochs="$FINETUNE_EPOCHS" $common
  start_checkpoint=$(realpath "$(trained "unpruned-s$seed")")
  if [[ -L $root/start/s$seed.ckpt && $(realpath "$root/start/s$seed.ckpt") != "$start_checkpoint" ]]; then
    echo "start/s$seed.ckpt links to $(realpath "$root/start/s$seed.ckpt"), not to this rerun's fine-tune" \
      "$start_checkpoint (FINETUNE_EPOCHS or EXTRA changed?): the methods trained from the old start would be reused;" \
      "use a new TOKENPRUNE_OUTPUTS" >&2
    exit 2
  fi
  ln -sfn "$start_checkpoint" "$root/start/s$seed.ckpt"
  start="module.init_from=$root/start/s$seed.ckpt"

  # 2. LTP and the retrained top-k baseline, at the same training budget after fine-tuning
  want ltp && tokenprune-train -m experiment=$ltp 'stages=${ltp_stages_from_finetuned}' "$start" run_name="ltp-s$seed" \
    seed="$seed" module.mask_penalty="$LAMBDAS" epochs.hard="$HARD_EPOCHS" $common
  want topk_retrained && tokenprune-train -m experiment=retrained_baseline 'stages=${retrained_from_finetuned}' \
    "$start" pruner=topk pruner.start_layer=null pruner.keep_ratio="$KEEP_RATIOS" run_name="topk_retrained-s$seed" \
    seed="$seed" epochs.pruned="$HARD_EPOCHS" $common

  # 3. post-hoc baselines on the fine-tuned model
  finetuned=$root/start/s$seed.ckpt
  want topk && ! searched "topk-s$seed" && tokenprune-search checkpoint="$finetuned" run_name="topk-s$seed" \
    search=keep_ratio_grid
  want spatten && ! searched "spatten-s$seed" && tokenprune-search checkpoint="$finetuned" run_name="spatten-s$seed" \
    search=keep_ratio_grid pruner@search.pruner=spatten search.pruner_group=spatten search.parameter=final_ratio \
    'search.values=[0.05,0.1,0.2,0.3,0.4,0.6,0.8]'
  want random && ! searched "random-s$seed" && tokenprune-search checkpoint="$finetuned" run_name="random-s$seed" \
    search=keep_ratio_grid pruner@search.pruner=random search.pruner_group=random
  want manual_threshold && ! searched "manual_threshold-s$seed" && tokenprune-search checkpoint="$finetuned" \
    run_name="manual_threshold-s$seed" search=threshold_grid

  # 4. Length-Adaptive and Token+Head Adaptive: sandwich training, then search the trained model
  sandwich_run="seed=$seed trainer.max_epochs=$SANDWICH_EPOCHS module.length_drop=$LENGTH_DROP module.layer_drop=0"
  search_run="search.length_drop=$LENGTH_DROP search.iterations=$ITERATIONS"
  want length_adaptive && tokenprune-train -m pruner=length_adaptive module=length_adaptive "$start" \
    run_name="length_adaptive-s$seed" $sandwich_run $sandwich $common
  want length_adaptive && ! searched "length_adaptive-s$seed" && tokenprune-search \
    checkpoint="$(trained "length_adaptive-s$seed")" run_name="length_adaptive-s$seed" search=$evolution $search_run
  want token_head_adaptive && tokenprune-train -m pruner=token_head_adaptive module=token_head_adaptive "$start" \
    run_name="token_head_adaptive-s$seed" $sandwich_run $sandwich $common
  want token_head_adaptive && ! searched "token_head_adaptive-s$seed" && tokenprune-search \
    checkpoint="$(trained "token_head_adaptive-s$seed")" run_name="token_head_adaptive-s$seed" search=$token_head \
    $search_run

  # 5. ACC: one fine-tune with elimination, then offline tuning (accuracy, FLOPs, measured speed per SC)
  want acc && tokenprune-train -m pruner=acc module=acc "$start" run_name="acc-s$seed" seed="$seed" \
    pruner.speedup_coefficient="$ACC_SC" trainer.max_epochs="$HARD_EPOCHS" $common
  want acc && ! searched "acc-s$seed" && tokenprune-search checkpoint="$(trained "acc-s$seed")" run_name="acc-s$seed" \
    search=acc_offline 'search.values=[0.6,0.7,0.75,0.8,0.85,0.9,0.95,1.0,1.1]'

  # 6. after the first seed: the table so far and the benches of that seed's chosen points
  if [[ $seed == "${seeds%% *}" ]]; then benches; fi
done

# 6. the table of every seed, the benches still missing, and the final table, W&B and results page
benches
tokenprune-table "$root" --levels "$LEVELS" --wandb --page "$PAGE"
echo "table: $root/table/table.md; results page: $PAGE"
exit
}
