#!/usr/bin/env bash
# Independent single-GPU jobs spread over the GPUs of one machine (one device call): ablations of
# speedrun_bench run side by side, one per GPU, each GPU working through its own queue.
#   JOBS="name|kind|args;..." bash benchmarks/parallel_runs.sh
# A run named name@ARCHIVE trains with an earlier commit's code, as in speed_runs.sh.
# kind: run   = benchmarks/speedrun.py experiment=speedrun_bench + args (full training + val loss)
#       bench = muongpt bench experiment=speedrun_bench + args
#       test  = pytest args
# Job i goes to GPU i mod NGPU; run jobs whose config the trainer would refuse are dropped first
# (benchmarks/check_runs.py). JSON results and logs are packed into $OUT/par.tar.gz as jobs end
# (a call cut off at its limit still returns what finished), and each JSON is also copied to
# $OUT (the logs stay in the archive: few files come back).
# Timings of jobs that share a machine are indicative only; losses are not affected.
set -uo pipefail
source benchmarks/device_setup.sh
R=/tmp/parallel_runs/par; rm -rf "$R"; mkdir -p "$R"
NGPU=$(nvidia-smi -L | wc -l)
: "${JOBS:?set JOBS}"
JOBS=$(checked_runs --jobs "$JOBS")  # run jobs with refused configs dropped, in seconds
IFS=';' read -ra LIST <<< "$JOBS"
for item in "${LIST[@]}"; do code_root "${item%%|*}" > /dev/null || exit 1; done  # unpack once
for ((g = 0; g < NGPU; g++)); do  # one inductor cache per GPU, each seeded from the carried one
  mkdir -p /tmp/inductor_$g && cp -r "$TORCHINDUCTOR_CACHE_DIR/." /tmp/inductor_$g/ 2>/dev/null
done
run_job() {  # gpu name kind args
  local gpu=$1 name=${2%%@*} kind=$3 args=$4 root
  local log="$R/$name.log"
  root=$(code_root "$2") || return 1
  export CUDA_VISIBLE_DEVICES=$gpu TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_$gpu
  # shellcheck disable=SC2086
  case $kind in
    run) PYTHONPATH=/tmp/site:$root/src timeout "${RUN_TIMEOUT:-560}" python3 \
           "$root/benchmarks/speedrun.py" --name "$name" --out "$R/$name.json" \
           experiment=speedrun_bench $D training.export_safetensors=false $args > "$log" 2>&1 ;;
    bench) timeout "${RUN_TIMEOUT:-560}" python3 -m muongpt.cli.main bench experiment=speedrun_bench $D \
           bench.out="$R/$name.json" $args > "$log" 2>&1 ;;
    test) eval "timeout ${RUN_TIMEOUT:-560} python3 -m pytest -q --tb=short -p no:cacheprovider \
           $args" > "$log" 2>&1 ;;  # eval: quotes in args group a -k expression
  esac
  echo "[gpu $gpu] $name done (exit $?)"
}
for ((g = 0; g < NGPU; g++)); do
  (
    for ((i = g; i < ${#LIST[@]}; i += NGPU)); do
      IFS='|' read -r name kind args <<< "${LIST[$i]}"
      run_job "$g" "$name" "$kind" "$args"
      pack_results "$R" "$g"  # one writer per GPU
    done
  ) &
done
wait
pack_results "$R" all
echo "=== logs (tails)"
for f in "$R"/*.log; do
  echo "--- $(basename "$f")"
  grep -vE "DEBUG|Warning|warn\(|^ *$" "$f" | grep -E "val loss|RESULT|Error|error|passed|failed|tok/s|ms/step|INTERRUPTED" | tail -n 8
done
echo "=== summary"
for f in "$R"/*.json; do [ -e "$f" ] || continue; python3 - "$f" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
if "val_loss" in r:
    print(f"{r['name']:<24} val {r['val_loss']:.4f}  {r['train_seconds']:6.1f} s  {r['ms_per_step']:6.1f} ms/step  {r['tokens_per_s']:>9,.0f} tok/s")
else:
    print(f"{sys.argv[1].split('/')[-1]:<24} bench {r.get('tokens_per_s', 0):>9,.0f} tok/s  "
          f"{r.get('ms_per_step', 0):6.1f} ms/step  MFU {100 * r.get('mfu', 0):.1f}%  peak {r.get('peak_mem_gib', 0):.1f} GiB")
EOF
done
