# Shared start of the GPU scripts (sourced, not run): repository root, the
# Python to use, offline and thread settings, and a CUDA device or exit 1.
set -u
cd "$(dirname "${BASH_SOURCE[1]}")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
