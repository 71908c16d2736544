#!/bin/bash
# kvflow vs stock SGLang on the lent GPU machine, one call per setting.
#
# Prepare here (machine with PyPI):   make gpukit
# Run there (repo root, carry [".gpukit"]):
#   bash benchmarks/gpu/device_compare.sh 2>&1 | tee "$OUT/device.log"
# Results (JSON, markdown, PNG, partial results and server log tails) land in $OUT/results.
# Measured on an H200 (2026-11-27): (a) 160 s with its four configurations (server start ~60 s);
# (b) 60 s start, then 80-90 s per configuration: over 6 minutes for four, so run it alone
# (SETTINGS=b) or name fewer configurations (CONFIGS=kvflow-hicache,lru-hicache).
#
# Settings, each with four servers side by side on the one GPU (interleaved runs):
#   (a) one sequential 10-agent workflow, fixed / dynamic / output = 8192 / 32 / 32;
#   (b) 32 concurrent 4-agent workflows, fixed 1024, dynamic = output = 256.
# Configurations: GPU-only LRU, HiCache LRU, kvflow on both tiers, and the all-on-GPU ideal.
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/kvflow_gpu_out}
K=.gpukit
mkdir -p "$OUT/results"
ts() { echo "[+$(( $(date +%s) - START ))s] $*"; }

ts "kvflow GPU comparison"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$K"/whl/*.whl 2>&1 | grep -v "already exists" || true

# kvflow from this checkout: patches/ is installed as kvflow.patches, and SGLang finds the
# plugin through its entry point, which an installed distribution's metadata provides.
ln -sfn ../patches kvflow/patches
META=/tmp/kvflow-meta/kvflow-0.1.0.dist-info
mkdir -p "$META"
printf 'Metadata-Version: 2.1\nName: kvflow\nVersion: 0.1.0\n' > "$META/METADATA"
printf '[sglang.srt.plugins]\nkvflow = kvflow.plugin:load\n' > "$META/entry_points.txt"

export PYTHONPATH=$PWD:/tmp/site:$K/stub:/tmp/kvflow-meta
export PYTHONUNBUFFERED=1 GPUKIT_PATCH=1 SGLANG_FORCE_FUSED_OP_BACKEND=torch
export SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1
export SGLANG_IS_FLASHINFER_AVAILABLE=false
FLAGS=(--model-path "$K/model" --load-format dummy --skip-tokenizer-init --dtype bfloat16
       --attention-backend triton --sampling-backend pytorch --grammar-backend none
       --cuda-graph-backend-decode disabled --cuda-graph-backend-prefill disabled
       --hicache-io-backend direct --hicache-mem-layout layer_first --hicache-write-policy write_through
       --enable-cache-report --disable-custom-all-reduce --skip-server-warmup --mem-fraction-static 0.9)
# --hicache-ratio per setting: the host tier holds every prompt written through to it (the paper's
# setting), so stock HiCache is not made to thrash on the host tier.
CONFIGS=${CONFIGS:-lru,lru-hicache,kvflow-hicache,ideal}
VOCAB=128000

# compare LABEL TIMEOUT_S WORKLOAD PARAMS NAME HICACHE_RATIO
compare() {
  ts "$1"
  timeout "$2" python3 -m benchmarks.compare --workload "$3" --params "$4" \
    --configs "$CONFIGS" --repeats 1 --pool-fraction 0.45 --out-dir "$OUT/results" \
    --name "$5" -- "${FLAGS[@]}" --hicache-ratio "$6"
  ts "$1: rc=$?"
  local logs="$OUT/results/logs/$5"  # flattened: the device tool does not return deep folders
  cp "$logs/partial.json" "$OUT/results/$5.partial.json" 2>/dev/null
  for f in "$logs"/*.log; do tail -n 300 "$f" > "$OUT/results/$5.$(basename "$f")"; done
}
setting_a() {
  compare "(a) sequential 10 agents, 8192/32/32" "${TIMEOUT_A:-200}" sequential \
    "{\"fixed_len\": 8192, \"rounds\": 1, \"vocab\": $VOCAB}" gpu-sequential-8192 4
}
setting_b() {
  compare "(b) 32 concurrent workflows, 1024/256/256" "${TIMEOUT_B:-360}" concurrent \
    "{\"workflows\": 32, \"fixed_len\": 1024, \"rounds\": 1, \"vocab\": $VOCAB}" gpu-concurrent-32x1024 3
}

SETTINGS=${SETTINGS:-ab}   # which settings to run, in this order: a, b, ab or ba
for ((i = 0; i < ${#SETTINGS}; i++)); do
  "setting_${SETTINGS:i:1}"
  pkill -f kvflow.launch_server; sleep 3
done
ts "end"
