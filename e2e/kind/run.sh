#!/usr/bin/env bash
# The e2e scenarios on a kind cluster (set up as README.md says). One summary line per scenario.
# Traffic: the `load` Job (kvpilot bench serve) streams through the stable Service during each step.
set -euo pipefail
cd "$(dirname "$0")"

st() { kubectl get isvc demo -o "jsonpath={.status.$1}"; }
secs_until() {  # TIMEOUT WHAT COMMAND...: prints the seconds it took, or fails the run
  local timeout=$1 what=$2 start=$SECONDS; shift 2
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS - start > timeout )); then echo "[FAIL] timed out waiting for $what" >&2; exit 1; fi
    sleep 1
  done
  echo $(( SECONDS - start ))
}
phase_is() { [[ "$(st phase)" == "$1" ]]; }
active_is_not() { local a; a=$(st activeRevision); [[ -n "$a" && "$a" != "$1" ]]; }
start_load() {
  kubectl delete job load --ignore-not-found --wait >/dev/null
  kubectl apply -f load.yaml >/dev/null
}
summary() {  # NAME READY SWITCH ALLOWED_FAILURES: waits for the load Job, prints its line
  kubectl wait --for=condition=complete job/load --timeout=600s >/dev/null
  local line sent failed
  line=$(kubectl logs job/load | grep '^requests:')
  failed=$(sed -E 's/requests: ([0-9]+) completed, ([0-9]+) failed.*/\2/' <<<"$line")
  sent=$(( $(sed -E 's/requests: ([0-9]+) completed.*/\1/' <<<"$line") + failed ))
  local verdict=PASS; (( failed <= $4 )) || verdict=FAIL
  echo "[$verdict] $1: requests $sent sent / $failed failed | time to Ready ${2} | time to switch ${3} | $line"
  [[ $verdict == PASS ]]
}

kubectl apply -f isvc.yaml >/dev/null
ready=$(secs_until 300 "phase Ready" phase_is Ready)s
start_load
secs_until 120 "SLOMet evaluated" bash -c \
  "kubectl get isvc demo -o jsonpath='{.status.conditions[?(@.type==\"SLOMet\")].status}' | grep -qx True" >/dev/null
summary "apply -> Ready, SLOMet" "$ready" n/a 0

# Tuning: the harness's study (e2e/scenarios.py TUNING); then pin the best knobs and switch tuning off (no rollout).
old=$(st activeRevision); start_load
kubectl patch isvc demo --type merge -p '{"spec":{"tuning":{"enabled":true,"maxTrials":4,"trialDurationSeconds":10,
  "searchSpace":{"gpuMemoryUtilization":{"fixed":0.9},"maxNumSeqs":{"min":2,"max":8},"maxNumBatchedTokens":{"min":64,"max":8192}},
  "workload":{"inputTokens":{"kind":"fixed","mean":24},"outputTokens":{"kind":"fixed","mean":8},
  "requestRate":{"requestsPerSecond":4}}}}}' >/dev/null
tuned=$(secs_until 900 "Tuned=True" bash -c \
  "kubectl get isvc demo -o jsonpath='{.status.conditions[?(@.type==\"Tuned\")].status}' | grep -qx True")s
trials=$(st tuning.trialsRun); best=$(kubectl get isvc demo -o jsonpath='{.status.tuning.best.config}')
(( trials >= 4 )) || { echo "[FAIL] tuning: only $trials trials"; exit 1; }
seqs=$(st engineConfig.maxNumSeqs); chunk=$(st engineConfig.maxNumBatchedTokens); active=$(st activeRevision)
kubectl patch isvc demo --type merge -p "{\"spec\":{\"engine\":{\"maxNumSeqs\":$seqs,\"maxNumBatchedTokens\":$chunk},
  \"tuning\":{\"enabled\":false}}}" >/dev/null
secs_until 60 "tuning switched off" bash -c "[[ -z \"\$(kubectl get isvc demo -o jsonpath='{.status.tuning}')\" ]]" >/dev/null
[[ "$(st activeRevision)" == "$active" ]] || { echo "[FAIL] pinning the tuned knobs started a rollout"; exit 1; }
summary "tuning >= 4 trials -> best promoted ($trials trials, $old -> $active, best $best)" n/a "$tuned" 0

old=$(st activeRevision); start_load
kubectl patch isvc demo --type merge -p '{"spec":{"model":{"revision":"r2"}}}' >/dev/null
summary "upgrade -> blue-green switch" n/a "$(secs_until 300 switch active_is_not "$old")s" 0

active=$(st activeRevision); start_load
kubectl patch isvc demo --type merge -p \
  '{"spec":{"model":{"uri":"/models/missing","revision":"r3"},"rollout":{"readyTimeoutSeconds":30}}}' >/dev/null
secs_until 120 rollback bash -c "[[ -n \"\$(kubectl get isvc demo -o jsonpath='{.status.failedRevision}')\" ]]" >/dev/null
[[ "$(st activeRevision)" == "$active" ]] || { echo "[FAIL] active revision changed on a broken candidate"; exit 1; }
summary "broken revision -> rollback" n/a n/a 0
kubectl patch isvc demo --type merge -p \
  '{"spec":{"model":{"uri":"demo","revision":"r2"},"rollout":{"readyTimeoutSeconds":120}}}' >/dev/null
secs_until 120 "Ready again" phase_is Ready >/dev/null

old=$(st activeRevision); start_load
kubectl patch isvc demo --type merge -p '{"spec":{"model":{"revision":"r4"}}}' >/dev/null
secs_until 60 "the rollout to start" bash -c "[[ -n \"\$(kubectl get isvc demo -o jsonpath='{.status.candidateRevision}')\" ]]" >/dev/null
kubectl -n kvpilot-system delete pod -l app.kubernetes.io/name=kvpilot --grace-period=0 --force >/dev/null
summary "operator restarted mid-rollout" n/a "$(secs_until 300 switch active_is_not "$old")s" 0

kubectl patch isvc demo --type merge -p '{"spec":{"replicas":2}}' >/dev/null
rev=$(st activeRevision)
kubectl rollout status "deployment/demo-$rev" --timeout=300s >/dev/null
start_load; sleep 10
victim=$(kubectl get pod -l "kvpilot.dev/revision=$rev" -o jsonpath='{.items[0].metadata.name}')
kubectl delete pod "$victim" --grace-period=0 --force >/dev/null
t=$(secs_until 300 "a replacement" kubectl rollout status "deployment/demo-$rev" --timeout=5s)s
summary "engine pod killed under load (only its in-flight requests may fail)" "$t" n/a 2
kubectl patch isvc demo --type merge -p '{"spec":{"replicas":1}}' >/dev/null

kubectl delete job load --ignore-not-found --wait >/dev/null
sed -e 's/"4", --max-concurrency, "2", --num-prompts, "400"/inf, --max-concurrency, "32", --num-prompts, "64"/' \
  -e 's/"4", "4",/"16", "16",/' load.yaml | kubectl apply -f - >/dev/null
kubectl wait --for=condition=complete job/load --timeout=300s >/dev/null
line=$(kubectl logs job/load | grep '^requests:')
rest=$(sed -E "s/'(429|503)': [0-9]+//g" <<<"$line")
if [[ "$rest" != "$line" && "$rest" != *"'"* ]]; then
  echo "[PASS] overload: refused only with 429/503 | $line"
else
  echo "[FAIL] overload: expected refusals with 429/503 and nothing else | $line"; exit 1
fi
