#!/usr/bin/env bash
# Set up, then run the main job on the embedded default model and the
# built-in synthetic QA set (offline). Extra arguments go to `latentwire run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/latentwire run "$@"
