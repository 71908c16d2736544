#!/bin/bash
# kvflow vs stock SGLang on the lent GPU machine, in one call (about 8 minutes).
#
# Prepare here (machine with PyPI):   make gpukit
# Run there (repo root, carry [".gpukit"]):
#   bash benchmarks/gpu/device_compare.sh 2>&1 | tee "$OUT/device.log"
# Results (JSON, markdown, PNG, server logs) land in $OUT/results.
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
       --enable-cache-report --disable-custom-all-reduce --skip-server-warmup --mem-fraction-static 0.85
       --hicache-ratio 4)  # the host tier holds every fixed prompt (the paper's setting)
CONFIGS=lru,lru-hicache,kvflow-hicache,ideal
VOCAB=128000

SETTINGS=${SETTINGS:-ab}   # which settings to run: a, b or ab
if [[ $SETTINGS == *a* ]]; then
ts "(a) sequential 10 agents, 8192/32/32"
timeout ${TIMEOUT_A:-220} python3 -m benchmarks.compare --workload sequential \
  --params "{\"fixed_len\": 8192, \"rounds\": 1, \"vocab\": $VOCAB}" \
  --configs $CONFIGS --repeats 1 --pool-fraction 0.45 --out-dir "$OUT/results" \
  --name gpu-sequential-8192 -- "${FLAGS[@]}"
ts "(a) rc=$?"; pkill -f kvflow.launch_server; sleep 3
fi

if [[ $SETTINGS == *b* ]]; then
ts "(b) 32 concurrent workflows, 1024/256/256"
timeout ${TIMEOUT_B:-330} python3 -m benchmarks.compare --workload concurrent \
  --params "{\"workflows\": 32, \"fixed_len\": 1024, \"rounds\": 1, \"vocab\": $VOCAB}" \
  --configs $CONFIGS --repeats 1 --pool-fraction 0.45 --out-dir "$OUT/results" \
  --name gpu-concurrent-32x1024 -- "${FLAGS[@]}"
ts "(b) rc=$?"
fi
pkill -f kvflow.launch_server || true
ts "end"
