#!/usr/bin/env bash
# Single-GPU speed runs (one device call): each RUN line is one full speedrun_bench
# training + final validation with extra Hydra overrides; JSON results and logs are packed into
# $OUT/speed.tar.gz after every run (a call cut off at its limit still returns what finished),
# and each JSON is also copied to $OUT (the logs stay in the archive: few files come back).
#   RUNS="name1|overrides...;name2|overrides..." bash benchmarks/speed_runs.sh
# Every run's config is checked first (benchmarks/check_runs.py, run it here before a call too);
# a run refused at start-up is dropped with its error.
# A run named name@ARCHIVE runs an earlier version: ARCHIVE is a carried tarball of that commit's
# code (git archive -o .devold/v00c0195.tar.gz 00c0195 src benchmarks/speedrun.py), so a change
# of code is timed beside the unchanged previous version on the same GPU:
#   RUNS="old_s2@.devold/v00c0195.tar.gz|training.seed=2;new_s2|training.seed=2"
# SAVE_COMPILE_CACHE=1 also packs the compile cache into $OUT/compile_cache.tar.xz.00, .01, ... at
# the end, 15 MB pieces (a file over 16 MiB does not come back), for the next call to carry in
# .devcache (see benchmarks/device_setup.sh); where the pieces and .devdata together pass the
# carry limit (64 MiB), pack them again here: cat PIECES | xz -d | xz -9e -T0 > ARCHIVE.
# A run that would not end before the call's limit (run_fits: CALL_LIMIT, RUN_ESTIMATE) is not
# started, and one that runs longer than estimated is stopped RESERVE seconds before that limit
# (run_limit), so the results and the cache are packed in time.
set -uo pipefail
source benchmarks/device_setup.sh
R=/tmp/speed_runs/speed; rm -rf "$R"; mkdir -p "$R"
if [ -n "${PRETEST:-}" ]; then
  echo "=== pytest $PRETEST"
  # eval: PRETEST's own quotes group a -k expression ("-k 'a or b'"); no -x: one failure
  # must not hide whether the other tests pass (a GPU call is rare)
  eval "timeout 240 python3 -m pytest -q --tb=short -p no:cacheprovider $PRETEST" \
    > "$R/pretest.log" 2>&1
  grep -vE "DEBUG|warn|Warning|^ *$" "$R/pretest.log" | tail -n 40
  pack_results "$R"
fi
COMMON="experiment=speedrun_bench $D training.export_safetensors=false"
RUNS=$(checked_runs --runs "${RUNS:-default|}")  # refused configs dropped, in seconds
IFS=';' read -ra LIST <<< "$RUNS"
for item in "${LIST[@]}"; do
  name=${item%%|*}; extra=${item#*|}
  if ! run_fits; then  # its time goes to packing what finished instead
    echo "=== ${name%%@*}: not started, ${SECONDS} s into a call of ${CALL_LIMIT:-585} s"; continue
  fi
  root=$(code_root "$name") || exit 1; name=${name%%@*}
  echo "=== $name: $extra (code: $root)"
  # shellcheck disable=SC2086
  PYTHONPATH=/tmp/site:$root/src timeout "$(run_limit 400)" python3 \
    "$root/benchmarks/speedrun.py" --name "$name" --out "$R/$name.json" \
    $COMMON $extra > "$R/$name.log" 2>&1
  grep -E "val loss|compile warm-up|RESULT|^wall |Error|error" "$R/$name.log" | tail -n 14
  pack_results "$R"
done
echo "=== summary"
for f in "$R"/*.json; do [ -e "$f" ] || continue; python3 -c "
import json,sys; r=json.load(open('$f'))
if 'name' not in r: sys.exit()  # e.g. a bench report written beside the runs
print(f\"{r['name']:<28} val {r['val_loss']:.4f}  {r['train_seconds']:6.1f} s  {r['ms_per_step']:6.1f} ms/step  {r['tokens_per_s']:>9,.0f} tok/s  MFU {100*(r['mfu'] or 0):.1f}%  peak {r['peak_mem_gib'] or 0:.1f} GiB\")"; done
if [ "${SAVE_COMPILE_CACHE:-0}" = 1 ]; then
  rm -f "$OUT"/*.json  # all of them are in speed.tar.gz: room for the cache's pieces
  # the compilers' folders only; xz -6 keeps every core busy (-9 has fewer, larger blocks)
  tar -cf - -C /tmp/compile_cache inductor triton | xz -T0 -6 |
    split -b 15M -d - "$OUT/compile_cache.tar.xz."
  echo "compile cache: $(du -sh /tmp/compile_cache | cut -f1) -> $(cat "$OUT"/compile_cache.tar.xz.* | wc -c) bytes"
fi
