#!/usr/bin/env bash
# Set up, then run the whole test-suite. Real SQuAD is used when
# LATENTWIRE_SQUAD_DIR is set or ../shared/squad exists next to the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${LATENTWIRE_SQUAD_DIR:-}" ] && [ -d ../shared/squad ]; then
  export LATENTWIRE_SQUAD_DIR="$(cd ../shared/squad && pwd)"
fi
exec .venv/bin/python -m pytest -q "$@"
