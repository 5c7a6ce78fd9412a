#!/bin/bash
# The K=512 codebook-health runs (issue 8, "Show it"): CIFAR-10 JPEGs, K=512, D=64, 3000 steps
# each, with and without dead-code restarts and EMA.
#   bash docs/results/codebook-k512/run.sh CIFAR_TRAIN_DIR OUT_DIR
# then: python docs/results/codebook-k512/make_table.py OUT_DIR
set -u
data=${1:?CIFAR train folder (the JPEG class folders)}; out=${2:?output folder}
common="--data folder --data-dir $data --num-codes 512 --code-dim 64 --steps 3000 --threads 1 --eval-every 1000"
run() {
  name=$1; shift
  [ -f "$out/$name/eval.json" ] && return  # done: resumable by re-running this script
  resume=""; [ -f "$out/$name/checkpoint.pt" ] && resume="--resume"
  python -m vqkernels.train $common --out "$out/$name" $resume "$@" || echo "$name failed"
}
run grad-restart --restart-after 25
run grad-norestart --restart-after 0
run ema-restart --ema --restart-after 25
run ema-norestart --ema --restart-after 0
run grad-uniform-norestart --codebook-init uniform --restart-after 0
