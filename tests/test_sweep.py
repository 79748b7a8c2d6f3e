import csv
import json

import pytest

from latentwire.config import RunConfig
from latentwire.errors import LatentWireError
from latentwire.evaluation.sweep import apply_overrides, compare_runs, expand, load_sweep_file, run_diagnose, run_sweep, verdict


def _base(tmp_path):
    c = RunConfig()
    c.model.model = "tiny-random"
    c.data.synthetic_articles, c.data.max_eval = 6, 6
    c.train.epochs, c.train.steps_per_epoch, c.train.batch_tokens = 1, 5, 128
    c.eval.max_new_tokens, c.eval.n_boot, c.progress = 4, 50, False
    return c


def test_expand_and_overrides():
    runs = expand({"grid": {"ratio": [2, 4], "adapter": ["vocab", "mlp"]}, "runs": [{"name": "seed", "preset": "seed"}]})
    assert len(runs) == 5 and runs[0]["name"] == "ratio=2,adapter=vocab" and runs[-1]["name"] == "seed"
    c = apply_overrides(RunConfig(), {"ratio": 16, "hidden-mult": 8, "anchor": "reconstructed", "controls": False})
    assert c.compress.ratio == 16.0 and c.adapter.hidden_mult == 8 and c.eval.anchor == "reconstructed"
    with pytest.raises(LatentWireError, match="unknown field 'ratoi'"):
        apply_overrides(RunConfig(), {"ratoi": 4})
    with pytest.raises(LatentWireError, match="field 'epochs' wants int"):
        apply_overrides(RunConfig(), {"epochs": "many"})
    with pytest.raises(LatentWireError, match="two runs are named"):
        expand({"runs": [{"name": "a"}, {"name": "a"}]})


def test_sweep_file_errors(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("grid: [1, 2\n")
    with pytest.raises(LatentWireError, match="cannot parse"):
        load_sweep_file(p)
    p.write_text("grids: {}\n")
    with pytest.raises(LatentWireError, match="unknown section"):
        load_sweep_file(p)
    p.write_text("compare: [[a, b, c]]\n")
    with pytest.raises(LatentWireError, match="compare entries are \\[before, after\\]"):
        load_sweep_file(p)


def test_sweep_appends_rows_and_resumes(tmp_path):
    base = _base(tmp_path)
    runs = expand({"grid": {"ratio": [2, 4]}, "runs": [{"name": "mlp", "adapter": "mlp"}]})
    out = tmp_path / "sw"
    logs = []
    run_sweep(base, runs[:1], out, log=logs.append)  # "interrupted" after the first run
    rows = run_sweep(base, runs, out, log=logs.append)
    assert [r["name"] for r in rows] == ["ratio=2", "ratio=4", "mlp"]
    assert sum(line.startswith("[run ]") for line in logs) == 3  # the first run was not redone
    assert any(line.startswith("[reuse] ratio=2") for line in logs)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    for png in ("f1_vs_ratio.png", "cos_vs_f1.png", "norms_and_losses.png"):
        assert (out / png).exists()
    # paired comparison of two finished runs on the same questions
    text = compare_runs(rows, [["ratio=2", "mlp"]], out, n_boot=50)
    assert "| ratio=2 | mlp |" in text and (out / "compare.md").read_text() == text
    same = compare_runs(rows, [["ratio=2", "ratio=2"]], out, n_boot=50)
    assert "+0.00 [+0.0, +0.0]" in same and "F1 no clear change, agreement no clear change" in same
    with pytest.raises(LatentWireError, match="no run named 'nope'"):
        compare_runs(rows, [["ratio=2", "nope"]], out)


def test_sweep_of_sequence_runs_has_a_row_per_pipeline(tmp_path):
    """--no-stage1 runs (sequence pipelines only) give one results.csv row per
    pipeline, with the wire columns and blank per-token columns."""
    base = _base(tmp_path)
    base.eval.stage1, base.eval.sequence, base.eval.sequence_ratios = False, "truncate,meanpool", "2,4"
    rows = run_sweep(base, expand({"runs": [{"name": "b"}]}), tmp_path / "sw", log=lambda *a: None)
    assert [r["pipeline"] for r in rows] == ["truncate_r2", "meanpool_r2", "truncate_r4", "meanpool_r4"]
    assert all(r["cos"] == "" and float(r["wire_bytes"]) > 0 for r in rows)
    assert (tmp_path / "sw" / "f1_vs_bytes.png").exists() and not (tmp_path / "sw" / "cos_vs_f1.png").exists()


def test_sweep_cli_from_toml(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(f'out = "{tmp_path / "o"}"\n[base]\nmodel = "tiny-random"\nsynthetic_articles = 6\nmax_eval = 4\n'
                 'epochs = 1\nsteps_per_epoch = 3\nmax_new_tokens = 3\nn_boot = 20\n[grid]\nratio = [4]\n')
    from conftest import run_cli
    p = run_cli("sweep", f)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o" / "results.csv").exists()


def test_verdict_rules():
    assert verdict((5.0, 1.0, 9.0), (0.0, -1.0, 1.0)) == "supported"
    assert verdict((0.1, -1.0, 1.2), (0.0, -0.5, 0.5)) == "not supported"
    assert verdict((1.0, -3.0, 6.0), (0.0, -1.0, 1.0)) == "inconclusive"


def test_diagnose_on_tiny_model(tmp_path):
    from latentwire.util.runio import read_jsonl
    from latentwire.evaluation.metrics import paired_delta as _paired
    from latentwire.evaluation.sweep import HYPOTHESES, verdict
    base = _base(tmp_path)
    base.adapter.preset = "seed"
    res = run_diagnose(base, tmp_path / "dg", log=lambda *a: None, phase2_steps=1)
    assert len(res["results"]) == 5
    out = tmp_path / "dg"
    saved = json.loads((out / "baseline" / "config.json").read_text())
    assert saved["eval"]["wire_scope"] == "prompt" and saved["adapter"]["output_norm"] is True  # the seed's setting
    base_pred = read_jsonl(out / "baseline" / "predictions_latentwire.jsonl")
    by_h = {r["hypothesis"]: r for r in res["results"]}
    for i, (h, _, overrides) in enumerate(HYPOTHESES):
        r = by_h[h]
        cfg = json.loads((out / f"h{i + 1}" / "config.json").read_text())
        # each variant changes exactly its own fields (and drops the control), nothing else
        flat = {f"{g}.{k}": v for g, sub in cfg.items() if isinstance(sub, dict) for k, v in sub.items()}
        flat_b = {f"{g}.{k}": v for g, sub in saved.items() if isinstance(sub, dict) for k, v in sub.items()}
        changed = {k.split(".")[1] for k in flat if flat[k] != flat_b.get(k)} - {"out"}
        assert changed == set(overrides), (h, changed)
        # the verdict is the rule applied to the paired deltas of the saved predictions
        pred = read_jsonl(out / f"h{i + 1}" / "predictions_latentwire.jsonl")
        d_f1, d_ag = _paired(base_pred, pred, "f1", 50, 0), _paired(base_pred, pred, "agree", 50, 0)
        assert r["delta_f1"][0] == pytest.approx(d_f1[0]) and r["delta_agreement"][0] == pytest.approx(d_ag[0])
        assert r["verdict"] == verdict(tuple(r["delta_f1"]), tuple(r["delta_agreement"]))
    text = (out / "diagnose_report.md").read_text()
    assert "magnitude mismatch" in text and "ΔF1" in text


def test_verdict_rule():
    from latentwire.evaluation.sweep import verdict
    assert verdict((3.0, 1.0, 5.0), (0.0, -1.0, 1.0)) == "supported"  # F1 interval above 0
    assert verdict((0.0, -1.0, 1.0), (2.0, 0.5, 4.0)) == "supported"  # agreement interval above 0
    assert verdict((0.2, -1.0, 1.5), (0.0, -0.5, 0.5)) == "not supported"  # both stay below +2 points
    assert verdict((1.0, -1.0, 6.0), (0.0, -0.5, 0.5)) == "inconclusive"  # too wide to tell


def test_half_finished_run_resumes_or_restarts_when_its_flags_changed(tmp_path):
    base = _base(tmp_path)
    runs = expand({"runs": [{"name": "a", "adapter": "mlp"}]})
    out = tmp_path / "sw"
    run_sweep(base, runs, out, log=lambda *a: None)
    # make it look killed mid-run: checkpoint kept, no metrics, not in results.csv
    (out / "a" / "metrics.json").unlink()
    (out / "results.csv").unlink()
    logs = []
    run_sweep(base, runs, out, log=logs.append)  # same flags: resumed, not restarted
    assert not any(line.startswith("[restart]") for line in logs)
    (out / "a" / "metrics.json").unlink()
    (out / "results.csv").unlink()
    base.train.lr = 0.01  # the sweep file changed since
    logs = []
    rows = run_sweep(base, runs, out, log=logs.append)
    assert any(line.startswith("[restart] a:") and "train.lr is 0.003 there but 0.01 now" in line for line in logs)
    assert [r["name"] for r in rows] == ["a"]


def test_overwrite_clears_both_phases_checkpoints(tmp_path):
    from latentwire.evaluation.rundir import RUN_STATE_FILES, prepare_run_dir
    for f in RUN_STATE_FILES:
        (tmp_path / f).write_text("x")
    with pytest.raises(LatentWireError, match="already holds a run"):
        prepare_run_dir(tmp_path, resume=False, overwrite=False)
    prepare_run_dir(tmp_path, resume=False, overwrite=True)
    # the learned sequence compressor's too: a killed run's log rows were kept and a new run appended after them
    assert {"ckpt_phase2.pt", "ckpt_seq.pt", "seq_train_log.jsonl"} <= set(RUN_STATE_FILES)
    assert not any((tmp_path / f).exists() for f in RUN_STATE_FILES)
