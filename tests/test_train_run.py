import json
import subprocess
import sys

import pytest
import torch

from latentwire.stage1.adapters import build_adapter
from latentwire.wire.compress import PCA
from latentwire.config import AdapterConfig, RunConfig, TrainConfig, apply_preset
from latentwire.errors import LatentWireError
from latentwire.evaluation.run import run_experiment
from latentwire.stage1.train import train_phase1, warmup_cosine


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(200, 24, generator=g) * torch.linspace(2, 0.2, 24)
    pca = PCA(6).fit(table)
    return table, pca, pca.transform(table), torch.randint(0, 200, (500,), generator=g)


def _cfg(**kw):
    base = dict(epochs=2, steps_per_epoch=10, batch_tokens=64, eval_every=5, ckpt_every=5, warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def test_schedule():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0, abs=1e-9)


def test_phase1_reduces_loss_and_logs(tmp_path):
    table, pca, zt, pool = _setup()
    torch.manual_seed(0)
    a = build_adapter(AdapterConfig(adapter="mlp", calibration="none", init_pca=False), pca, table)
    out = train_phase1(a, zt, table, pool, _cfg(epochs=3, steps_per_epoch=40, lr=1e-2), tmp_path, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    steps = [r for r in rows if r["event"] == "step"]
    assert out["steps"] == 120 and len(steps) == 120
    assert {"loss", "cos_loss", "mse", "lr", "grad_norm"} <= set(steps[0])
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [r["epoch"] for r in rows if r["event"] == "epoch"] == [1, 2, 3]
    assert (tmp_path / "ckpt.pt").exists() and (tmp_path / "adapter_best_state.pt").exists()


def test_resume_is_bit_identical(tmp_path):
    table, pca, zt, pool = _setup()
    cfg = AdapterConfig(adapter="mlp", dropout=0.1, calibration="learned")

    def fresh():
        torch.manual_seed(1)
        return build_adapter(cfg, pca, table)

    full = fresh()
    train_phase1(full, zt, table, pool, _cfg(), tmp_path / "a", seed=3, progress=False)
    # interrupted run: train 10 of 20 steps, then resume in a new adapter object
    part = fresh()
    train_phase1(part, zt, table, pool, _cfg(), tmp_path / "b", seed=3, progress=False, stop_after=10)
    ck = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 10
    resumed = fresh()
    train_phase1(resumed, zt, table, pool, _cfg(), tmp_path / "b", seed=3, progress=False, resume=True)
    for (n, p), (_, q) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n


def test_exact_adapter_skips_training_and_says_so(tmp_path):
    table, _, _, pool = _setup()
    full = PCA(table.shape[1]).fit(table)  # no compression: retrieval is exact
    a = build_adapter(AdapterConfig(adapter="vocab"), full, table)
    out = train_phase1(a, full.transform(table), table, pool, _cfg(), tmp_path, progress=False, quick_ids=pool[:100])
    assert out["steps"] == 0 and out["skipped"] == "exact before training"
    assert out["best"]["vocab_metrics"]["token_recovery"] == 1.0
    rows = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert rows[0]["event"] == "skipped"
    # a lossy code is not exact: it trains
    one = PCA(1).fit(table)
    b = build_adapter(AdapterConfig(adapter="vocab"), one, table)
    assert train_phase1(b, one.transform(table), table, pool, _cfg(), tmp_path / "b", progress=False)["steps"] == 20


def test_nan_loss_stops_with_step_and_term(tmp_path):
    table, pca, zt, pool = _setup()
    a = build_adapter(AdapterConfig(adapter="mlp"), pca, table)
    bad = table.clone()
    bad[:] = float("nan")
    with pytest.raises(LatentWireError, match=r"step 0: loss term 'loss'"):
        train_phase1(a, zt, bad, pool, _cfg(), tmp_path, progress=False)


def test_seed_preset():
    c = RunConfig()
    c.adapter.preset = "seed"
    apply_preset(c)
    assert c.adapter.adapter == "mlp" and c.adapter.output_norm and c.train.w_mse == 0.1 and c.train.w_cos == 1.0


def _tiny_cfg(tmp_path, **adapter):
    c = RunConfig()
    c.model.model = "tiny-random"
    c.data.synthetic_articles, c.data.max_eval = 6, 8
    c.train.epochs, c.train.steps_per_epoch, c.train.batch_tokens = 1, 10, 128
    c.eval.max_new_tokens, c.eval.n_boot = 6, 50
    c.out, c.progress = str(tmp_path / "run"), False
    for k, v in adapter.items():
        setattr(c.adapter, k, v)
    return c


@pytest.mark.parametrize("adapter", ["vocab", "mlp"])
def test_tiny_end_to_end_run(tmp_path, adapter):
    m = run_experiment(_tiny_cfg(tmp_path, adapter=adapter), use_cache=False, log=lambda *a: None)
    run = tmp_path / "run"
    for f in ("config.json", "metrics.json", "report.md", "predictions_text.jsonl", "predictions_latentwire.jsonl",
              "predictions_linear_inverse.jsonl", "diagnostics_latentwire.json", "compressor.pt", "adapter.pt",
              "train_log.jsonl", "f1_by_pipeline.png"):
        assert (run / f).exists(), f
    lw = m["pipelines"]["latentwire"]
    assert {"f1", "exact_match", "agreement", "token_recovery_vocab", "f1_ci95"} <= set(lw)
    assert m["n_eval"] == 8
    # every pipeline reports its wire; the text references are there too
    for name in ("text", "linear_inverse", "latentwire"):
        w = m["pipelines"][name]["wire"]
        assert {"contexts", "bytes_mean", "bytes_median", "bytes_per_token", "positions_mean"} <= set(w), name
        assert w["bytes_mean"] > 0
    assert m["pipelines"]["latentwire"]["wire"]["bytes_per_token"] == pytest.approx(16 * 4)  # 16 dims x fp32
    assert {"utf8", "zstd", "lzma", "token_ids", "lm_code_length", "lm_arithmetic"} <= set(m["wire_references"])
    assert m["wire_references"]["lm_arithmetic"]["decoded_exactly"] == m["wire_references"]["lm_arithmetic"]["contexts"]
    assert (run / "f1_vs_bytes.png").exists() and "bytes/context" in (run / "report.md").read_text()
    d = json.loads((run / "diagnostics_latentwire.json").read_text())
    assert len(d["examples"]) == 8 and "nearest_tokens" in d["examples"][0]
    if adapter == "vocab":
        # retrieval from the receiver's own table: every token comes back, so
        # the reconstructed pipeline says exactly what the text pipeline says
        assert lw["token_recovery_vocab"] > 0.99 and lw["agreement"] == 1.0


def test_quantized_codes_on_the_wire(tmp_path):
    c = _tiny_cfg(tmp_path, adapter="vocab")
    c.compress.compress_dim, c.compress.bits = 8, 2
    m = run_experiment(c, use_cache=False, log=lambda *a: None)
    w = m["pipelines"]["latentwire"]["wire"]
    assert w["bits_per_token"] == pytest.approx(8 * 2, rel=0.02)  # 8 dims x 2 bits (+ padding to a byte)
    assert w["bits"] == 2 and w["dims"] == 8 and m["compressor"]["bits"] == 2
    assert m["train"]["steps"] > 0  # 2-bit codes are not exact: the temperature is trained


def test_cli_bad_flags_one_line_error(tmp_path):
    import os

    from conftest import run_cli

    def run(*args, env=None):
        # in-process, but for the case about the environment (read at import)
        p = (subprocess.run([sys.executable, "-m", "latentwire.cli", *args], capture_output=True, text=True, env=env)
             if env is not None else run_cli(*args))
        return p.returncode, p.stderr.strip().splitlines()

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    # "online" as far as the flags go, but the endpoint is a closed local port: nothing leaves the machine
    online = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_ENDPOINT": "http://127.0.0.1:9"}
    for args, msg, env in [
        (["run", "--model", "tiny-random", "--out", "/proc/nope/run"], "--out /proc/nope/run: cannot write there", None),
        # the data file is read before the model loads: a missing model is not reached
        (["eval", "--model", "./no-model-here", "--squad-eval", str(bad), "--out", str(tmp_path / "e")],
         "not valid JSON", None),
        # an unknown hub id on a machine without a network: one line, no retries
        (["eval", "--model", "no-such-model", "--out", str(tmp_path / "e2")], "the hub cannot be reached", online),
    ]:
        rc, err = run(*args, env=env)
        assert rc == 2 and len(err) == 1 and msg in err[0], (args, err)

    for args, msg in [
        (["run", "--model", "tiny-random", "--ratio", "0.5"], "--ratio must be >= 1"),
        (["run", "--model", "tiny-random", "--compress-dim", "999"], "--compress-dim 999 must be between 1 and d_model=64"),
        (["eval", "--model", "tiny-random", "--template", "fancy"], "--template"),
        (["eval", "--model", "tiny-random", "--squad-eval", str(tmp_path / "x.json"), "--squad-train",
          str(tmp_path / "y.json")], "no such file"),
        (["eval", "--model", "./nope"], "--model ./nope: no such file or folder"),
        (["run", "--model", "tiny-random", "--adapter", "transformer"], "--adapter"),
        (["run", "--model", "tiny-random", "--bits", "12"], "--bits 12"),
        (["run", "--model", "tiny-random", "--anchor", "reconstructed"], "--anchor reconstructed needs --wire-scope"),
        (["run", "--model", "tiny-random", "--ratio", "1000"], "--ratio 1000.0 exceeds d_model=64"),
        (["run", "--model", "tiny-random", "--no-stage1"], "--no-stage1 leaves nothing to evaluate"),
        (["run", "--model", "tiny-random", "--sequence", "learned", "--seq-bits", "12"], "--seq-bits 12"),
        (["run", "--model", "tiny-random", "--sequence", "learned", "--seq-preset", "huge"], "--seq-preset"),
        (["run", "--model", "tiny-random", "--sequence", "learned", "--seq-path", str(tmp_path / "none.pt")],
         "--seq-path " + str(tmp_path / "none.pt") + ": no such file"),
        (["run", "--model", "tiny-random", "--sequence", "learned", "--seq-path", str(bad)],
         "bad.json: not a LatentWire"),
        (["run", "--model", "tiny-random", "--synthetic-articles", "4", "--max-eval", "2", "--no-stage1", "--sequence",
          "learned", "--seq-layer", "9", "--out", str(tmp_path / "o9")], "--seq-layer 9: this model has layers 0..2"),
    ]:
        rc, err = run(*args, *([] if "--out" in args else ["--out", str(tmp_path / "o")]))
        assert rc == 2 and len(err) == 1 and msg in err[0], (args, err)


def test_cli_eval_writes_predictions_and_metrics(tmp_path):
    out = tmp_path / "ev"
    from conftest import run_cli
    p = run_cli("eval", "--model", "tiny-random", "--synthetic-articles", "4", "--max-eval", "5", "--max-new-tokens",
                "4", "--n-boot", "20", "--no-progress", "--out", out)
    assert p.returncode == 0, p.stderr
    assert "| text | 5 |" in p.stdout
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {"id", "gold", "prediction", "f1", "em"} <= set(rows[0])
    m = json.loads((out / "metrics.json").read_text())
    assert m["pipelines"]["text"]["n"] == 5 and m["config"]["model"]["model"] == "tiny-random"
    assert m["pipelines"]["text"]["f1"] == pytest.approx(100 * sum(r["f1"] for r in rows) / 5)
    # the official {question id: answer} file, as the v1.1 evaluation script reads it
    official = json.loads((out / "predictions.official.json").read_text())
    assert official == {r["id"]: r["prediction"] for r in rows}


def test_findings_name_the_cause():
    from latentwire.stage1.diagnose import findings
    d = {"norm_status": "TOO HIGH", "norm_ratio": 7.9, "cos": 0.89, "collapsed": True, "top_output": "",
         "top_output_share": 0.9, "diversity": 0.05, "text_diversity": 0.8}
    lines = findings("seed", {"f1_retention": 0.0, "agreement": 0.0, "token_recovery_vocab": 0.1}, d)
    text = " ".join(lines)
    assert "magnitude mismatch" in text and "leave the vocabulary" in text and "collapsed" in text
    assert "cosine 0.890 looks high" in text
    ok = findings("lw", {"f1_retention": 1.0, "agreement": 0.99, "token_recovery_vocab": 0.9999},
                  d | {"norm_status": "OK", "collapsed": False})
    assert ok == ["lw: faithful to the text pipeline -- F1 retention 100.0%, agreement 99.0%"]


def test_saved_artifacts_are_checked_before_work(tmp_path):
    c = _tiny_cfg(tmp_path, adapter="mlp")
    run_experiment(c, use_cache=False, log=lambda *a: None)
    run = tmp_path / "run"
    # reuse both artifacts: no fitting, no training, same metrics
    c2 = _tiny_cfg(tmp_path, adapter="mlp", adapter_path=str(run / "adapter.pt"))
    c2.compress.compressor_path = str(run / "compressor.pt")
    c2.out = str(tmp_path / "reuse")
    m2 = run_experiment(c2, use_cache=False, log=lambda *a: None)
    m1 = json.loads((run / "metrics.json").read_text())
    assert m2["train"]["steps"] == 0
    assert m2["pipelines"]["latentwire"]["f1"] == m1["pipelines"]["latentwire"]["f1"]
    # another compression dim: refused, naming both sides
    c3 = _tiny_cfg(tmp_path, adapter="mlp", adapter_path=str(run / "adapter.pt"))
    c3.compress.ratio, c3.out = 8, str(tmp_path / "bad")
    with pytest.raises(LatentWireError, match="--adapter-path .* compress_dim is 16 there but 8 in this run"):
        run_experiment(c3, use_cache=False, log=lambda *a: None)
    assert not (tmp_path / "bad" / "compressor.pt").exists()  # refused before any work
    c4 = _tiny_cfg(tmp_path, adapter="vocab")
    c4.compress.compressor_path, c4.out = str(run / "compressor.pt"), str(tmp_path / "bad2")
    c4.compress.compressor = "random"
    with pytest.raises(LatentWireError, match="kind is 'pca' there but 'random' in this run"):
        run_experiment(c4, use_cache=False, log=lambda *a: None)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    c5 = _tiny_cfg(tmp_path, adapter="mlp", adapter_path=str(junk))
    c5.out = str(tmp_path / "bad3")
    with pytest.raises(LatentWireError, match="not a LatentWire checkpoint"):
        run_experiment(c5, use_cache=False, log=lambda *a: None)


def test_context_window_and_nonfinite_guards(tmp_path, tiny):
    c = _tiny_cfg(tmp_path)
    c.data.max_prompt_tokens = 1020
    with pytest.raises(LatentWireError, match="exceeds the model's context window"):
        run_experiment(c, use_cache=False, log=lambda *a: None)
    from latentwire.data import PromptBuilder, synthetic_squad
    from latentwire.evaluation.generate import EvalSwitches, pipeline_embeds
    p = PromptBuilder(tiny.tokenizer, "plain", 200).build(synthetic_squad(2)[0])
    with pytest.raises(LatentWireError, match="not finite"):
        pipeline_embeds(tiny, [p], lambda x: x * float("inf"), EvalSwitches(), tiny.tokenizer.pad_token_id)


def test_diagnostic_stats_match_position_by_position(tiny):
    import torch.nn.functional as F

    from latentwire.data import PromptBuilder, synthetic_squad
    from latentwire.stage1.diagnose import per_example_embedding_stats
    from latentwire.evaluation.generate import EvalSwitches
    table = tiny.embedding_table()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(table.shape[1], table.shape[1], generator=g) * 0.5
    fn = lambda x: x + x @ noise  # noqa: E731 - row-wise, far from identity
    b = PromptBuilder(tiny.tokenizer, "plain", 300)
    prompts = [b.build(e) for e in synthetic_squad(3, seed=4)[:4]]
    sw = EvalSwitches(keep_cue=True, scope="prompt")
    tn = F.normalize(table, dim=-1)
    rows = per_example_embedding_stats(tiny, prompts, fn, sw, tn)
    for p, r in zip(prompts, rows):
        x = tiny.embed(torch.tensor(p.ids))
        y = fn(x)
        sel = torch.tensor(r["reconstructed_mask"])
        near = (F.normalize(y, dim=-1) @ tn.T).argmax(-1)
        assert r["n_recovered"] == int((near[sel] == torch.tensor(p.ids)[sel]).sum())
        assert r["cos"] == pytest.approx(float(F.cosine_similarity(x[sel], y[sel], dim=-1).mean()), rel=1e-5)
        assert 0 < r["n_recovered"] < r["n_reconstructed"]


@pytest.mark.parametrize("cmd", ["eval", "run", "sweep", "diagnose"])
def test_cli_help(cmd):
    from conftest import run_cli
    p = run_cli(cmd, "--help")
    assert p.returncode == 0 and "usage: latentwire" in p.stdout, p.stderr
