"""Sequence compression baselines: fewer positions than tokens, exact bytes,
and the same answers batched as one at a time."""
import math

import pytest
import torch

from latentwire.data import PromptBuilder, synthetic_squad
from latentwire.evaluation.generate import EvalSwitches, generate_predictions, pipeline_rows, span_payloads
from latentwire.pipelines.pooled import mean_pool, meanpool_pipeline
from latentwire.pipelines.tokens import TokenSelectPipeline, budget, surprisal
from latentwire.wire.wire import FloatQuantizer


@pytest.fixture(scope="module")
def prompts(tiny):
    b = PromptBuilder(tiny.tokenizer, "fewshot", 512)
    return [b.build(e) for e in synthetic_squad(6, seed=5)][:14]


def test_budget():
    assert [budget(L, 4) for L in (0, 1, 4, 5, 154)] == [0, 1, 1, 2, 39]
    assert budget(10, 1) == 10


def test_mean_pool_matches_a_loop(gen):
    x = torch.randn(11, 5, generator=gen)
    y = mean_pool(x, 4)
    want = torch.stack([x[0:4].mean(0), x[4:8].mean(0), x[8:11].mean(0)])
    assert y.shape == (3, 5) and torch.allclose(y, want, atol=1e-6)
    with pytest.raises(ValueError):
        mean_pool(x, 2.5)


@pytest.mark.parametrize("kind", ["truncate", "surprisal"])
def test_token_selection_bytes_positions_and_order(tiny, prompts, kind):
    head = prompts[0].head_ids
    pipe = TokenSelectPipeline(kind, 4, tiny.vocab_size, tiny, head)
    bits = math.ceil(math.log2(tiny.vocab_size))
    payloads, ntok = span_payloads(pipe, prompts, EvalSwitches())
    for pl, n in zip(payloads, ntok):
        m = budget(n, 4)
        assert pl.positions == m and pl.nbytes == math.ceil(m * bits / 8)
    p = prompts[0]
    kept = pipe.receive(pipe.payload(p.context_ids, p.context_text)).tolist()
    if kind == "truncate":
        assert kept == p.context_ids[:budget(len(p.context_ids), 4)]
    else:
        s = surprisal(tiny, head, p.context_ids)
        idx = pipe.keep(p.context_ids)
        assert idx == sorted(idx) and [p.context_ids[i] for i in idx] == kept
        # nothing dropped is more surprising than anything kept
        dropped = [i for i in range(len(p.context_ids)) if i not in idx]
        assert float(s[dropped].max()) <= float(s[idx].min())
    rows = pipeline_rows(tiny, [p], pipe, EvalSwitches())
    assert rows[0].tolist() == p.head_ids + kept + p.ids[p.ctx_end:]


def test_surprisal_matches_the_lm_code_length(tiny, prompts):
    from latentwire.wire.wire import lm_code_length_bits
    p = prompts[1]
    total = float(surprisal(tiny, p.head_ids, p.context_ids).sum())
    assert total == pytest.approx(lm_code_length_bits(tiny, p.head_ids, [p.context_ids])[0], rel=1e-6)


def test_meanpool_rows_have_fewer_positions(tiny, prompts):
    pipe = meanpool_pipeline(tiny, 4, FloatQuantizer(16))
    p = prompts[0]
    pl = pipe.payload(p.context_ids, p.context_text)
    m = budget(len(p.context_ids), 4)
    assert pl.positions == m and pl.nbytes == m * tiny.d_model * 2
    row = pipeline_rows(tiny, [p], pipe, EvalSwitches())[0]
    assert row.shape == (len(p.ids) - len(p.context_ids) + m, tiny.d_model)


@pytest.mark.parametrize("make", [lambda lm, h: TokenSelectPipeline("surprisal", 4, lm.vocab_size, lm, h),
                                  lambda lm, h: meanpool_pipeline(lm, 4, FloatQuantizer(32))])
def test_batched_equals_one_at_a_time(tiny, prompts, make):
    pipe = make(tiny, prompts[0].head_ids)
    batched = generate_predictions(tiny, prompts, pipe, batch_size=5, max_new_tokens=6, progress=False)
    alone = [generate_predictions(tiny, [p], pipe, batch_size=1, max_new_tokens=6, progress=False,
                                  share_prefix=False)[0] for p in prompts]
    assert batched == alone


def test_run_with_sequence_baselines(tmp_path):
    from latentwire.config import RunConfig
    from latentwire.evaluation.run import run_experiment
    c = RunConfig()
    c.model.model = "tiny-random"
    c.data.synthetic_articles, c.data.max_eval = 6, 8
    c.train.epochs, c.train.steps_per_epoch, c.train.batch_tokens = 1, 5, 64
    c.eval.max_new_tokens, c.eval.n_boot, c.eval.ac_contexts = 4, 20, 0
    c.eval.sequence, c.eval.sequence_ratios = "truncate,surprisal,meanpool", "2,4"
    c.out, c.progress, c.controls = str(tmp_path / "run"), False, False
    m = run_experiment(c, use_cache=False, log=lambda *a: None)
    text = m["pipelines"]["text"]["wire"]
    for name in ("truncate_r2", "surprisal_r4", "meanpool_r4"):
        e = m["pipelines"][name]
        assert {"f1", "f1_retention", "agreement", "s_per_question", "wire"} <= set(e), name
        assert e["wire"]["positions_mean"] < text["positions_mean"]
        assert e["wire"]["prompt_positions_mean"] < text["prompt_positions_mean"]
    assert (tmp_path / "run" / "predictions_surprisal_r4.official.json").exists()


def test_none_sends_nothing(tiny, prompts):
    """`none`: 0 bytes, 0 positions; the receiver reads its own head and the question."""
    from latentwire.pipelines import BuildContext, build
    pipe = build("none", BuildContext(tiny, prompts[0].head_ids, ratio=2))[0]
    assert pipe.name == "none"
    payloads, _ = span_payloads(pipe, prompts, EvalSwitches())
    assert all(pl.nbytes == 0 and pl.positions == 0 for pl in payloads)
    p = prompts[0]
    assert pipeline_rows(tiny, [p], pipe, EvalSwitches())[0].tolist() == p.head_ids + p.ids[p.ctx_end:]
