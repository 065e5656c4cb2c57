#!/usr/bin/env bash
# Train on the GPUs of one machine with torchrun (default 4; NPROC=8 for eight).
#
#   scripts/run_4_gpus.sh                                       # experiment=speedrun_d12
#   scripts/run_4_gpus.sh speedrun_bench training.batch_size=4 \
#       data.train_files=PATH/train_*.bin data.val_files=PATH/val_*.bin   # a row per GPU
#   NPROC=2 scripts/run_4_gpus.sh speedrun_d12 training.max_steps=100
#
# No DDP wrapper: Muon's hidden matrices are reduce-scattered and orthogonalized by the rank that
# owns them, AdamW's moments are sharded by rows (ZeRO-2). The global batch stays
# training.batch_size sequences (accumulation fills the gap), so results match one GPU.
# Rank 0 alone logs and writes the run directory (one for all ranks) and checkpoints.
# For several machines see docs/scaling.md ("Several nodes").
set -euo pipefail

experiment="${1:-speedrun_d12}"
shift $(($# > 0 ? 1 : 0))
nproc="${NPROC:-4}"

# Prefer the venv's python when run from a source checkout.
python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
if [[ ! -x "$python" ]]; then python="$(command -v python3)"; fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"  # per rank; torchrun would set 1 and warn
exec "$python" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
    -m muongpt.train "experiment=${experiment}" "$@"
