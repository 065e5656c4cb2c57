#!/usr/bin/env bash
# One device call that runs the single-GPU benchmarks (optimizer step, PoM, loader, checkpoint,
# d12 equal-token runs; docs/benchmarks.md) and packs every JSON result into $OUT/suite.tar.gz
# (the device returns at most 8 files). Usage on the GPU machine:
#   bash benchmarks/gpu_suite.sh            (expects .whl/ and .devdata/bench/*.xz, see device_setup.sh)
set -uo pipefail
source benchmarks/device_setup.sh
R=$OUT/suite; mkdir -p "$R"
STEP_MS=${STEP_MS:-300}
# Results are re-packed after every run, so a call cut off at its time limit still returns them.
run() { echo "=== $*"; "$@" 2>&1 | tail -n 25; tar -czf "$OUT/suite.tar.gz" -C "$OUT" suite; }
run python3 benchmarks/optimizer_step.py --device cuda --train-step-ms "$STEP_MS" --out "$R/optimizer_step.json"
run python3 benchmarks/pom_vs_attention.py --device cuda --out "$R/pom_vs_attention.json"
run python3 benchmarks/pom_vs_attention.py --device cuda --compile --out "$R/pom_vs_attention_compiled.json"
run python3 benchmarks/loader_bench.py --device cuda --shard .devdata/bench/val_000000.bin --step-ms "$STEP_MS" --out "$R/loader.json"
run python3 benchmarks/checkpoint_bench.py --device cuda --size d12 --repeats 2 --dir /tmp/ckpt --out "$R/checkpoint_d12_cuda.json"
# d12 on the bench pack at equal tokens (100 steps x 131,072 tokens): attention vs PoM, and the
# optimizer comparison (muon = the attention run).
COMMON="data=bench $D training.max_steps=${SUITE_STEPS:-100} training.cooldown_steps=40 training.eval_every=100000 training.eval_tokens=2000000 training.progress_bar=false training.checkpoint_every=0 training.export_safetensors=false training.compile_warmup_steps=3"
run python3 benchmarks/speedrun.py --name transformer_muon --out "$R/d12_transformer_muon.json" experiment=transformers_baseline $COMMON
run python3 benchmarks/speedrun.py --name pomgpt_muon --out "$R/d12_pomgpt_muon.json" experiment=pomgpt_baseline $COMMON
run python3 benchmarks/speedrun.py --name transformer_adamw --out "$R/d12_transformer_adamw.json" experiment=transformers_baseline optimizer=adamw $COMMON
run python3 benchmarks/speedrun.py --name transformer_soap --out "$R/d12_transformer_soap.json" experiment=transformers_baseline optimizer=soap $COMMON
rm -rf "$R"
