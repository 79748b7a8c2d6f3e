#!/usr/bin/env bash
# The learned sequence compressor at r = 4 on one GPU: four trainings side by
# side (the loops are overhead-bound, so they share the GPU well), each with
# its own evaluation on the same dev questions, to see what limits it
# (README, "What limited it"):
#   steps300     --seq-preset default (300 steps of 8 from 2,000 questions)
#   steps$LONG   the same, --seq-steps $LONG (default 1000)
#   pretrain300  300 autoencoding steps first (--seq-pretrain-steps 300), then the 300 QA steps
#   float256     no wire bottleneck: 256 dims x 32-bit floats per latent
#   bash scripts/gpu_seq_steps.sh SQUAD_TRAIN SQUAD_EVAL [OUT]
# env: MODEL (smollm2-135m), NQ (500 questions), LONG (1000), PY (python3 or .venv/bin/python).
# fp32 so that the text pipeline's answers equal the CPU runs'. Each run's
# s/question is measured with the other three on the GPU (not a timing).
source "$(dirname "$0")/gpu_env.sh"  # cd to the root, PY, env, CUDA or exit 1
T=$1; E=$2; O=${3:-runs/gpu_seq}; LONG=${LONG:-1000}
C=($PY -m latentwire run --model "${MODEL:-smollm2-135m}" --device cuda --dtype float32 --no-stage1
   --sequence learned --sequence-ratios 4 --seq-ratio 4 --seq-preset default --max-eval "${NQ:-500}"
   --squad-train "$T" --squad-eval "$E" --no-progress --overwrite --no-lm-code-length --ac-contexts 0)
mkdir -p "$O"
t0=$SECONDS
"${C[@]}" --out "$O/steps300" > "$O/steps300.log" 2>&1 &
"${C[@]}" --seq-steps "$LONG" --out "$O/steps$LONG" > "$O/steps$LONG.log" 2>&1 &
"${C[@]}" --seq-pretrain-steps 300 --out "$O/pretrain300" > "$O/pretrain300.log" 2>&1 &
"${C[@]}" --seq-dim 256 --seq-bits 32 --out "$O/float256" > "$O/float256.log" 2>&1 &
while [ -n "$(jobs -r)" ]; do sleep 30; echo "t=$((SECONDS - t0)) s"; done
wait
for f in "$O"/*.log; do echo "== $f"; grep -E "^\| (text|learned)|seq reference|seq compressor" "$f"; done
echo "all done in $((SECONDS - t0)) s"
# one archive of the results (a device that returns few files returns this one)
tar czf "$O.tgz" --exclude='*.pt' -C "$(dirname "$O")" "$(basename "$O")"
