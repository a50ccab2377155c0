#!/usr/bin/env bash
# One device call: install (once per machine), check every kernel against its reference, then time kvpilot.
# Usage (device tool, from the repo root, carrying .whl): bash bench/gpu/run_kvpilot.sh STEP...
# Steps:
#   checks       bench/kernel_checks.py: every Triton kernel (bf16/fp16/fp32, FP8, fused MoE) against its reference.
#                Each later timing step runs only if the families it uses passed here (core, fp8, moe).
#   kernels      the attention sweeps (bench/kernels.py); profile: the decode step breakdown
#   fp8-gemm     bench/fp8_gemm.py: scaled_mm vs Triton vs bf16 per 8B projection
#   structured   bench/structured.py on the 8B shape with a 128k-token tokenizer (bench/large_vocab.py)
#   offline      bench.side_by_side offline; SHAPE, WORKLOADS, DECODE_BATCHES, PRECISION (e.g. "--quantization fp8"),
#                ENGINE_ARGS (e.g. "--engine-arg max_num_seqs=1024") and NAME choose the run
#   moe-kernels, moe-tune   bench/fused_moe.py and bench/tune_fused_moe.py on SHAPE (the tune writes the tile table;
#                TUNE_TOKENS, e.g. 16,64,256,1024,4096, tunes fewer token counts: a batch takes the nearest one's tiles)
#   moe-gemv-tune           bench/tune_moe_gemv.py on SHAPE: the few-token MoE kernels' tiles (GEMV_S seconds)
#   Tables go to $KVPILOT_FUSED_MOE_CONFIGS when set (e.g. /tmp/moe-configs: later calls on this machine read
#   them there), else kernels/fused_moe_configs/; either folder goes back in the archive.
#   serve        bench.side_by_side serve
# Results stay in bench/results/ and go back as one archive, $OUT/kvpilot-<steps>.tgz (the tool returns 8 files).
set -uo pipefail
: "${KVPILOT_COMMIT:?set KVPILOT_COMMIT=<git rev-parse HEAD> on the device call (the .git of the machine can lag the tree it runs)}"
export KVPILOT_COMMIT
if [ ! -f /tmp/kvpilot-installed ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || { echo "wheels failed"; exit 1; }
  PYTHONPATH=/tmp/site python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || { echo "install failed"; exit 1; }
  touch /tmp/kvpilot-installed
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-cache
RETURN=${OUT:-/tmp/out}; unset OUT  # the scripts write to bench/results only; the archive goes back
OK=/tmp/kvpilot-checks-ok
STARTED=$(mktemp) # what this call wrote is what is newer than this file
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
verified() {  # verified FAMILY...: every family's checks passed on this machine
  for f in "$@"; do [ -f "$OK/$f" ] || { echo "skipped: the $f kernel checks have not passed on this machine"; return 1; }; done
}
offline() {
  timeout -k 5 "${OFFLINE_S:-300}" python3 -m bench.side_by_side offline --engine kvpilot --shape "${SHAPE:-llama-3.1-8b}" \
    --workloads "${WORKLOADS:-decode,nano,random,prefix,mixed}" --decode-batches "${DECODE_BATCHES:-1,128}" \
    ${PRECISION:-} ${ENGINE_ARGS:-} --name "${NAME:-side-by-side-offline-kvpilot-${SHAPE:-llama-3.1-8b}}" 2>&1 | grep -v Warn
}
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    checks) rm -rf "$OK"; timeout -k 5 "${CHECKS_S:-300}" python3 bench/kernel_checks.py --ok-dir "$OK" ${REUSE:+--reuse "$REUSE"} 2>&1 \
              | grep -v "^ok " ;;
    kernels) verified core && KVPILOT_SWEEP_BUDGET_S=${SWEEP_S:-90} timeout -k 5 200 python3 bench/kernels.py 2>&1 \
               | grep -v "^check" ;;
    profile) verified core && timeout -k 5 "${PROFILE_S:-150}" python3 -m bench.profile_decode --shape "${SHAPE:-llama-3.1-8b}" \
               --batch "${DECODE_BATCHES:-1,128}" --name "${NAME:-profile_decode-${SHAPE:-llama-3.1-8b}}" 2>&1 | tail -6 ;;
    fp8-gemm) verified fp8 && timeout -k 5 "${FP8_S:-240}" python3 bench/fp8_gemm.py 2>&1 | grep -v "^ok " ;;
    structured) verified core && timeout -k 5 60 python3 bench/large_vocab.py --shape llama-3.1-8b --out /tmp/llama-8b-tok \
                  && timeout -k 5 "${STRUCTURED_S:-300}" python3 bench/structured.py --model /tmp/llama-8b-tok \
                     --load-format dummy --batch 64 --kv-cache-gib 12 2>&1 | grep -v Warn ;;
    offline) verified core || continue
             if [ -n "${PRECISION:-}" ]; then verified fp8 || continue; fi
             case ${SHAPE:-} in *a3b* | *mixtral* | *moe*) verified moe || continue ;; esac
             offline ;;
    moe-kernels) verified moe && timeout -k 5 "${MOE_S:-300}" python3 bench/fused_moe.py --shape "${SHAPE:-qwen3-30b-a3b}" 2>&1 ;;
    moe-gemv-tune) verified moe && timeout -k 5 "${GEMV_S:-150}" python3 bench/tune_moe_gemv.py \
                     --shape "${SHAPE:-qwen3-30b-a3b}" --budget-s "$(( ${GEMV_S:-150} - 30 ))" 2>&1 | tail -6 ;;
    moe-tune) verified moe && timeout -k 5 "${TUNE_TIMEOUT_S:-560}" python3 bench/tune_fused_moe.py \
                --shape "${SHAPE:-qwen3-30b-a3b}" --budget-s "${TUNE_S:-500}" ${TUNE_TOKENS:+--tokens "$TUNE_TOKENS"} 2>&1 | tail -24 ;;
    serve) verified core && timeout -k 5 330 python3 -m bench.side_by_side serve --engine kvpilot \
             --rates "${RATES:-8,16,32,48}" --cold-seconds "${COLD:-30}" --log-dir /tmp 2>&1 | tail -12 ;;
    *) echo "unknown step $step" ;;
  esac
done
mkdir -p "$RETURN"
find bench/results "${KVPILOT_FUSED_MOE_CONFIGS:-kernels/fused_moe_configs}" /tmp -maxdepth 1 -type f \( -name "*.json" -o -name "*.log" \) \
  -newer "$STARTED" > /tmp/returned.txt
tar -czf "$RETURN/kvpilot-$(date +%H%M%S)-$(IFS=-; echo "$*").tgz" -T /tmp/returned.txt && cat /tmp/returned.txt
ls -la "$RETURN"
