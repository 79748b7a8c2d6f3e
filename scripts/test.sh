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
# the test files on one worker per core (at most 4; pytest-xdist), a file's tests on one worker, so that a
# module's fixtures are built once; `bash scripts/test.sh -n 0` runs them in this process alone
exec .venv/bin/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile "$@"
