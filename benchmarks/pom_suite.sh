#!/usr/bin/env bash
# PoM's device runs (docs/pom.md), one part per device call, results packed into
# $OUT/pom_<part>.tar.gz after every run (a call cut off at its limit still returns them):
#   bash benchmarks/pom_suite.sh kernel    # one layer: fused PoM vs plain vs attention; decoding
#   bash benchmarks/pom_suite.sh quality   # d12, bench pack, 100 steps x 131,072 tokens, Muon
#   bash benchmarks/pom_suite.sh long      # d12 at T = 8K, 32K, 64K, 131,072 tokens per step
#   bash benchmarks/pom_suite.sh profile   # d12 at T = 1K: a training step's GPU kernels, per model
# (expects .whl/ and .devdata/bench/*.xz, see device_setup.sh). STEPS overrides the step counts,
# SEED the seed, TS the long part's sequence lengths (TS="8192 32768" runs two of them), RUNS the
# quality and long parts' runs (RUNS="attention pom_conv4 hybrid3_conv4" runs three of them),
# EXTRA overrides added to every run (EXTRA="model.mixing.pom_n_sel_heads=1").
set -uo pipefail
source benchmarks/device_setup.sh
PART=${1:?usage: pom_suite.sh kernel|quality|long|profile}
R=$OUT/pom_$PART; mkdir -p "$R"
run() { echo "=== $*"; "$@" 2>&1 | tail -n 25; tar -czf "$OUT/pom_$PART.tar.gz" -C "$OUT" "pom_$PART"; }
FUSED="kernels.converters=[fused_pom]"
case $PART in
kernel)
  run python3 benchmarks/pom_vs_attention.py --compile --layers pom,pom_fused,attention --out "$R/pom_vs_attention_compiled.json"
  # candidates: the convolution as one Triton op (FUSED_CONV), the chunk sums in wider tiles (SUMS)
  run python3 benchmarks/pom_vs_attention.py --compile --layers pom_fused --fused-conv --profile --out "$R/pom_fused_conv_compiled.json"
  run python3 benchmarks/pom_kernel_profile.py --T 4096 --shapes 32x32x2,32x32x4 --sums-shapes 32x2,64x4,128x4,128x8 --out "$R/pom_sums_shapes.json"
  # the d12 experiments' micro-batch, 32 rows of 1K: below ROW_SCAN_PROGRAMS_PER_SM at 32 channels
  run python3 benchmarks/pom_kernel_profile.py --T 1024 --tokens 32768 --shapes 32x32x2,32x32x4,32x16x2,32x16x4 --row-scan --out "$R/pom_rows_32x1024.json"
  run python3 benchmarks/pom_vs_attention.py --compile --layers pom_fused --n-sel-heads 1 --out "$R/pom_fused_h1_compiled.json"
  # expansion 2 (the default until 2026-12-04): twice the state and the matmuls
  run python3 benchmarks/pom_vs_attention.py --compile --layers pom_fused --expand 2 --out "$R/pom_fused_e2_compiled.json"
  run python3 benchmarks/pom_decode.py --out "$R/pom_decode.json"
  ;;
quality)
  # Equal tokens, the same recipe; PoM layers fused. conv = the position signal's width (4 by
  # default; nconv runs without it).
  COMMON="data=bench $D training.seed=${SEED:-1337} training.max_steps=${STEPS:-100} training.cooldown_steps=40 training.eval_every=100000 training.eval_tokens=2000000 training.progress_bar=false training.checkpoint_every=0 training.export_safetensors=false training.compile_warmup_steps=3 ${EXTRA:-}"
  q() {
    local name=$1; shift
    [ -n "${RUNS:-}" ] && [[ " $RUNS " != *" $name "* ]] && return
    run python3 benchmarks/speedrun.py --name "$name" --out "$R/d12_${name}_seed${SEED:-1337}.json" "$@" $COMMON
  }
  q attention experiment=transformers_baseline
  q pom_nconv experiment=pomgpt_baseline model.mixing.pom_conv=0 $FUSED
  q pom_conv4 experiment=pomgpt_baseline $FUSED
  q hybrid3_nconv experiment=hybrid_baseline model.mixing.pom_conv=0 $FUSED
  q hybrid3_conv4 experiment=hybrid_baseline $FUSED
  q hybrid2_conv4 experiment=hybrid_baseline "model.mixing.pattern=[pom,attention]" $FUSED
  q hybrid4_conv4 experiment=hybrid_baseline "model.mixing.pattern=[pom,pom,pom,attention]" $FUSED
  # 1 selection head (the default until 2026-12-04): a 4x larger gate matmul
  q pom_conv4_h1 experiment=pomgpt_baseline model.mixing.pom_n_sel_heads=1 $FUSED
  q pom_conv4_e2 experiment=pomgpt_baseline model.mixing.pom_expand=2 $FUSED
  q hybrid3_conv4_e2 experiment=hybrid_baseline model.mixing.pom_expand=2 $FUSED
  q hybrid3_conv4_h1 experiment=hybrid_baseline model.mixing.pom_n_sel_heads=1 $FUSED
  ;;
long)
  # 131,072 tokens per step at every T (16 x 8K, 4 x 32K, 2 x 64K rows); val loss every 25 steps;
  # attention document-masked (FlexAttention), PoM over the whole row
  # against training seconds (benchmarks/speedrun.py's val_loss_curve).
  for T in ${TS:-8192 32768 65536}; do
    ROWS=$((131072 / T))
    COMMON="data=bench $D training.seq_len=$T training.batch_size=$ROWS training.micro_batch_size=$ROWS training.max_steps=${STEPS:-100} training.cooldown_steps=60 training.eval_every=25 training.eval_tokens=1048576 training.progress_bar=false training.checkpoint_every=0 training.checkpoint_minutes=0 training.export_safetensors=false training.compile_warmup_steps=3 ${EXTRA:-}"
    l() {
      local name=$1; shift
      [ -n "${RUNS:-}" ] && [[ " $RUNS " != *" $name "* ]] && return
      run python3 benchmarks/speedrun.py --name "${name}_T$T" --out "$R/${name}_T$T.json" "$@" $COMMON
    }
    l attention experiment=transformers_baseline model.doc_mask=true "kernels.converters=[flex_attention]"
    l pom experiment=pomgpt_baseline $FUSED
    l hybrid experiment=hybrid_baseline model.doc_mask=true "kernels.converters=[flex_attention,fused_pom]"
  done
  [ -z "${TS:-}" ] && run python3 benchmarks/pom_long_context_plot.py --results "$R" --out "$R/pom_long_context.png"
  ;;
profile)
  # Where a whole model's step goes (the quality part's recipe): the layer benchmark's PoM is
  # faster than its attention, the d12 models' steps are not (docs/pom.md).
  P="data=bench $D ${EXTRA:-}"
  run python3 benchmarks/profile_step.py --out "$R/attention.txt" experiment=transformers_baseline $P
  run python3 benchmarks/profile_step.py --out "$R/pom.txt" experiment=pomgpt_baseline $FUSED $P
  run python3 benchmarks/profile_step.py --out "$R/hybrid.txt" experiment=hybrid_baseline $FUSED $P
  ;;
*) echo "unknown part $PART (kernel, quality, long, profile)"; exit 2 ;;
esac
rm -rf "$R"
