"""Stage 1, the seed's system: every token's embedding as PCA codes + a quantizer, read back by an adapter.
On two layers:
* the model a pipeline loads -- the adapters (adapters.py) -- sits below latentwire.pipelines
  (latentwire/pipelines/stage1.py builds the `stage1` kind from it);
* its training -- Phase 1 / Phase 2 (train.py), their loss terms (losses.py), Stage 1's part of a run
  (stage1.py) and its diagnostics (diagnose.py) -- sits above the pipelines and the evaluation's generation
  path (latentwire/evaluation/generate.py), which it trains and scores through.

May import: adapters.py: latentwire.wire, latentwire.config, latentwire.util, latentwire.errors; the training
modules: also latentwire.pipelines, latentwire.evaluation.generate, latentwire.llm, latentwire.data.
Imported by: adapters.py by latentwire.pipelines; the training by latentwire.evaluation.run (Stage 1's part of a
run) and latentwire.encoder (the v0.1 compressor and the pooled encoder reuse train.py's checkpoint/step helpers).
"""
