# Sourced at the start of every device call: wheels, data, environment.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
(cd .devdata/bench && for f in *.xz; do [ -f "${f%.xz}" ] || xz -dk -T0 "$f"; done)
export D="data.train_files=.devdata/bench/train_000001.bin data.val_files=.devdata/bench/val_000000.bin"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
# Compile caches in one folder, seeded from a carried archive: a fresh machine loads the compiled
# kernels of earlier calls instead of compiling again (benchmarks/speed_runs.sh SAVE_COMPILE_CACHE=1).
export TORCHINDUCTOR_CACHE_DIR=/tmp/compile_cache/inductor TRITON_CACHE_DIR=/tmp/compile_cache/triton
mkdir -p /tmp/compile_cache
# One archive, and/or the pieces SAVE_COMPILE_CACHE=1 writes (compile_cache.tar.xz.00, .01, ...),
# each unpacked on its own (an archive and pieces concatenated would unpack the first only).
if [ -f .devcache/compile_cache.tar.xz ]; then
  tar -xJf .devcache/compile_cache.tar.xz -C /tmp/compile_cache
fi
if compgen -G ".devcache/compile_cache.tar.xz.[0-9]*" > /dev/null; then
  cat .devcache/compile_cache.tar.xz.[0-9]* | tar -xJf - -C /tmp/compile_cache
fi
# A call's results: the work folder $1 (/tmp/.../NAME) packed whole into $OUT/NAME.tar.gz (written
# under a name of its own per writer, $2, then renamed: parallel writers never leave half an
# archive), its JSONs copied beside it (few files come back; the logs stay in the archive).
pack_results() {
  local name tmp
  name=$(basename "$1") && tmp="$OUT/.$name.${2:-0}.tar.gz"
  tar -czf "$tmp" -C "$(dirname "$1")" "$name" && mv -f "$tmp" "$OUT/$name.tar.gz"
  cp "$1"/*.json "$OUT"/ 2>/dev/null
}
# The code of a run named name@ARCHIVE: a carried git archive of an earlier commit (its src and
# benchmarks/speedrun.py), unpacked once under /tmp/versions; a plain name runs this checkout.
code_root() {
  [[ $1 == *@* ]] || { echo "$PWD"; return; }
  local root=/tmp/versions/$(basename "${1#*@}" .tar.gz)
  [ -d "$root" ] && { echo "$root"; return; }
  rm -rf "$root.part" && mkdir -p "$root.part" && tar -xzf "${1#*@}" -C "$root.part" &&
    mv "$root.part" "$root" || { rm -rf "$root.part"; return 1; }  # whole, or not there
  echo "$root"
}
# Whether one more run (RUN_ESTIMATE seconds, 100 unless set) fits in this device call
# (CALL_LIMIT, 585) with RESERVE seconds (40) left to pack the results and the compile cache: a
# run that the call's limit cuts off is lost with the time it took, and so is all packed after it.
run_fits() {
  (( SECONDS + ${RUN_ESTIMATE:-100} + ${RESERVE:-40} <= ${CALL_LIMIT:-585} ))
}
# Seconds a run may take: RUN_TIMEOUT (its default the first argument), but never past RESERVE
# seconds before CALL_LIMIT, so a run that takes longer than RUN_ESTIMATE (a graph compiled
# afresh) is stopped by its own timeout and what finished before it is still packed.
run_limit() {
  local left=$(( ${CALL_LIMIT:-585} - ${RESERVE:-40} - SECONDS ))
  echo $(( left < ${RUN_TIMEOUT:-$1} ? left : ${RUN_TIMEOUT:-$1} ))
}
# A RUNS (--runs) or JOBS (--jobs) list without the runs the trainer would refuse at start-up
# (benchmarks/check_runs.py, on the CPU's paths; each dropped run's error goes to stderr). If
# the checker itself fails, the list comes back whole: every run goes ahead unchecked.
checked_runs() {
  local checked
  if checked=$(CUDA_VISIBLE_DEVICES="" python3 benchmarks/check_runs.py --filter "$1" "$2" \
    2> >(grep -v "^fp8:" >&2)); then
    echo "$checked"
  else
    echo "the run check failed (above): every run goes ahead unchecked" >&2
    echo "$2"
  fi
}
