#!/usr/bin/env bash
# Set up, then run the main job on the embedded default model and the
# built-in synthetic QA set (offline). Extra arguments go to `latentwire run`;
# without --out, each call gets a fresh run folder runs/run-YYYYmmdd-HHMMSS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case " $* " in
  *" --out "*|*" --out="*) exec .venv/bin/latentwire run "$@" ;;
  *) exec .venv/bin/latentwire run --out "runs/run-$(date +%Y%m%d-%H%M%S)" "$@" ;;
esac
