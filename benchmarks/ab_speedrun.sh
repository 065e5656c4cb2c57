#!/usr/bin/env bash
# Speed runs of two versions of muongpt, interleaved on one GPU, for a before/after comparison:
#   benchmarks/ab_speedrun.sh OLD_SRC NEW_SRC OUT_DIR SEED... [-- HYDRA_OVERRIDE...]
# OLD_SRC / NEW_SRC are `src` folders (e.g. of `git archive <commit> src`); each seed runs the old
# version, then the new one, so both see the same machine state. JSON per run in OUT_DIR; the
# RESULT lines are collected in OUT_DIR/table.txt. Needs the bench pack unpacked in .devdata/bench.
set -uo pipefail
old=$1 new=$2 out=$3
shift 3
seeds=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do seeds+=("$1"); shift; done
[ $# -gt 0 ] && shift
data="data.train_files=.devdata/bench/train_*.bin data.val_files=.devdata/bench/val_*.bin"
mkdir -p "$out"
for seed in "${seeds[@]}"; do
  for version in old new; do
    src=$old; [ "$version" = new ] && src=$new
    PYTHONPATH="$src:${PYTHONPATH:-}" python3 benchmarks/speedrun.py \
      --out "$out/${version}_seed$seed.json" --name "${version}_seed$seed" \
      experiment=speedrun_bench training.seed="$seed" $data "$@" 2>&1 \
      | tee "$out/${version}_seed$seed.log" | grep -E "RESULT|Error|error" | tee -a "$out/table.txt"
  done
done
cat "$out/table.txt"
