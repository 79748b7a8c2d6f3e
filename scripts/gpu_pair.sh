#!/usr/bin/env bash
# One wire, two receivers (benchmarks/pair_grid.py) on one GPU, its three
# cells side by side: own_S and own_R start together; wire_R starts as soon as
# own_S has saved its compressor (wire_R loads S's sender from it); then
# pair_grid without --only reuses the three finished cells and prints the table.
#   bash scripts/gpu_pair.sh SQUAD_TRAIN SQUAD_EVAL [OUT]
# env: S (smollm2-135m), R (gemma3-270m), NQ (500 questions), PRESET (quick),
#      LIMIT (seconds before the cells are stopped and what finished is archived; 540),
#      RMAX (R's --receiver-max-prompt-tokens, if its prompts need more), PY (python3 or .venv/bin/python).
# Check the device's transformers first: under 5.17 Gemma-3's GGUF tokenizer converted wrongly (prompts >2.5x
# longer, text F1 1.8 instead of 24; the load prints a tokenizer warning now) -- README, "Two models".
# fp32 so that the text answers equal the CPU runs'. One archive OUT.tgz at the end
# (a device that returns few files returns this one).
source "$(dirname "$0")/gpu_env.sh"  # cd to the root, PY, env, CUDA or exit 1
T=$1; E=$2; O=${3:-runs/pair_grid}; LIMIT=${LIMIT:-540}
left() { echo $(( LIMIT - (SECONDS - t0) > 5 ? LIMIT - (SECONDS - t0) : 5 )); }
G=($PY benchmarks/pair_grid.py --model "${S:-smollm2-135m}" --receiver "${R:-gemma3-270m}"
   --squad-train "$T" --squad-eval "$E" --max-eval "${NQ:-500}" --preset "${PRESET:-quick}" --dtype float32 --out "$O" ${RMAX:+--receiver-max-prompt-tokens $RMAX})
mkdir -p "$O"
t0=$SECONDS  # one deadline for all cells: LIMIT s from here
timeout "$(left)" "${G[@]}" --only own_S > "$O/own_S.log" 2>&1 &
timeout "$(left)" "${G[@]}" --only own_R > "$O/own_R.log" 2>&1 &
while [ ! -f "$O/own_S/seq_compressor.pt" ] && [ -n "$(jobs -r)" ]; do sleep 5; done
echo "own_S compressor after $((SECONDS - t0)) s"
timeout "$(left)" "${G[@]}" --only wire_R > "$O/wire_R.log" 2>&1 &
while [ -n "$(jobs -r)" ]; do sleep 10; echo "t=$((SECONDS - t0)) s"; done
wait
timeout "$(left)" "${G[@]}" --md "$O/results_cmd.md" 2>&1 | tee "$O/table.log"
echo "all done in $((SECONDS - t0)) s"
tar czf "$O.tgz" --exclude='ckpt*.pt' --exclude='seq_cache.pt' -C "$(dirname "$O")" "$(basename "$O")"
