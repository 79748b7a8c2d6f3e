"""Kill-and-resume: a run killed with SIGKILL mid-training, then resumed,
ends with the same adapter weights and metrics as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ARGS = ["run", "--model", "tiny-random", "--adapter", "mlp", "--dropout", "0.1", "--epochs", "2",
        "--steps-per-epoch", "150", "--ckpt-every", "25", "--eval-every", "100", "--batch-tokens", "256",
        "--synthetic-articles", "6", "--max-eval", "6", "--max-new-tokens", "4", "--n-boot", "20", "--no-progress",
        "--no-cache"]


def _run(out, *extra, **kw):
    return subprocess.Popen([sys.executable, "-m", "latentwire", *ARGS, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _last_step(log):
    if not log.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _wait_for_step(proc, log, step, timeout=120):
    t0 = time.time()
    while _last_step(log) < step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def _state(path):
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    p = _run(out)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return out


def _assert_same(a, b):
    sa, sb = _state(a / "adapter.pt"), _state(b / "adapter.pt")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for name in ma["pipelines"]:
        assert ma["pipelines"][name]["f1"] == mb["pipelines"][name]["f1"]


def test_sigkill_then_resume_is_bit_identical(tmp_path, reference):
    out = tmp_path / "run"
    p = _run(out)
    _wait_for_step(p, out / "train_log.jsonl", 190)  # mid-training, past an epoch boundary
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert 0 < ck["step"] < 300
    r = _run(out, "--resume")
    _, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    _assert_same(reference, out)


def test_sigterm_saves_checkpoint_and_resumes(tmp_path, reference):
    out = tmp_path / "run"
    p = _run(out)
    _wait_for_step(p, out / "train_log.jsonl", 60)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "checkpoint saved" in err and "--resume" in err
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] % 25 != 0 or ck["step"] >= 60  # saved at the interrupted step, not only on the schedule
    r = _run(out, "--resume")
    _, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    _assert_same(reference, out)


def test_resume_with_other_flags_is_refused(tmp_path, reference):
    r = subprocess.run([sys.executable, "-m", "latentwire", *ARGS, "--out", str(reference), "--resume", "--lr", "0.1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "train.lr is 0.003 there but 0.1 now" in r.stderr
    r = subprocess.run([sys.executable, "-m", "latentwire", *ARGS, "--out", str(reference)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already holds a run" in r.stderr


ARGS2 = ["--epochs", "1", "--steps-per-epoch", "50", "--phase2-steps", "80", "--phase2-batch", "2",
         "--phase2-max-tokens", "384", "--phase2-ckpt-every", "7"]


def _phase2_step(log):
    if not log.exists():
        return 0
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return max((r["step"] for r in rows if r.get("event") == "step2"), default=0)


def test_sigkill_in_phase2_then_resume_is_bit_identical(tmp_path):
    ref = tmp_path / "ref"
    p = _run(ref, *ARGS2)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    out = tmp_path / "run"
    p = _run(out, *ARGS2)
    t0 = time.time()
    while _phase2_step(out / "train_log.jsonl") < 30:
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < 120
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    ck = torch.load(out / "ckpt_phase2.pt", weights_only=True)
    assert 7 <= ck["step"] < 80
    r = _run(out, *ARGS2, "--resume")
    _, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    _assert_same(ref, out)
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    assert [s["step"] for s in steps if s.get("event") == "step2"] == list(range(1, 81))
