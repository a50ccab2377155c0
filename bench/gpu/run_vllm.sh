#!/usr/bin/env bash
# The fourth of four device calls (../shared/peers/README.md): install vLLM 0.26.0 from the parts the first
# three left in /tmp/peer, then run the same side-by-side workloads against it. Carry .peer/p3 and .whl.
# offline takes SHAPE, WORKLOADS, DECODE_BATCHES, PRECISION and NAME as run_kvpilot.sh does; moe-kernels times
# kvpilot's fused MoE kernels with vLLM's fused_experts beside them on the same inputs. Results go back as one
# archive, $OUT/vllm-<steps>.tgz.
set -uo pipefail
: "${KVPILOT_COMMIT:?set KVPILOT_COMMIT=<git rev-parse HEAD> on the device call (the .git of the machine can lag the tree it runs)}"
export KVPILOT_COMMIT
if [ ! -d /tmp/vsite/vllm ]; then
  mkdir -p /tmp/peer/p3 && cp .peer/p3/* /tmp/peer/p3/ && (cd /tmp/peer && cp p3/SHA256SUMS . && sha256sum -c --quiet SHA256SUMS \
    && cat p0/part-* p1/part-* p2/part-* p3/part-* | tar -xf - \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vsite wheels/*.whl) || { echo "vllm install failed"; exit 1; }
fi
if [ ! -f /tmp/kvpilot-installed ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || { echo "kvpilot install failed"; exit 1; }
  touch /tmp/kvpilot-installed
fi
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
RETURN=${OUT:-/tmp/out}; unset OUT
STARTED=$(mktemp)
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    offline) PYTHONPATH=/tmp/vsite timeout -k 5 "${OFFLINE_S:-330}" python3 -m bench.side_by_side offline --engine vllm \
               --shape "${SHAPE:-llama-3.1-8b}" --workloads "${WORKLOADS:-decode,nano,random,prefix,mixed}" \
               --decode-batches "${DECODE_BATCHES:-1,128}" ${PRECISION:-} \
               --name "${NAME:-side-by-side-offline-vllm-${SHAPE:-llama-3.1-8b}}" 2>&1 | grep -v -i "warn\|INFO" ;;
    moe-kernels) PYTHONPATH=/tmp/vsite timeout -k 5 "${MOE_S:-300}" python3 bench/fused_moe.py --shape "${SHAPE:-qwen3-30b-a3b}" \
                   2>&1 | grep -v -i "warn\|INFO" ;;
    serve) PYTHONPATH=/tmp/site timeout -k 5 360 python3 -m bench.side_by_side serve --engine vllm \
             --rates "${RATES:-8,16,32,48}" --ready-timeout 200 --log-dir /tmp 2>&1 | tail -10 ;;
    *) echo "unknown step $step" ;;
  esac
done
mkdir -p "$RETURN"
find bench/results /tmp -maxdepth 1 -type f \( -name "*.json" -o -name "*.log" \) -newer "$STARTED" > /tmp/returned.txt
tar -czf "$RETURN/vllm-$(date +%H%M%S)-$(IFS=-; echo "$*").tgz" -T /tmp/returned.txt && cat /tmp/returned.txt
