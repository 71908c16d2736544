#!/bin/bash
# kvflow vs stock SGLang on the lent GPU machine, one call per setting.
#
# Prepare here (machine with PyPI):   make gpukit
# Run there (repo root, carry [".gpukit"]):
#   bash benchmarks/gpu/device_compare.sh 2>&1 | tee "$OUT/device.log"
# Results (JSON, markdown, PNG, partial results and server log tails) land in $OUT/results.
# The device copy has no .git: prefix KVFLOW_COMMIT=<git rev-parse HEAD here> so each result
# JSON records the commit it measured (kvflow/harness/provenance.py).
# Check first, anywhere (touches nothing: no nvidia-smi, pip, symlink, metadata or servers):
#   DRY_RUN=1 SETTINGS=abc bash benchmarks/gpu/device_compare.sh
# prints the plan and, per setting, one line `DRY_RUN compare: python3 -m benchmarks.compare ...`
# with the arguments shell-quoted (printf %q), exactly as the run would start them.
#
# Settings (SETTINGS: any sequence of a, b, c, run in that order; default ab). Each starts the
# CONFIGS servers side by side on the one GPU and runs the workload on them in turn:
#   (a) one sequential 10-agent workflow, fixed / dynamic / output = 8192 / 32 / 32, --hicache-ratio 4;
#   (b) 32 concurrent 4-agent workflows, fixed 1024, dynamic = output = 256, --hicache-ratio 3;
#   (c) the same as (b) with 64 concurrent workflows (gpu-concurrent-64x1024).
# Configurations (CONFIGS, default lru,lru-hicache,kvflow-hicache,ideal): GPU-only LRU, stock
# HiCache LRU, kvflow on both tiers, and the all-on-GPU ideal; they run in the order named, so
# when a timeout cuts a setting short the first ones have finished (partial.json keeps them).
# REPEATS (default 1) interleaved repeats; NAME_SUFFIX is appended to the result names (for
# settings split over several calls).
#
# Time (H200, 2026-11-27; one device call runs at most 600 s, one session has 15 minutes of
# device time including the machine's start):
#   (a) measured: 160 s with four configurations (server start ~60 s).      TIMEOUT_A=200
#   (b) measured: 60 s start, then 80-90 s per configuration: four ~ 60 + 4 x 85 = 400 s.
#       TIMEOUT_B defaults to 90 + 100 x configurations (490 s for four, 290 s for two).
#   (c) an ESTIMATE, not measured: each configuration roughly twice (b)'s, ~175 s (the same
#       decode steps at twice the batch, twice the prefill; could be less if decode stays
#       overhead-bound), so four ~ 60 + 4 x 175 = 760 s: more than one call.
#       TIMEOUT_C defaults to 90 + 190 x configurations (470 s for two).
#   On top of the timeouts: ~10 s of setup (nvidia-smi, pip from the bundle) and ~10 s per
#   setting to stop its servers, so the chosen settings' timeouts must sum to <= ~570 s.
# Memory (Llama-3.1-8B shape: 15 GB of weights per server, 128 KiB of KV per token):
#   (c) pools 150,732 tokens (18.4 GiB) per configuration and 491,520 (60 GiB) for the ideal,
#   --hicache-ratio 3 pins 55 GiB of host memory per host-tier server. Four servers side by
#   side need 4 x 15 + 3 x 18.4 + 60 = 175 GB of GPU memory (the H200 has ~139 GiB), two
#   host-tier servers 110 GiB of the machine's 128 GiB: so (c) takes at most two servers and
#   at most one with a host tier per call; the script refuses other CONFIGS for (c) unless
#   FORCE=1. (b) is half of all that: four servers fit (it ran so).
# So 32 and 64 workflows with all four configurations do not fit in one call (400 s + 760 s,
# and (c) cannot hold the four servers at once). Recommended, one call each (~400-410 s, so
# one per session):
#   SETTINGS=b                                                  # 32 workflows, all four
#   SETTINGS=c CONFIGS=kvflow-hicache,lru NAME_SUFFIX=-kvflow   # 64 workflows, kvflow and GPU-only
#   SETTINGS=c CONFIGS=lru-hicache,ideal NAME_SUFFIX=-stock     # 64 workflows, HiCache and ideal
# The one call that holds both counts (540 s of timeouts + ~30 s): (b) 60 + 2 x 85 = 230 s
# finishes; (c) finishes both only if a configuration takes <= 120 s (1.4 x (b)), else the
# first (kvflow-hicache) alone, which at least measures (c)'s time per configuration:
#   SETTINGS=bc CONFIGS=kvflow-hicache,lru TIMEOUT_B=240 TIMEOUT_C=300
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/kvflow_gpu_out}
K=.gpukit
DRY_RUN=${DRY_RUN:-0}
ts() { echo "[+$(( $(date +%s) - START ))s] $*"; }

SETTINGS=${SETTINGS:-ab}
CONFIGS=${CONFIGS:-lru,lru-hicache,kvflow-hicache,ideal}
REPEATS=${REPEATS:-1}
NAME_SUFFIX=${NAME_SUFFIX:-}
IFS=, read -ra CONFIG_LIST <<< "$CONFIGS"
NCONFIGS=${#CONFIG_LIST[@]}
HOST_TIERS=0
for c in "${CONFIG_LIST[@]}"; do [[ $c == *hicache* ]] && HOST_TIERS=$((HOST_TIERS + 1)); done
TIMEOUT_A=${TIMEOUT_A:-200}
TIMEOUT_B=${TIMEOUT_B:-$(( 90 + 100 * NCONFIGS ))}
TIMEOUT_C=${TIMEOUT_C:-$(( 90 + 190 * NCONFIGS ))}
CALL_BUDGET=570  # of a device call's 600 s, what the settings' timeouts may take together

# The plan, checked before anything touches the machine.
if [[ ! $SETTINGS =~ ^[abc]+$ ]]; then
  echo "SETTINGS=$SETTINGS: expected a sequence of a, b and c (e.g. b, bc, abc)" >&2
  exit 2
fi
total=0 plan=""
for ((i = 0; i < ${#SETTINGS}; i++)); do
  s=${SETTINGS:i:1}
  t_var=TIMEOUT_${s^^}
  total=$(( total + ${!t_var} )) plan+=" $s ${!t_var}s"
done
ts "plan:$plan, $total s of timeouts in all; CONFIGS=$CONFIGS REPEATS=$REPEATS"
(( total > CALL_BUDGET )) && ts "warning: over ${CALL_BUDGET}s: more than one device call (600 s) holds"
if [[ $SETTINGS == *c* ]] && (( NCONFIGS > 2 || HOST_TIERS > 1 )); then
  msg="(c) holds at most two servers, at most one with a host tier (see the header), CONFIGS=$CONFIGS"
  if [[ ${FORCE:-0} == 1 || $DRY_RUN == 1 ]]; then
    ts "warning: $msg"
  else
    echo "$msg; FORCE=1 runs it anyway" >&2
    exit 2
  fi
fi

if [[ $DRY_RUN != 1 ]]; then
  mkdir -p "$OUT/results"
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
fi

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
  local name=$5$NAME_SUFFIX
  local cmd=(python3 -m benchmarks.compare --workload "$3" --params "$4"
    --configs "$CONFIGS" --repeats "$REPEATS" --pool-fraction 0.45 --out-dir "$OUT/results"
    --name "$name" -- "${FLAGS[@]}" --hicache-ratio "$6")
  if [[ $DRY_RUN == 1 ]]; then
    ts "$1, timeout ${2}s"
    printf 'DRY_RUN compare:'; printf ' %q' "${cmd[@]}"; printf '\n'
    return 0
  fi
  ts "$1"
  local rc i timed_out=0 deadline=$(( $(date +%s) + $2 ))
  "${cmd[@]}" &
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
  local logs="$OUT/results/logs/$name"  # flattened: the device tool does not return deep folders
  cp "$logs/partial.json" "$OUT/results/$name.partial.json" 2>/dev/null
  for f in "$logs"/*.log; do tail -n 300 "$f" > "$OUT/results/$name.$(basename "$f")"; done
}
setting_a() {
  compare "(a) sequential 10 agents, 8192/32/32" "$TIMEOUT_A" sequential \
    "{\"fixed_len\": 8192, \"rounds\": 1, \"vocab\": $VOCAB}" gpu-sequential-8192 4
}
setting_b() {
  compare "(b) 32 concurrent workflows, 1024/256/256" "$TIMEOUT_B" concurrent \
    "{\"workflows\": 32, \"fixed_len\": 1024, \"rounds\": 1, \"vocab\": $VOCAB}" gpu-concurrent-32x1024 3
}
setting_c() {
  compare "(c) 64 concurrent workflows, 1024/256/256" "$TIMEOUT_C" concurrent \
    "{\"workflows\": 64, \"fixed_len\": 1024, \"rounds\": 1, \"vocab\": $VOCAB}" gpu-concurrent-64x1024 3
}

for ((i = 0; i < ${#SETTINGS}; i++)); do
  "setting_${SETTINGS:i:1}"
done
ts "end"
