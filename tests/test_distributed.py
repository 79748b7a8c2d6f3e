"""Multi-process runs: `torchrun --nproc_per_node 2` (gloo, CPU) on the tiny
model gives the same adapter weights (float tolerance) and the same
predictions and metrics as one process, and only rank 0 writes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from latentwire.util import dist
from latentwire.data import PromptBuilder, synthetic_squad
from latentwire.errors import LatentWireError
from latentwire.evaluation.generate import generate_predictions

ARGS = ["run", "--model", "tiny-random", "--epochs", "2", "--steps-per-epoch", "15", "--eval-every", "10",
        "--batch-tokens", "256", "--synthetic-articles", "6", "--max-eval", "9", "--batch-size", "2",
        "--max-new-tokens", "5", "--n-boot", "20", "--no-progress", "--no-cache"]


def _launch(out, nproc, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pre = [sys.executable, "-m", "latentwire"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "latentwire"]
    p = subprocess.run(pre + ARGS + ["--out", str(out), *extra], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _preds(d, name):
    return [json.loads(line)["prediction"] for line in (d / f"predictions_{name}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("adapter", ["mlp", "vocab"])
def test_two_processes_match_one(tmp_path, adapter):
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(one, 1, "--adapter", adapter)
    _launch(two, 2, "--adapter", adapter)
    sa = torch.load(one / "adapter.pt", weights_only=True)["state_dict"]
    sb = torch.load(two / "adapter.pt", weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-5, atol=1e-6), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert mb["world_size"] == 2 and ma["world_size"] == 1
    for name in ("text", "linear_inverse", "latentwire"):
        pa, pb = _preds(one, name), _preds(two, name)
        assert pa == pb, name
        assert ma["pipelines"][name]["f1"] == mb["pipelines"][name]["f1"]
        assert ma["pipelines"][name]["exact_match"] == mb["pipelines"][name]["exact_match"]
    # the tiny model's answers differ between questions, so equal lists mean something
    assert len(set(_preds(one, "text"))) > 1
    # one writer: the training log has each step once, and the same losses (to rounding)
    la = [json.loads(x) for x in (one / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (two / "train_log.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in la] == [r.get("step") for r in lb]
    for ra, rb in zip(la, lb):
        if ra.get("event") == "step":
            assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-6)


def test_two_process_eval_phase2_and_learned_sequence_compressor(tmp_path):
    """`latentwire eval` sharded over 2 processes = 1 process; in one run under torchrun, Phase 2 and the
    learned sequence compressor train data-parallel, rank 0 logs each step once and saves one compressor, and
    the evaluation is sharded and merged (one launch for both: a torchrun start costs ~20 s here)."""
    ev = ["eval", "--model", "tiny-random", "--synthetic-articles", "6", "--max-eval", "7", "--batch-size", "2",
          "--max-new-tokens", "5", "--n-boot", "20", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = []
    for n, out in ((1, tmp_path / "e1"), (2, tmp_path / "e2")):
        pre = [sys.executable, "-m", "latentwire"] if n == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "latentwire"]
        p = subprocess.run(pre + ev + ["--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append(out)
    assert (outs[0] / "predictions.jsonl").read_text() == (outs[1] / "predictions.jsonl").read_text()
    run = tmp_path / "p2"
    _launch(run, 2, "--adapter", "mlp", "--phase2-steps", "3", "--phase2-batch", "2", "--phase2-max-tokens", "400",
            "--sequence", "learned", "--seq-steps", "3", "--seq-batch", "2", "--seq-width", "16", "--seq-dim", "4",
            "--seq-max-questions", "6", "--seq-ckpt-every", "2")
    steps2 = [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()
              if json.loads(x).get("event") == "step2"]
    assert steps2 == [1, 2, 3]
    assert (run / "adapter_phase2_state.pt").exists()
    rows = [json.loads(x) for x in (run / "seq_train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("event") == "step"] == [1, 2, 3]
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["seq_train"]["steps"] == 3
    assert len(_preds(run, "learned_r4")) == m["n_eval"] == 9
    assert (run / "seq_compressor.pt").exists() and (run / "ckpt_seq.pt").exists()


def test_uneven_global_batch_is_refused_naming_the_flag():
    d = dist.Dist(rank=1, world=3)
    with pytest.raises(LatentWireError, match="--batch-tokens 256 does not split evenly over 3"):
        dist.slice_for_rank(256, d, "--batch-tokens")
    assert dist.slice_for_rank(6, d, "--phase2-batch") == slice(2, 4)


def test_sharded_generation_covers_every_question_once(tiny):
    """The batches two ranks generate, merged, are exactly the 1-process
    answers (same batches, same padding) -- checked without processes."""
    b = PromptBuilder(tiny.tokenizer, "fewshot", 256)
    prompts = [b.build(e) for e in synthetic_squad(6, 0)[:9]]
    full = generate_predictions(tiny, prompts, batch_size=2, max_new_tokens=5, progress=False)
    parts = [generate_predictions(tiny, prompts, batch_size=2, max_new_tokens=5, progress=False, shard=(r, 2))
             for r in range(2)]
    assert all((a is None) != (b is None) for a, b in zip(*parts))
    assert [a if a is not None else b for a, b in zip(*parts)] == full
    assert len(set(full)) > 1


def test_device_map_with_launched_processes_is_refused(monkeypatch):
    from latentwire.config import RunConfig
    from latentwire.evaluation.run import _resolve_placement
    cfg = RunConfig()
    cfg.model.device_map = "auto"
    monkeypatch.setattr(dist, "current", lambda: dist.Dist(rank=0, world=2))
    with pytest.raises(LatentWireError, match="--device-map"):
        _resolve_placement(cfg)
    cfg.model.device_map = "everywhere"
    with pytest.raises(LatentWireError, match="--device-map"):
        cfg.model.validate()
