#!/usr/bin/env bash
# Set up, then run the main job on the embedded default model (SmolLM2-135M-Instruct)
# and the built-in synthetic QA set (offline): on the same questions (every question
# of the first 12 evaluation paragraphs), the text,
# the LLM-coded text (ac), truncation and surprisal selection at r = 4 (raw ids
# and arithmetic-coded), nothing, the learned wire shipped for the default
# model (the pooled LM encoder at r = 4, beside another paragraph's vectors),
# and the Stage 1 vocab adapter at 4x. Its report's first table is one row
# per pipeline sorted by bytes.
# Extra arguments go to `latentwire run` after these defaults (a flag given
# twice: the last wins); without --out, each call gets a fresh run folder
# runs/run-YYYYmmdd-HHMMSS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# 12 paragraphs keep it short here: the LLM-coded rows cost one LLM step per token at each end, per paragraph
DEFAULTS=(--pipeline ac,learned --sequence truncate,truncate+ac,surprisal,surprisal+ac,none --sequence-ratios 4 --no-controls
          --max-eval-contexts 12)
case " $* " in
  *" --out "*|*" --out="*) exec .venv/bin/latentwire run "${DEFAULTS[@]}" "$@" ;;
  *) exec .venv/bin/latentwire run "${DEFAULTS[@]}" --out "runs/run-$(date +%Y%m%d-%H%M%S)" "$@" ;;
esac
