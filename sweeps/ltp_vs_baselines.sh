#!/usr/bin/env bash
# LTP over a lambda grid against the manual-threshold and top-k baselines on one task, at the
# same training budget, written as one accuracy-vs-relative-FLOPs table and plot (report split).
#
#   bash sweeps/ltp_vs_baselines.sh                       # MiniLM-L6 x rt_sentiment (offline, CPU)
#   LAMBDAS=0.02,0.05,0.1 EXTRA="backbone=bert_base task=sst2 trainer=gpu" bash sweeps/ltp_vs_baselines.sh
#
# 1. fine-tune 1 epoch (the start of every LTP run and of the baseline)
# 2. unpruned baseline: SOFT_EPOCHS + HARD_EPOCHS more epochs of fine-tuning (LTP's budget)
# 3. LTP: soft stage (SOFT_EPOCHS) + hard stage (HARD_EPOCHS) per (lambda, final threshold),
#    from the fine-tuned checkpoint
# 4. baselines on the baseline model: top-k keep-ratio grid and manual rising-threshold grid
# 5. tokenprune-compare: one table (table.md/csv), front.png, W&B
set -euo pipefail
{  # read whole before anything runs: editing this file cannot change a sweep that is running it
LAMBDAS=${LAMBDAS:-0.02,0.03,0.04,0.05}
THRESHOLDS=${THRESHOLDS:-0.005}
SOFT_EPOCHS=${SOFT_EPOCHS:-1}
HARD_EPOCHS=${HARD_EPOCHS:-2}
EXTRA=${EXTRA:-}
source "$(dirname "$0")/checks.sh"
need_numbers LAMBDAS 0 10
need_numbers THRESHOLDS 0 1
need_int SOFT_EPOCHS 1
need_int HARD_EPOCHS 1
export TOKENPRUNE_OUTPUTS=${TOKENPRUNE_OUTPUTS:-outputs}/ltp_vs_baselines/$(date +%Y-%m-%d_%H-%M-%S)
# every run of this sweep (train, search, bench, compare) in one W&B group
export TOKENPRUNE_GROUP=${TOKENPRUNE_GROUP:-ltp_vs_baselines-$(basename "$TOKENPRUNE_OUTPUTS")}
export WANDB_MODE=${WANDB_MODE:-offline}
root=$TOKENPRUNE_OUTPUTS
latest() { ls -t $1 | head -n 1; }

tokenprune-train run_name=finetune trainer.max_epochs=1 $EXTRA
finetuned=$(latest "$root/train/finetune/*/checkpoints/last.ckpt")

tokenprune-train run_name=baseline module.init_from="$finetuned" trainer.max_epochs=$((SOFT_EPOCHS + HARD_EPOCHS)) module.optimizer.lr=5e-5 $EXTRA
baseline=$(latest "$root/train/baseline/*/checkpoints/last.ckpt")

tokenprune-train -m experiment=ltp 'stages=${ltp_stages_from_finetuned}' module.init_from="$finetuned" \
  module.mask_penalty="$LAMBDAS" pruner.final_threshold="$THRESHOLDS" epochs.soft="$SOFT_EPOCHS" \
  epochs.hard="$HARD_EPOCHS" $EXTRA

tokenprune-search checkpoint="$baseline" search=keep_ratio_grid search.pruner.start_layer=1
tokenprune-search checkpoint="$baseline" search=threshold_grid

tokenprune-compare --out "$root/compare" --wandb \
  --runs "$root/multirun/*/*/results.json" --label ltp \
  --runs "$root/train/baseline/*/results.json" --label unpruned \
  --fronts "topk=$root/search/keep_ratio_grid/*/front.csv" \
  --fronts "manual_threshold=$root/search/threshold_grid/*/front.csv"
exit
}
