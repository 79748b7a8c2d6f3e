#!/usr/bin/env bash
# Stage what a GPU machine without internet needs, in .dev/ (ignored by git), for
# two back-to-back device calls of <= 64 MiB each (docs/gpu.md):
#   .dev/a/  the first half of the default model's GGUF + wheels the GPU image lacks
#            (gguf, zstandard, constriction; Python 3.12, manylinux x86-64)
#   .dev/b/  the second half + the SQuAD files (train, dev) the scripts read
#   bash scripts/gpu_stage.sh [SQUAD_DIR]     (default ../shared/squad)
set -euo pipefail
cd "$(dirname "$0")/.."
SQ=${1:-../shared/squad}
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
rm -rf .dev && mkdir -p .dev/a/whl .dev/b/squad
G=$(.venv/bin/python -c "from latentwire.llm.models import default_gguf_path; print(default_gguf_path())")
half=$(( ($(stat -c %s "$G") + 1) / 2 ))
head -c "$half" "$G" > .dev/a/model.gguf.1
tail -c +"$((half + 1))" "$G" > .dev/b/model.gguf.2
cp "$SQ"/train-v1.1-first44.json "$SQ"/dev-v1.1-part-a.json .dev/b/squad/
for pkg in "gguf==0.19.0" "zstandard==0.25.0" "constriction==0.5.0"; do
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .dev/a/whl "$pkg"
done
du -sh .dev/a .dev/b
echo "sha256 of the model: $(sha256sum "$G" | cut -c1-16) (the halves join to it: docs/gpu.md)"
