"""The evaluation: a run (run.py) and its sweeps (sweep.py); every pipeline measured on the same questions by
one path (compare.py, answers.py) through the receiving LLM's generation (generate.py); rows, the SQuAD
metric and paired bootstrap deltas (metrics.py); the report and its tables (report.py); run folders (rundir.py);
the probes made from a paragraph (probes.py). On more than one layer:
* generate.py and report.py sit just above latentwire.pipelines (Stage 1's training and the v0.1 compressor
  use them); metrics.py is a leaf anyone above the pipelines may use;
* probes.py sits below the pipelines (the per-paragraph ceiling, latentwire/pipelines/optimized.py, fits on
  its probes); its question probes answer through generate.py -- an exception the layers contract lists;
* answers.py, compare.py and rundir.py sit beside Stage 1's stage of a run and the v0.1 compressor, above
  Stage 1's training; run.py above them all; sweep.py above run.py.

May import: anything below it (pipelines, stage1, encoder's lmenc/seqcomp, wire, llm, util, config, data, errors).
Imported by: latentwire.api, latentwire.cli, latentwire.encoder.lmtrain (which loads data as a run does); lower
layers import only generate.py, report.py, metrics.py and probes.py as above.
"""
