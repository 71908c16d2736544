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

# Servers are stopped by PID, never by name: compare.py starts each server as a child of its own
# process, in a session of its own (kvflow.harness.server_process), so the servers this script
# started are exactly the children of the compare process it started. Their PIDs (each its
# server's process-group id, covering SGLang's scheduler and detokenizer) are recorded while
# compare runs; compare stops them itself, and whatever is still running afterwards, or when
# this script exits for any reason, is stopped here: SIGTERM to the group, a wait, then SIGKILL.
COMPARE_PID=""
SERVER_PIDS=()
record_servers() {  # add the children of compare $1 not recorded yet
  local pid known
  for pid in $(pgrep -P "$1" 2>/dev/null); do
    for known in "${SERVER_PIDS[@]}"; do [[ $known == "$pid" ]] && continue 2; done
    SERVER_PIDS+=("$pid")
  done
}
alive() { kill -0 -- "-$1" 2>/dev/null || kill -0 "$1" 2>/dev/null; }
stop_servers() {  # SIGTERM every recorded server still running, wait up to 30 s, then SIGKILL
  local pid left i
  for pid in "${SERVER_PIDS[@]}"; do
    alive "$pid" && { ts "stopping server $pid"; kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"; }
  done
  for ((i = 0; i < 30; i++)); do
    left=0
    for pid in "${SERVER_PIDS[@]}"; do alive "$pid" && left=1; done
    ((left)) || break
    sleep 1
  done
  for pid in "${SERVER_PIDS[@]}"; do
    alive "$pid" && { ts "server $pid still running after 30 s: SIGKILL"; kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; }
  done
  SERVER_PIDS=()
}
cleanup() {
  if [[ -n $COMPARE_PID ]] && kill -0 "$COMPARE_PID" 2>/dev/null; then
    record_servers "$COMPARE_PID"
    kill -TERM "$COMPARE_PID" 2>/dev/null
    wait "$COMPARE_PID" 2>/dev/null
  fi
  COMPARE_PID=""
  stop_servers
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# compare LABEL TIMEOUT_S WORKLOAD PARAMS NAME HICACHE_RATIO
compare() {
  ts "$1"
  local rc i timed_out=0 deadline=$(( $(date +%s) + $2 ))
  python3 -m benchmarks.compare --workload "$3" --params "$4" \
    --configs "$CONFIGS" --repeats 1 --pool-fraction 0.45 --out-dir "$OUT/results" \
    --name "$5" -- "${FLAGS[@]}" --hicache-ratio "$6" &
  COMPARE_PID=$!
  # The time limit `timeout` used to give: SIGTERM at the deadline (compare then stops its
  # servers in its finally blocks; SIGKILL if it has not exited 60 s later), rc 124 as
  # timeout reports it.
  while kill -0 "$COMPARE_PID" 2>/dev/null; do
    record_servers "$COMPARE_PID"
    if (( $(date +%s) >= deadline )); then
      ts "$1: past ${2}s, stopping compare $COMPARE_PID"
      timed_out=1
      kill -TERM "$COMPARE_PID" 2>/dev/null
      for ((i = 0; i < 60; i++)); do kill -0 "$COMPARE_PID" 2>/dev/null || break; sleep 1; done
      kill -KILL "$COMPARE_PID" 2>/dev/null
      break
    fi
    sleep 2
  done
  wait "$COMPARE_PID"; rc=$?
  ((timed_out)) && rc=124
  COMPARE_PID=""
  ts "$1: rc=$rc"
  stop_servers
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
done
ts "end"
