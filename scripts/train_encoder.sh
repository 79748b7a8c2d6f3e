#!/usr/bin/env bash
# Train, or continue, the pooled LM encoder on this machine's CPU with the recipe of docs/encoder.md, in pieces:
#
#   WALL=5400 bash scripts/train_encoder.sh        # stops after WALL seconds (SIGTERM: the step ends, it saves)
#
# The run lives in $RUN (weights, logs, ckpt.pt with the optimizer's state: ~100 MB, not committed). At every stop
# its best weights (bf16 safetensors, ~17 MB) and logs are copied to $KEEP, which is committed: a new machine
# continues from $KEEP (the same batches, the same schedule, a fresh optimizer) when $RUN has no ckpt.pt.
# Extra arguments go to `latentwire train-encoder` after the recipe's (a flag given twice: the last wins).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then  # PY: an interpreter with latentwire installed (the tests'); else the project's venv
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SQUAD_TRAIN=${SQUAD_TRAIN:-${LATENTWIRE_SQUAD_DIR:-../shared/squad}/train-v1.1-first44.json}
RUN=${RUN:-runs/encoder-top2-r4}
KEEP=${KEEP:-training/encoder-top2-r4}
THREADS=${THREADS:-0}   # torch threads (0: one per core); 1 when another heavy job shares the machine
WALL=${WALL:-0}         # seconds before SIGTERM (0: none)
RECIPE=(--enc-tune top --enc-top-layers 2 --enc-cache-bottom --enc-batch 8 --enc-steps-a 100 --enc-steps-b 1900
        --enc-recon-tokens 64 --enc-eval-every 50 --enc-ckpt-every 25 --enc-threads "$THREADS")
resume=()
if [ -f "$RUN/ckpt.pt" ]; then
  resume=(--resume)
elif [ -f "$KEEP/encoder.json" ]; then
  echo "continuing from $KEEP (its weights; a fresh optimizer)"
  mkdir -p "$RUN"
  cp "$KEEP"/* "$RUN"/
  resume=(--resume)
fi
cmd=("$PY" -m latentwire train-encoder --squad-train "$SQUAD_TRAIN" "${RECIPE[@]}" "${resume[@]}" --out "$RUN" "$@")
rc=0
if [ "$WALL" != 0 ]; then
  timeout -s TERM -k 120 "$WALL" "${cmd[@]}" || rc=$?
  [ "$rc" = 124 ] && rc=0  # the deadline: training saved what --resume continues
else
  "${cmd[@]}" || rc=$?
fi
if [ -f "$RUN/encoder.json" ]; then  # what a new machine needs to continue, and what the record shows
  mkdir -p "$KEEP"
  rm -f "$KEEP"/encoder-*.safetensors
  for f in "$RUN"/encoder-*.safetensors "$RUN"/encoder.json "$RUN"/config.json "$RUN"/train_log.jsonl \
           "$RUN"/heldout.jsonl "$RUN"/train_summary.json; do
    [ -f "$f" ] && cp "$f" "$KEEP"/
  done
  echo "kept $KEEP: $(du -sh "$KEEP" | cut -f1)"
fi
exit "$rc"
