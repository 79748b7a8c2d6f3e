"""Results are reused only when everything that could change them is the
same: the text-answer cache key, finished runs in grids and sweeps, torn
logs after a kill."""
import json
import warnings

import pytest

from latentwire.config import RunConfig
from latentwire.data import PromptBuilder, synthetic_squad
from latentwire.errors import LatentWireError
from latentwire.evaluation.answers import text_cache_key, text_predictions
from latentwire.evaluation.run import run_experiment
from latentwire.evaluation.rundir import finished_metrics
from latentwire.util.runio import JsonlLogger, read_jsonl


def _cfg(tmp_path, **eval_kw):
    c = RunConfig()
    c.model.model = "tiny-random"
    c.data.synthetic_articles, c.data.max_eval = 6, 6
    c.train.epochs, c.train.steps_per_epoch, c.train.batch_tokens = 1, 5, 64
    c.eval.max_new_tokens, c.eval.n_boot, c.eval.ac_contexts = 4, 20, 1
    c.out, c.progress = str(tmp_path / "run"), False
    for k, v in eval_kw.items():
        setattr(c.eval, k, v)
    return c


def test_text_cache_key_covers_what_changes_answers(tiny, tmp_path):
    c = _cfg(tmp_path)
    base = text_cache_key(tiny, c)
    for field, value in (("batch_size", 3), ("share_prefix", False), ("max_new_tokens", 9)):
        other = _cfg(tmp_path, **{field: value})
        assert text_cache_key(tiny, other) != base, field
    assert {"weights", "torch", "transformers", "code", "dtype", "device"} <= set(base)


def test_text_cache_hits_and_misses_are_reported(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTWIRE_CACHE", str(tmp_path / "cache"))
    b = PromptBuilder(tiny.tokenizer, "fewshot", 512)
    prompts = [b.build(e) for e in synthetic_squad(4, seed=1)[:5]]
    c = _cfg(tmp_path)
    s1, s2, s3 = {}, {}, {}
    a = text_predictions(tiny, prompts, c, stats=s1)
    assert (s1["hits"], s1["misses"]) == (0, 5)
    assert text_predictions(tiny, prompts, c, stats=s2) == a and (s2["hits"], s2["misses"]) == (5, 0)
    text_predictions(tiny, prompts, _cfg(tmp_path, batch_size=2), stats=s3)
    assert s3["misses"] == 5  # another batch size: another key, nothing reused
    # a torn last line (a killed run) costs that answer only
    path = tmp_path / "cache" / "answers"
    f = next(p for p in path.glob("*.jsonl") if p.name != "digests.json")
    f.write_text(f.read_text() + '{"key": "abc", "predi')
    s4 = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert text_predictions(tiny, prompts, c, stats=s4) == a
    assert s4["hits"] == 5


def test_finished_run_reused_only_with_equal_config(tmp_path):
    c = _cfg(tmp_path)
    m = run_experiment(c, use_cache=False, log=lambda *a: None)
    again, why = finished_metrics(_cfg(tmp_path))
    assert again is not None and again["pipelines"]["text"]["f1"] == m["pipelines"]["text"]["f1"]
    # the same folder spelled relative to the working directory is the same run
    import os
    rel = _cfg(tmp_path)
    rel.out = os.path.relpath(c.out)
    assert finished_metrics(rel)[0] is not None
    # a run saved before the loss-yardstick field existed (or with another value) is the same run
    yard = _cfg(tmp_path)
    yard.seq.seq_ref_questions = 0
    assert finished_metrics(yard)[0] is not None
    more = _cfg(tmp_path)
    more.data.max_eval = 9
    none, why = finished_metrics(more)
    assert none is None and "data.max_eval is 6 there but 9 now" in why
    assert m["text_answer_cache"]["misses"] == 6 and m["text_answer_cache"]["read_cache"] is False


def test_data_paths_compared_as_files(tmp_path, monkeypatch):
    """One data file spelled absolute (in a saved run) and relative (now) is
    the same setting -- compared literally, a benchmark's rerun with
    ../shared/... cleared a finished 2-hour run made with /work/shared/...;
    another file is still a difference."""
    from dataclasses import asdict
    from latentwire.evaluation.rundir import config_diff
    (tmp_path / "d").mkdir()
    for n in ("train.json", "dev.json"):
        (tmp_path / "d" / n).write_text("{}")
    monkeypatch.chdir(tmp_path / "d")
    c = _cfg(tmp_path)
    c.data.squad_train, c.data.squad_eval = str(tmp_path / "d" / "train.json"), str(tmp_path / "d" / "dev.json")
    saved = asdict(c)
    c.data.squad_train, c.data.squad_eval = "train.json", "../d/dev.json"
    assert config_diff(tmp_path, c, saved=saved) == []
    c.data.squad_eval = "train.json"
    assert config_diff(tmp_path, c, saved=saved) == [
        f"data.squad_eval is {str(tmp_path / 'd' / 'dev.json')!r} there but {str(tmp_path / 'd' / 'train.json')!r} now"]


def test_torn_log_lines(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_jsonl(p) == [{"a": 1}, {"a": 2}]
    with pytest.warns(UserWarning, match="torn last line"):
        log = JsonlLogger(p)  # appending after half a line would corrupt the next row
    log.log(a=4)
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}, {"a": 4}]
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(LatentWireError, match="line 2 is not JSON"):
        read_jsonl(p)


def test_nccl_group_serves_cpu_tensors_too():
    from latentwire.util.dist import backend_for
    assert backend_for(True) == "cpu:gloo,cuda:nccl" and backend_for(False) == "gloo"


def test_sweep_reruns_a_finished_entry_when_base_changed(tmp_path):
    from latentwire.evaluation.sweep import apply_overrides, run_sweep
    base = _cfg(tmp_path)
    runs = [{"name": "a", "ratio": 4}]
    logs = []
    run_sweep(base, runs, tmp_path / "sw", log=logs.append)
    run_sweep(base, runs, tmp_path / "sw", log=logs.append)
    assert any(line.startswith("[reuse] a") for line in logs)
    changed = apply_overrides(base, {"max_eval": 7})
    logs.clear()
    rows = run_sweep(changed, runs, tmp_path / "sw", log=logs.append)
    assert any(line.startswith("[rerun] a") and "max_eval" in line for line in logs), logs
    assert json.loads((tmp_path / "sw" / "a" / "metrics.json").read_text())["n_eval"] == 7 and len(rows) == 1


def test_a_crafted_pickle_is_refused_and_never_run(tmp_path):
    import os

    import torch

    from latentwire.wire.compress import load_compressor
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "compressor.pt"
    torch.save({"kind": "pca", "state": {}, "meta": {}, "x": Evil()}, bad)
    with pytest.raises(LatentWireError, match="refused: .* would run code"):
        load_compressor(bad)
    assert not marker.exists()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(LatentWireError, match="not a LatentWire checkpoint"):
        load_compressor(junk)
