#!/usr/bin/env bash
# Optimizer comparison: train one model with AdamW, Muon and SOAP on the same data and token
# budget (one Hydra multirun over the `optimizer` group; only the optimizer differs), then plot
# the runs and tabulate their final figures.
#
#   scripts/compare_optimizers.sh                    # CPU: experiment=tiny (3 runs of 300 steps, ~9 min on 2 cores)
#   scripts/compare_optimizers.sh speedrun_d12 data=bench data.train_files=PATH/train_*.bin \
#       data.val_files=PATH/val_*.bin training.max_steps=270      # GPU, on the bench pack
#
# Arguments: [EXPERIMENT] [extra Hydra overrides, applied to every run]. Environment:
# OPTIMIZERS (default adamw,muon,soap), SWEEP_DIR (default runs/multirun/compare_<exp>_<time>).
# Writes SWEEP_DIR/{0_adamw,1_muon,2_soap}/ (the runs), SWEEP_DIR/comparison.png and
# SWEEP_DIR/comparison.md, and prints the table.
set -euo pipefail

experiment="${1:-tiny}"
shift $(($# > 0 ? 1 : 0))
optimizers="${OPTIMIZERS:-adamw,muon,soap}"
sweep_dir="${SWEEP_DIR:-runs/multirun/compare_${experiment}_$(date +%Y-%m-%d_%H-%M-%S)}"

# Prefer the venv's commands when run from a source checkout.
bin_dir="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
if [[ -x "$bin_dir/muongpt-train" ]]; then PATH="$bin_dir:$PATH"; fi

muongpt-train -m "experiment=${experiment}" "optimizer=${optimizers}" "$@" \
    "hydra.sweep.dir=${sweep_dir}" 'hydra.sweep.subdir=${hydra.job.num}_${optimizer.name}'

muongpt plot "$sweep_dir" --out "$sweep_dir/comparison.png" --table "$sweep_dir/comparison.md"
echo "table: $sweep_dir/comparison.md"
