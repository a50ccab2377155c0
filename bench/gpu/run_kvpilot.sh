#!/usr/bin/env bash
# One device call: install, check every kernel against its reference, then time kvpilot.
# Usage (device tool, from the repo root, carrying .whl): bash bench/gpu/run_kvpilot.sh STEP...
# Steps: kernels (checks, then the decode/prefill sweeps), profile (decode step breakdown), offline, serve,
# moe-kernels (bench/fused_moe.py on SHAPE), moe-tune (bench/tune_fused_moe.py on SHAPE: writes the tile table).
# offline takes SHAPE, WORKLOADS and DECODE_BATCHES, e.g. issue 15's MoE targets:
#   SHAPE=qwen3-30b-a3b WORKLOADS=decode,random DECODE_BATCHES=1,64 bash bench/gpu/run_kvpilot.sh offline
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-cache
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    kernels) KVPILOT_SWEEP_BUDGET_S=${SWEEP_S:-90} timeout -k 5 200 python3 bench/kernels.py 2>&1 | grep -v "^check" | tail -25 ;;
    profile) timeout -k 5 150 python3 -m bench.profile_decode 2>&1 | tail -6 ;;
    offline) timeout -k 5 ${OFFLINE_S:-300} python3 -m bench.side_by_side offline --engine kvpilot \
               --shape ${SHAPE:-llama-3.1-8b} --workloads ${WORKLOADS:-decode,nano,random,prefix,mixed} \
               --decode-batches ${DECODE_BATCHES:-1,128} --name side-by-side-offline-kvpilot${SHAPE:+-$SHAPE} 2>&1 \
               | grep -v Warn | tail -12 ;;
    moe-kernels) timeout -k 5 300 python3 bench/fused_moe.py --shape ${SHAPE:-qwen3-30b-a3b} 2>&1 | tail -8 ;;
    moe-tune) timeout -k 5 560 python3 bench/tune_fused_moe.py --shape ${SHAPE:-qwen3-30b-a3b} \
                --budget-s ${TUNE_S:-500} 2>&1 | tail -24 ;;
    serve) timeout -k 5 330 python3 -m bench.side_by_side serve --engine kvpilot --rates ${RATES:-8,16,32,48} --cold-seconds ${COLD:-30} 2>&1 | tail -12 ;;
    *) echo "unknown step $step" ;;
  esac
done
cp bench/results/side-by-side-*.json bench/results/kernels.json bench/results/profile_decode.json \
   bench/results/fused-moe-*.json bench/results/tune-fused-moe-*.json "$OUT"/ 2>/dev/null
cp serve-*.log "$OUT"/ 2>/dev/null
ls "$OUT"
