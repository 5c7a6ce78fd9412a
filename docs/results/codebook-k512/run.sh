#!/bin/bash
# #8 "Show it": K=512, D=64 on CIFAR-10 JPEGs, equal steps, with/without restarts and EMA
cd /work/wt-show
export PYTHONPATH=/work/wt-show OMP_NUM_THREADS=1
common="--data folder --data-dir /work/cifar/train --num-codes 512 --code-dim 64 --steps 3000 --threads 1 --eval-every 1000"
run() { name=$1; shift; [ -f /work/show/$name/eval.json ] && return; python -m vqkernels.train $common --out /work/show/$name "$@" > /work/show/$name.log 2>&1 || echo "$name failed" >> /work/show/failed; }
run grad-restart --restart-after 25
run grad-norestart --restart-after 0
run ema-restart --ema --restart-after 25
run ema-norestart --ema --restart-after 0
run grad-uniform-norestart --codebook-init uniform --restart-after 0
echo done > /work/show/ALLDONE
