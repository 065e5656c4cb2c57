#!/usr/bin/env bash
# Train on one GPU (no torchrun needed): an experiment plus any Hydra overrides.
#
#   scripts/run_single_gpu.sh                                   # experiment=speedrun_d12
#   scripts/run_single_gpu.sh speedrun_bench data.train_files=PATH/train_*.bin \
#       data.val_files=PATH/val_*.bin
#   CUDA_VISIBLE_DEVICES=3 scripts/run_single_gpu.sh speedrun_d12 training.max_steps=100
#
# The global batch (training.batch_size sequences) is the same as on several GPUs: with one GPU,
# gradient accumulation runs batch_size / micro_batch_size micro-steps per optimizer step.
set -euo pipefail

experiment="${1:-speedrun_d12}"
shift $(($# > 0 ? 1 : 0))

# Prefer the venv's commands when run from a source checkout.
bin_dir="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
if [[ -x "$bin_dir/muongpt-train" ]]; then PATH="$bin_dir:$PATH"; fi

exec muongpt-train "experiment=${experiment}" "$@"
