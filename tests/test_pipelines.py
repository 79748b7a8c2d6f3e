"""The pipeline registry, the LLM-coded text wire, K/V readings, the
per-paragraph ceiling (optimized positions), controls, and the product's
front doors: the Python API, `latentwire send` / `ask` / `pipelines`, and a
plug-in pipeline evaluated beside ours."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import latentwire as lw
from latentwire.config import OptConfig, RunConfig
from latentwire.data import PromptBuilder, synthetic_squad
from latentwire.errors import LatentWireError
from latentwire.evaluation.generate import generate_predictions
from latentwire.llm.forward import context_kv, head_cache
from latentwire.pipelines import KINDS, BuildContext, KVReading, Pipeline, build
from latentwire.pipelines.optimized import OptimizedPipeline, ParagraphFitter
from latentwire.pipelines.tokens import budget
from latentwire.wire.wire import Payload, RowQuantizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def builder(tiny):
    return PromptBuilder(tiny.tokenizer, "fewshot", 512)


@pytest.fixture(scope="module")
def prompts(tiny, builder):
    return [builder.build(e) for e in synthetic_squad(6, seed=3)][:12]


@pytest.fixture(scope="module")
def ctx(tiny, prompts, builder):
    return BuildContext(tiny, prompts[0].head_ids, ratio=4, extra={"builder": builder})


def answers(tiny, prompts, pipe=None, batch_size=8):
    return generate_predictions(tiny, prompts, pipe, batch_size=batch_size, max_new_tokens=6, progress=False)


def test_payload_is_bytes_with_positions():
    p = Payload(b"\x01\x02", positions=7)
    assert isinstance(p, bytes) and bytes(p) == b"\x01\x02" and len(p) == 2 and p.positions == 7
    assert p.data == b"\x01\x02" and p.nbytes == 2


def test_every_untrained_kind_builds_and_round_trips(tiny, ctx, prompts):
    """Every kind that needs no trained weights builds through the registry; its payload decodes to what the
    LLM reads (ids / embeddings / K/V) with the positions the payload names."""
    cfg = RunConfig()
    cfg.opt.opt_steps, cfg.opt.opt_questions, cfg.opt.opt_continue = 1, 2, 2
    c = BuildContext(**{**ctx.__dict__, "cfg": cfg})
    p = prompts[0]
    for name, kind in KINDS.items():
        if kind.trained:
            with pytest.raises(LatentWireError, match="--pipeline"):
                build(name, c)
            continue
        pipe = build(name, c)[0]
        pl = pipe.send(p.context_text, p.context_ids)
        got = pipe.receive(pl)
        assert len(got) == pl.positions, name
        if kind.ratio:
            assert pl.positions == budget(len(p.context_ids), 4), name
    with pytest.raises(LatentWireError, match="not a pipeline kind"):
        build("no-such-kind", c)


def test_ac_is_lossless_and_answers_as_text(tiny, ctx, prompts):
    """`ac`: the LLM-coded text decodes to exactly the context's ids, so its answers are the text's."""
    ac = build("ac", ctx)[0]
    for p in prompts[:4]:
        assert ac.receive(ac.send(p.context_text, p.context_ids)).tolist() == p.context_ids
    assert answers(tiny, prompts, ac) == answers(tiny, prompts)
    assert ac.timing()["send_s_per_context"] > 0 and ac.timing()["receive_s_per_context"] > 0


def test_truncate_ac_sends_the_truncated_ids(tiny, ctx, prompts):
    t, tac = build("truncate", ctx)[0], build("truncate+ac", ctx)[0]
    assert tac.name == "truncate_r4+ac"
    for p in prompts[:4]:
        a, b = t.send(p.context_text, p.context_ids), tac.send(p.context_text, p.context_ids)
        assert tac.receive(b).tolist() == t.receive(a).tolist() == p.context_ids[:budget(len(p.context_ids), 4)]
        assert a.positions == b.positions
    assert answers(tiny, prompts, tac) == answers(tiny, prompts, t)


def test_send_many_equals_send_and_memoises(tiny, ctx, prompts):
    """The batched sender/receiver (what a run uses) give the payloads and readings send/receive give, encode
    each distinct context once, and count it once in the seconds per context."""
    items = [(p.context_text, p.context_ids) for p in prompts[:5]]
    for kind in ("ac", "truncate+ac", "truncate"):
        one, many = build(kind, ctx)[0], build(kind, ctx)[0]
        want = [one.send(t, i) for t, i in items]
        got = many.send_many(items + items[:2])
        assert got == want + want[:2] and [g.positions for g in got[:5]] == [w.positions for w in want]
        assert many.send_n == len({tuple(i) for _, i in items})
        assert [r.tolist() for r in many.receive_many(got)] == [one.receive(w).tolist() for w in want + want[:2]]
        assert many.receive_n == len(set(got))
        assert many.send(*items[0]) is got[0]  # memoised


class ContextKV(Pipeline):
    """A test receiver that reads the receiver's own K/V of the context's first `keep` tokens."""
    reads = "kv"

    def __init__(self, lm, head, keep):
        super().__init__()
        self.lm, self.head, self.keep, self.name = lm, head, keep, "context_kv"
        self.hc = head_cache(lm, head)

    def encode(self, text, ids):
        n = self.keep(len(ids))
        self.last = context_kv(self.lm, self.hc, len(self.head), list(ids)[:n])
        return Payload(repr(list(ids)[:n]).encode(), positions=n)

    def decode(self, data):
        ids = eval(data.decode())  # test-only: the payload is the list's repr
        kv = context_kv(self.lm, self.hc, len(self.head), ids)
        return KVReading([k for k, _ in kv], [v for _, v in kv], len(self.head))


def test_kv_readings_reproduce_text_and_truncation_exactly(tiny, prompts):
    """The K/V generation path is exact: the context's own keys/values read where the context was give the text
    pipeline's answers; its first M tokens' K/V give truncation's (the ceiling's starting point)."""
    head = prompts[0].head_ids
    full = ContextKV(tiny, head, lambda L: L)
    assert answers(tiny, prompts, full) == answers(tiny, prompts)
    first = ContextKV(tiny, head, lambda L: budget(L, 4))
    trunc = build("truncate", BuildContext(tiny, head, ratio=4))[0]
    assert answers(tiny, prompts, first) == answers(tiny, prompts, trunc)
    assert answers(tiny, prompts, first, batch_size=1) == answers(tiny, prompts, first)


def test_row_quantizer_round_trip_and_size(gen):
    z = torch.randn(9, 13, generator=gen)
    for bits in (1, 2, 4, 8):
        q = RowQuantizer(bits)
        data = q.to_bytes(z)
        assert len(data) == 1 + 2 * 9 + math.ceil(9 * 13 * bits / 8)
        back = q.from_bytes(data, 13)
        assert torch.equal(back, q.roundtrip(z))
        assert float((back - z).abs().max()) <= float(z.abs().max()) / (1 << bits) + 1e-3


@pytest.mark.parametrize("form", ["emb", "kv"])
def test_optimized_starts_at_truncation(tiny, prompts, builder, form):
    """Before any step (and with no held-out improvement) the fitted positions are truncation's: same answers;
    the payload's bytes are the fitted state's at the wire's bits."""
    cfg = OptConfig(opt_steps=1, opt_questions=0, opt_continue=4, opt_lr=1e-12, opt_wire_bits="32")
    fit = ParagraphFitter(tiny, prompts[0].head_ids, builder, 4, form, "use", cfg)
    pipe = OptimizedPipeline(fit, 32, f"opt-{form}")
    trunc = build("truncate", BuildContext(tiny, prompts[0].head_ids, ratio=4))[0]
    assert answers(tiny, prompts[:6], pipe) == answers(tiny, prompts[:6], trunc)
    p = prompts[0]
    M = budget(len(p.context_ids), 4)
    n_values = M * tiny.d_model if form == "emb" else M * 2 * 2 * 2 * (tiny.d_model // 4)  # 2 layers, 2 kv heads
    extra = 0 if form == "emb" else len(lw.wire.wire.varint(len(p.head_ids)))
    assert len(pipe.send(p.context_text, p.context_ids)) == 4 * n_values + extra
    stats = fit.fit(p.context_text, p.context_ids)["stats"]
    assert stats["probes_by_kind"] == {"continue": 4} and stats["steps"] == 1


def test_opt_fits_are_kept_and_reused(tiny, prompts, builder, tmp_path):
    cfg = OptConfig(opt_steps=2, opt_questions=2, opt_continue=2)
    p = prompts[0]
    a = ParagraphFitter(tiny, p.head_ids, builder, 4, "kv", "use", cfg, tmp_path / "fits")
    first = a.fit(p.context_text, p.context_ids)
    b = ParagraphFitter(tiny, p.head_ids, builder, 4, "kv", "use", cfg, tmp_path / "fits")
    again = b.fit(p.context_text, p.context_ids)
    assert again["stats"].get("reused") and torch.equal(first["state"], again["state"])
    c = ParagraphFitter(tiny, p.head_ids, builder, 4, "kv", "use", OptConfig(opt_steps=3, opt_questions=2,
                                                                            opt_continue=2), tmp_path / "fits")
    assert not c.fit(p.context_text, p.context_ids)["stats"].get("reused")  # another setting: refitted


def test_controls_tell_a_payload_that_carries_its_paragraph(tmp_path):
    """A run with a pipeline fitted to carry its input (opt-emb-copy: the receiver repeats the paragraph from
    M = L vectors): its own payload reconstructs its paragraph far better than another paragraph's payload and
    than nothing -- the controls every learned run reports can tell a wire that carries the paragraph."""
    from latentwire.evaluation.run import run_experiment
    c = RunConfig()
    c.model.model = "tiny-random"
    c.data.synthetic_articles, c.data.max_eval = 6, 8
    c.eval.max_new_tokens, c.eval.n_boot, c.eval.ac_contexts, c.eval.stage1 = 4, 20, 0, False
    c.eval.sequence, c.eval.sequence_ratios, c.eval.probe_contexts = "opt-emb-copy", "1", 3
    c.opt.opt_copy_steps, c.opt.opt_copy_lr = 60, 5e-2
    c.out, c.progress = str(tmp_path / "run"), False
    m = run_experiment(c, use_cache=False, log=lambda *a: None)
    assert m["controls"] == {"opt-emb-copy_r1": {"other": "opt-emb-copy_r1:other", "none": "none",
                                                 "truncate": "truncate_r1"}}
    P = m["pipelines"]
    own, other, none = (P[n]["reading_probe"]["recon_acc"] for n in ("opt-emb-copy_r1", "opt-emb-copy_r1:other",
                                                                      "none"))
    assert own > 0.9 and own > other + 0.5 and own > none + 0.5
    assert set(P["opt-emb-copy_r1"]["controls"]) == {"other", "none", "truncate"}
    assert P["opt-emb-copy_r1"]["fits"]["paragraphs"] > 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "against their controls" in report and "opt-emb-copy_r1:other" in report


def test_api_send_ask_equals_the_evaluation_path(tiny, prompts):
    """load_pipeline -> send -> ask gives the answer the evaluation path gives for that question
    (pipelines that read ids, and one that reads embeddings)."""
    for kind in ("truncate", "ac", "meanpool"):
        pipe = lw.load_pipeline(kind, lm=tiny, ratio=4)
        want = answers(tiny, prompts, pipe)
        for p, w in list(zip(prompts, want))[:3]:
            payload = pipe.send(p.context_text)
            assert isinstance(payload, bytes) and payload.positions > 0
            assert lw.ask(pipe, payload, p.example.question, max_new_tokens=6) == w


def test_api_evaluate_runs_given_pipelines(tiny, tmp_path):
    a = lw.load_pipeline("truncate", lm=tiny, ratio=2)
    b = lw.load_pipeline("none", lm=tiny)
    m = lw.evaluate([a, b], max_eval=6, out=tmp_path / "ev", log=lambda *x: None)
    assert set(m["pipelines"]) == {"text", "truncate_r2", "none"}
    assert m["pipelines"]["truncate_r2"]["wire"]["bytes_mean"] > 0 and (tmp_path / "ev" / "report.md").exists()
    with pytest.raises(LatentWireError, match="same loaded receiver"):
        lw.evaluate([a, lw.load_pipeline("none", model="tiny-random-b")], max_eval=2, out=tmp_path / "x")


def cli(*args, cwd=ROOT):
    from conftest import run_cli
    return run_cli(*args, cwd=cwd)


def test_cli_send_ask_round_trip(tiny, tmp_path):
    """`latentwire send` writes exactly the payload's bytes; `ask` answers from the file as the API does."""
    para = ROOT / "examples" / "paragraph.txt"
    text = " ".join(para.read_text().split())
    for kind in ("truncate", "ac"):
        out = tmp_path / f"{kind}.bin"
        r = cli("send", "--pipeline", kind, "--model", "tiny-random", str(para), "-o", str(out))
        assert r.returncode == 0, r.stderr
        assert "bytes payload + 8 bytes frame" in r.stdout and "UTF-8" in r.stdout and "zstd" in r.stdout
        pipe = lw.load_pipeline(kind, lm=tiny)
        assert out.read_bytes() == lw.wrap(pipe, pipe.send(text)) and lw.unwrap(pipe, out.read_bytes()) == pipe.send(text)
        q = "Who designed the tower?"
        r = cli("ask", "--pipeline", kind, "--model", "tiny-random", str(out), q, "--max-new-tokens", "6")
        assert r.returncode == 0, r.stderr
        assert r.stdout.rstrip("\n") == lw.ask(pipe, out.read_bytes(), q, max_new_tokens=6)


@pytest.mark.parametrize("args, msg", [
    (["send", "--pipeline", "truncate", "--model", "tiny-random", "/no/such/file", "-o", "x"], "paragraph /no/such"),
    (["ask", "--pipeline", "truncate", "--model", "tiny-random", "/no/such/payload", "q"], "payload /no/such"),
    (["send", "--pipeline", "nope", "--model", "tiny-random", "examples/paragraph.txt", "-o", "x"],
     "--pipeline nope: not a pipeline kind"),
    (["send", "--pipeline", "examples.nope:X", "--model", "tiny-random", "examples/paragraph.txt", "-o", "x"],
     "cannot import module"),
    (["send", "--pipeline", "learned", "--model", "tiny-random", "examples/paragraph.txt", "-o", "x"],
     "no trained encoder is shipped"),
    (["send", "--pipeline", "truncate", "--ratio", "0.5", "--model", "tiny-random", "examples/paragraph.txt", "-o",
      "x"], "--ratio must be >= 1"),
])
def test_cli_bad_input_is_one_line(args, msg):
    r = cli(*args)
    assert r.returncode == 2 and r.stderr.startswith("latentwire: error:") and msg in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_cli_lists_the_pipelines():
    """`python -m latentwire` as its own process (the other CLI tests call its main in-process)."""
    r = subprocess.run([sys.executable, "-m", "latentwire", "pipelines"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0
    for name in KINDS:
        assert any(line.split()[0] == name for line in r.stdout.splitlines() if line.strip())


def test_plugin_pipeline_is_evaluated_beside_ours(tmp_path):
    """`latentwire run --pipeline examples.first_last:FirstLast`: the example plug-in goes through the same
    evaluation and report, with its bytes and positions."""
    out = tmp_path / "run"
    r = cli("run", "--model", "tiny-random", "--no-stage1", "--pipeline",
            "examples.first_last:FirstLast,truncate,truncate+ac@2",
            "--synthetic-articles", "6", "--max-eval", "6", "--max-new-tokens", "4", "--n-boot", "20",
            "--ac-contexts", "0", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    import json
    m = json.loads((out / "metrics.json").read_text())
    w = m["pipelines"]["first_last"]["wire"]
    assert w["bytes_mean"] > 0 and 0 < w["positions_mean"] <= m["pipelines"]["text"]["wire"]["positions_mean"]
    assert "| first_last |" in (out / "report.md").read_text()
    assert {"truncate_r4", "truncate_r2+ac"} <= set(m["pipelines"])  # KIND@r: that kind at that ratio only


def test_max_eval_contexts_keeps_every_question_of_the_first_paragraphs():
    from latentwire.evaluation.run import load_data
    c = RunConfig()
    c.data.synthetic_articles, c.data.max_eval_contexts, c.data.max_eval = 20, 3, 0
    _, ev, _ = load_data(c)
    ctxs = list(dict.fromkeys(e.context for e in ev))
    assert len(ctxs) == 3
    c.data.max_eval_contexts = 0
    _, full, _ = load_data(c)
    assert len(ev) == sum(e.context in ctxs for e in full)


def test_learned_run_folder_send_ask_round_trip(tmp_path):
    """A learned run folder is a pipeline: `send --pipeline RUN_DIR` writes its payload (the run's model by
    default), `ask` answers from it as the evaluation path does for that question."""
    from conftest import tiny_learned_config

    from latentwire.evaluation.run import run_experiment
    run = tmp_path / "run"
    m = run_experiment(tiny_learned_config(run), use_cache=False, log=lambda *a: None)
    pipe = lw.load_pipeline(str(run))
    assert pipe.name == "learned_r4" and pipe.lm.name == "tiny-random"
    from latentwire.evaluation.run import load_data
    _, ev, _ = load_data(tiny_learned_config(run))
    p = pipe.builder.build(ev[0])
    para = tmp_path / "para.txt"
    para.write_text(p.context_text)
    r = cli("send", "--pipeline", str(run), str(para), "-o", str(tmp_path / "p.bin"))
    assert r.returncode == 0, r.stderr
    assert lw.unwrap(pipe, (tmp_path / "p.bin").read_bytes()) == bytes(pipe.send(p.context_text))
    r = cli("ask", "--pipeline", str(run), str(tmp_path / "p.bin"), p.example.question, "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    want = generate_predictions(pipe.lm, [p], pipe, max_new_tokens=4, progress=False)[0]
    assert r.stdout.rstrip("\n") == want
    assert m["pipelines"]["learned_r4"]["wire"]["bytes_mean"] > 0


def test_a_run_folder_loads_under_another_cache_folder():
    """A GGUF dequantized under another $LATENTWIRE_CACHE is the same model (its folder name carries the GGUF's
    content digest); another model, or another folder name, is not."""
    from latentwire.llm.models import same_model_source
    assert same_model_source("/root/.cache/latentwire/gguf/SmolLM2.Q4_1-b179", "/tmp/c/gguf/SmolLM2.Q4_1-b179")
    assert not same_model_source("/root/.cache/latentwire/gguf/SmolLM2.Q4_1-b179", "/tmp/c/gguf/SmolLM2.Q4_1-ffff")
    assert not same_model_source("/a/models/m", "/b/models/m") and same_model_source("org/m", "org/m")
