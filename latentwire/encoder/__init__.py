"""The learned wire: the pooled LM encoder (lmenc.py) and its training (lmtrain.py, `latentwire
train-encoder`), the v0.1 sequence compressor and its training (seqcomp.py), and the encoders shipped with the
package (weights.py; the files are in latentwire/shipped/). On three layers:
* the models a pipeline loads -- lmenc.py, weights.py -- sit below latentwire.pipelines
  (latentwire/pipelines/learned.py builds the `learned` kind from them);
* seqcomp.py, which trains as well as holds the v0.1 compressor, sits above the pipelines and Stage 1's
  training (it reuses train.py's checkpoint/step helpers) and below the run;
* lmtrain.py, a training loop that scores its held-out questions through a pipeline and the evaluation's
  path, sits above latentwire.evaluation.run (it loads the data as a run does).

May import: lmenc.py / weights.py: latentwire.wire, latentwire.llm, latentwire.config, latentwire.util,
latentwire.errors; seqcomp.py: also latentwire.pipelines, latentwire.stage1, latentwire.evaluation.report;
lmtrain.py: everything but latentwire.api and latentwire.cli.
Imported by: latentwire.pipelines (lmenc, weights, and -- an exception the layers contract lists -- seqcomp),
latentwire.evaluation.run (seqcomp), latentwire.cli (lmtrain).
"""
