#!/usr/bin/env bash
# The pooled LM encoder (docs/encoder.md) in one call of <= 10 minutes on one
# H100/H200: train every encoder named in RUNS side by side (one process each:
# the loop is small and shares a GPU well), each stopped at LIMIT seconds of
# training; evaluate them all in one run on the same NQ questions of
# SQUAD_EVAL beside text, truncation, nothing and their controls (another
# paragraph's vectors, the first-M control when trained, every row split by
# where the answer lies); archive the weights (safetensors <= 15 MB a file),
# encoder.json, the logs, the run's report and metrics in OUT.tgz.
#   bash scripts/gpu_encoder.sh SQUAD_TRAIN SQUAD_EVAL [OUT]
# A second call with the same OUT resumes every unfinished encoder (ckpt.pt,
# or the saved weights when the optimizer state was not archived), so short
# GPU windows add up; a finished one is evaluated again, not retrained.
# env:
#   RUNS   encoders to train, each NAME (default "full first-m lora16 top2"):
#          full | first-m | lora16 | lora64 | top2 | seed1 | r2 | r8 |
#          zDxB (a d_z = D bottleneck at B bits, e.g. z64x8, z32x4, z16x4)
#   LIMIT  training seconds per encoder (default 300); STEPS_A / STEPS_B the
#          schedule (default 285 / 522: the issue's measured run)
#   WALL   the whole script's seconds (default 570: inside a device call's 600): each training
#          process gets SIGTERM at TRAIN_WALL (default WALL - 200; it ends its step and saves,
#          as at LIMIT), the evaluation is stopped 30 s before WALL, so the archives are
#          always written (a second call evaluates what the first could not)
#   NQ     evaluation questions (500); EVAL=0 trains only; MODEL (smollm2-135m); PY; DEVICE (cuda;
#          `cpu` only for the smoke test on the tiny model); EXTRA: more train-encoder flags;
#          POLL: seconds between progress lines (20)
# The default model reaching a machine without internet: docs/gpu.md.
set -u
if [ "${DEVICE:-cuda}" = cuda ]; then
  source "$(dirname "$0")/gpu_env.sh"  # cd to the root, PY, env, CUDA or exit 1
else
  cd "$(dirname "$0")/.."; PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
fi
T=$1; E=$2; O=${3:-runs/gpu_encoder}
RUNS=${RUNS:-"full first-m lora16 top2"}; LIMIT=${LIMIT:-300}; NQ=${NQ:-500}; MODEL=${MODEL:-smollm2-135m}
STEPS_A=${STEPS_A:-285}; STEPS_B=${STEPS_B:-522}; DEVICE=${DEVICE:-cuda}
WALL=${WALL:-570}; TRAIN_WALL=${TRAIN_WALL:-$((WALL - 200))}
# SQUAD_TRAIN "" SQUAD_EVAL "": the built-in synthetic set (the smoke test); DATA_EXTRA goes to both commands
DATA=(${DATA_EXTRA:-}); [ -n "$T" ] && DATA+=(--squad-train "$T" --squad-eval "$E")
mkdir -p "$O"
t0=$SECONDS
flags_of() {  # NAME -> its train-encoder flags
  case "$1" in
    full) echo "" ;;
    first-m) echo "--enc-input first-m" ;;
    lora16) echo "--enc-tune lora --enc-lora-rank 16" ;;
    lora64) echo "--enc-tune lora --enc-lora-rank 64" ;;
    top2) echo "--enc-tune top --enc-top-layers 2" ;;
    seed1) echo "--enc-seed 1" ;;
    r2) echo "--enc-ratio 2" ;;
    r8) echo "--enc-ratio 8" ;;
    z*x*) d=${1#z}; echo "--enc-dz ${d%x*} --enc-bits ${d#*x}" ;;
    *) echo "gpu_encoder.sh: unknown run $1" >&2; return 1 ;;
  esac
}
dirs=()
for r in $RUNS; do
  f=$(flags_of "$r") || exit 2
  resume=""; [ -f "$O/$r/ckpt.pt" ] || [ -f "$O/$r/encoder.json" ] && resume="--resume"
  # shellcheck disable=SC2086  # flags are words
  timeout -s TERM -k 60 "$TRAIN_WALL" $PY -m latentwire train-encoder --model "$MODEL" --device "$DEVICE" "${DATA[@]}" \
      --enc-steps-a "$STEPS_A" --enc-steps-b "$STEPS_B" --enc-time-limit "$LIMIT" $f $resume --no-progress \
      ${EXTRA:-} --out "$O/$r" >> "$O/$r.log" 2>&1 &
  dirs+=("$O/$r")
done
while [ -n "$(jobs -r)" ]; do sleep "${POLL:-20}"; echo "t=$((SECONDS - t0)) s: $(tail -qn1 "$O"/*.log 2>/dev/null | cut -c1-60 | tr '\n' '|')"; done
wait
for r in $RUNS; do echo "== $r"; tail -n 3 "$O/$r.log"; done
done_dirs=$(for d in "${dirs[@]}"; do [ -f "$d/encoder.json" ] && echo "$d"; done | paste -sd, -)
if [ -n "$done_dirs" ] && [ "${EVAL:-1}" = 1 ]; then
  # ratios of the trained encoders, so truncation is there at each (the answer split pairs against it)
  ratios=$(for r in $RUNS; do case $r in r2) echo 2;; r8) echo 8;; *) echo 4;; esac; done | sort -un | paste -sd, -)
  left=$((WALL - (SECONDS - t0) - 30))
  if [ "$left" -gt 30 ]; then
    timeout -k 10 "$left" $PY -m latentwire run --model "$MODEL" --device "$DEVICE" --no-stage1 --pipeline "$done_dirs" \
        --sequence truncate,none --sequence-ratios "$ratios" --max-eval "$NQ" "${DATA[@]}" \
        --no-lm-code-length --ac-contexts 0 --no-progress --overwrite --out "$O/eval" 2>&1 | tee "$O/eval.log" | tail -n 60
  else
    echo "no time left to evaluate ($left s before WALL); a second call with the same OUT evaluates"
  fi
fi
echo "all done in $((SECONDS - t0)) s"
# archives a device returns (at most 8 files of 16 MB): OUT.tgz with everything but weights and optimizer
# states, then OUT-NAME.tgz with one encoder's safetensors where they fit (a LoRA or top-layers encoder does;
# a fully tuned LM's 270 MB do not: its metrics come back, its weights stay)
tar czf "$O.tgz" --exclude='*.pt' --exclude='*.safetensors' -C "$(dirname "$O")" "$(basename "$O")"
for r in $RUNS; do
  [ -f "$O/$r/encoder.json" ] || continue
  size=$(cat "$O/$r"/*.safetensors | wc -c)
  if [ "$size" -le 16000000 ]; then
    tar czf "$O-$r.tgz" -C "$(dirname "$O")" "$(basename "$O")/$r/encoder.json" \
        $(cd "$(dirname "$O")" && ls "$(basename "$O")/$r"/*.safetensors)
  else
    echo "$r: $size bytes of weights: too large to return, left out of the archives"
  fi
done
ls -l "$O"*.tgz
