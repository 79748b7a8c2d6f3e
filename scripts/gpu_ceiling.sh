#!/usr/bin/env bash
# The per-paragraph ceiling (benchmarks/ceiling.py) on one CUDA GPU, on the
# full question set of the first CONTEXTS evaluation paragraphs (103 = the
# first 500 questions' paragraphs, articles round-robin): the four kinds side
# by side (one process each: the loops are overhead-bound and share a GPU
# well), then one table from the finished runs (ceiling.py --merge). One archive OUT.tgz at
# the end (a device that returns few files returns this one).
#   bash scripts/gpu_ceiling.sh SQUAD_TRAIN SQUAD_EVAL [OUT]
# env: CONTEXTS (103), LIMIT (seconds before the runs are stopped; 540), PY.
# NOT run yet: no device was lent to the session that wrote it (docs/gpu.md).
source "$(dirname "$0")/gpu_env.sh"  # cd to the root, PY, env, CUDA or exit 1
T=$1; E=$2; O=${3:-runs/gpu_ceiling}; N=${CONTEXTS:-103}; LIMIT=${LIMIT:-540}
mkdir -p "$O"
t0=$SECONDS
for k in opt-kv-use opt-emb-use opt-kv-copy opt-emb-copy; do
  timeout "$LIMIT" $PY benchmarks/ceiling.py --squad-train "$T" --squad-eval "$E" --contexts "$N" --kinds "$k" \
      --out "$O/$k" --no-progress > "$O/$k.log" 2>&1 &
done
while [ -n "$(jobs -r)" ]; do sleep 30; echo "t=$((SECONDS - t0)) s"; done
wait
for f in "$O"/*.log; do echo "== $f"; tail -n 30 "$f"; done
done_runs=$(for k in opt-kv-use opt-emb-use opt-kv-copy opt-emb-copy; do [ -f "$O/$k/metrics.json" ] && echo "$O/$k"; done)
# shellcheck disable=SC2086  # one folder per word
[ -n "$done_runs" ] && $PY benchmarks/ceiling.py --merge $done_runs --md "$O/ceiling.md" | tee "$O/merged.txt"
echo "all done in $((SECONDS - t0)) s"
tar czf "$O.tgz" --exclude='*.pt' -C "$(dirname "$O")" "$(basename "$O")"
