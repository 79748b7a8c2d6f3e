#!/usr/bin/env bash
# The GPU path, end to end, on one CUDA GPU (README "GPU"). Each step is
# timed and its exit status printed; a failing step does not stop the rest.
#   bash scripts/gpu_check.sh [MODEL] [SQUAD_TRAIN SQUAD_EVAL] [OUT]
# 1-2: the tiny random model in bf16 (Stage 1 + Phase 2 + evaluation; every
#      sequence pipeline incl. the learned compressor) -- catches device and
#      dtype bugs in seconds;
# 3:   the collectives on the backend used under torchrun on GPUs;
# 4:   MODEL (default smollm2-135m; none skips it) in bf16: Phase 1, Phase 2, evaluation.
# PY (default: python3, else .venv/bin/python) runs latentwire.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
M=${1:-smollm2-135m}; T=${2:-}; E=${3:-}; O=${4:-runs/gpu_check}
DATA=(); [ -n "$T" ] && DATA=(--squad-train "$T" --squad-eval "$E")
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
step() {  # name, command...
  local name=$1; shift; local t0=$SECONDS
  echo "== $name: $*"
  "$@"; local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
step tiny_stage1 $PY -m latentwire run --model tiny-random --device cuda --dtype bfloat16 --adapter mlp \
  --epochs 1 --phase2-steps 4 --max-eval 16 --out "$O/tiny_stage1" --overwrite --no-progress
step tiny_seq $PY -m latentwire run --model tiny-random --device cuda --dtype bfloat16 --no-stage1 \
  --sequence truncate,surprisal,meanpool,none,learned --seq-steps 4 --seq-max-questions 32 --max-eval 16 \
  --out "$O/tiny_seq" --overwrite --no-progress
step dist $PY scripts/gpu_dist_check.py
[ "$M" = none ] && exit $status
step model_stage1 $PY -m latentwire run --model "$M" --device cuda --dtype bfloat16 --adapter mlp \
  --phase2-steps 50 --max-eval 200 "${DATA[@]}" --out "$O/stage1_bf16" --overwrite --no-progress
exit $status
