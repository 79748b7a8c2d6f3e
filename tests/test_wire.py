"""The wire: exact byte counts, lossless round trips, quantizers, and the
sender/receiver path every pipeline takes."""
import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentwire.wire.compress import PCA
from latentwire.data import PromptBuilder, context_token_ids, synthetic_squad
from latentwire.evaluation.generate import (EvalSwitches, as_pipeline, generate_predictions, pipeline_rows, span_payloads,
                                 wire_mask, wire_span)
from latentwire.pipelines.base import EmbeddingPipeline
from latentwire.pipelines.text import text_pipeline
from latentwire.wire.wire import (FloatQuantizer, LMArithmeticCodec, LzmaCodec, ScalarQuantizer, ids_check,
                             TokenIdCodec, Utf8Codec, ZstdCodec, lm_code_length_bits, make_quantizer, pack_rows,
                             read_varint, unpack_rows, varint, wire_stats)


@pytest.fixture(scope="module")
def prompts(tiny):
    b = PromptBuilder(tiny.tokenizer, "fewshot", 512)
    return [b.build(e) for e in synthetic_squad(6, seed=3)]


@given(st.integers(0, 10 ** 9))
def test_varint_round_trip(n):
    b = varint(n)
    assert read_varint(b + b"\xff") == (n, len(b))
    assert len(b) == max(1, math.ceil(n.bit_length() / 7))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 16), st.integers(1, 9), st.integers(0, 40), st.integers(0, 2 ** 31))
def test_pack_rows_exact_size_and_round_trip(bits, k, L, seed):
    v = np.random.default_rng(seed).integers(0, 1 << bits, size=(L, k))
    data = pack_rows(v, bits)
    header = len(varint(L)) if k * bits < 8 else 0
    assert len(data) == header + math.ceil(L * k * bits / 8)
    assert np.array_equal(unpack_rows(data, bits, k), v)


def test_text_codecs_are_lossless_with_exact_sizes(tiny, prompts):
    tok = lambda t: context_token_ids(tiny.tokenizer, t)  # noqa: E731
    tid = TokenIdCodec(tiny.vocab_size)
    assert tid.bits == math.ceil(math.log2(tiny.vocab_size))
    for p in prompts:
        assert context_token_ids(tiny.tokenizer, p.context_text) == p.context_ids
        for codec in (Utf8Codec(tok), ZstdCodec(tok), LzmaCodec(tok), tid):
            data = codec.encode(p.context_text, p.context_ids)
            assert codec.decode(data) == p.context_ids, codec.name
        assert len(Utf8Codec(tok).encode(p.context_text, p.context_ids)) == len(p.context_text.encode("utf-8"))
        assert len(tid.encode(p.context_text, p.context_ids)) == math.ceil(len(p.context_ids) * tid.bits / 8)


def test_lm_arithmetic_coding_round_trip_near_the_bound(tiny, prompts):
    head = prompts[0].head_ids
    codec = LMArithmeticCodec(tiny, head)
    ctxs = [p.context_ids for p in prompts[:3]]
    bound = lm_code_length_bits(tiny, head, ctxs, batch_size=2)
    alone = [lm_code_length_bits(tiny, head, [c])[0] for c in ctxs]
    assert np.allclose(bound, alone, rtol=1e-6)  # batching (right padding) does not change it
    for p, bits in zip(prompts[:3], bound):
        data = codec.encode(p.context_text, p.context_ids)
        assert codec.decode(data) == p.context_ids
        # a range coder with 32-bit words: within a few words of the bound
        assert bits / 8 - 1 <= len(data) <= bits / 8 + len(varint(len(p.context_ids))) + codec.CHECK_BYTES + 12


def test_lm_arithmetic_lanes_code_each_context_as_alone(tiny, prompts):
    """Contexts coded 8 at a time (lockstep lanes, other contexts beside them) give the same bytes as each
    coded alone, and decode alone or in any other grouping: a payload does not depend on its neighbours."""
    head = prompts[0].head_ids
    codec = LMArithmeticCodec(tiny, head)
    ctxs = [list(p.context_ids) for p in prompts] * 2
    ctxs = [c[:len(c) - i] for i, c in enumerate(ctxs)] + [[]]  # different lengths, and an empty context
    assert len(ctxs) > codec.LANES  # more than one group of lanes
    many = codec.encode_many([("", c) for c in ctxs])
    assert many[-1] == varint(0) + ids_check([])
    assert [codec.encode("", c) for c in ctxs[:3]] == many[:3]
    assert codec.decode_many(many[::-1]) == ctxs[::-1]
    assert [codec.decode(d) for d in many[:3]] == ctxs[:3]


def test_lm_code_length_matches_a_direct_computation(tiny, prompts):
    p = prompts[0]
    ids = torch.tensor([p.head_ids + p.context_ids])
    logp = torch.log_softmax(tiny.model(input_ids=ids).logits[0].double(), -1)
    n = len(p.head_ids)
    want = -sum(float(logp[n - 1 + i, t]) for i, t in enumerate(p.context_ids)) / math.log(2)
    assert lm_code_length_bits(tiny, p.head_ids, [p.context_ids])[0] == pytest.approx(want, rel=1e-6)


def test_lm_code_length_under_a_small_logits_budget_is_unchanged(tiny, prompts, monkeypatch):
    # a big vocabulary makes the logits of a batch huge (Gemma-3: 4 GB for 8 contexts): the batch then shrinks,
    # down to one context at a time (equal up to float32 batching noise)
    import latentwire.wire.wire as w
    ctxs = [p.context_ids for p in prompts]
    full = lm_code_length_bits(tiny, prompts[0].head_ids, ctxs, batch_size=8)
    monkeypatch.setattr(w, "LOGITS_BUDGET", 1)
    assert lm_code_length_bits(tiny, prompts[0].head_ids, ctxs, batch_size=8) == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize("scheme", ["uniform", "lloyd"])
def test_scalar_quantizer_deterministic_and_bounded(scheme, gen):
    z = torch.randn(5000, 6, generator=gen) * torch.tensor([3.0, 1.0, 0.1, 2.0, 0.5, 1.0])
    errs = []
    for bits in (1, 2, 4, 8):
        q = ScalarQuantizer(bits, scheme).fit(z)
        q2 = ScalarQuantizer(bits, scheme).fit(z)
        assert torch.equal(q.levels_, q2.levels_)  # same data -> same levels
        y = q.roundtrip(z)
        assert torch.equal(y, q.from_bytes(q.to_bytes(z), 6))  # bytes path == tensor path
        assert len(q.to_bytes(z)) == (len(varint(5000)) if 6 * bits < 8 else 0) + math.ceil(5000 * 6 * bits / 8)
        # error bounded: nearest level, so at most half the widest gap inside the fitted range
        inside = (z >= q.levels_[:, 0]) & (z <= q.levels_[:, -1])
        half_gap = (q.levels_[:, 1:] - q.levels_[:, :-1]).max(1).values / 2 if bits > 1 else \
            (q.levels_[:, 1] - q.levels_[:, 0]) / 2
        assert bool(((y - z).abs() <= half_gap + 1e-6)[inside].all())
        errs.append(float((y - z).pow(2).mean()))
    assert errs == sorted(errs, reverse=True)  # more bits, less error


def test_lloyd_beats_uniform_at_two_bits(gen):
    z = torch.randn(20000, 4, generator=gen) ** 3  # heavy tails
    e = {s: float((ScalarQuantizer(2, s).fit(z).roundtrip(z) - z).pow(2).mean()) for s in ("uniform", "lloyd")}
    assert e["lloyd"] < e["uniform"]


def test_float_quantizers(gen):
    z = torch.randn(7, 3, generator=gen)
    q32, q16 = FloatQuantizer(32), FloatQuantizer(16)
    assert torch.equal(q32.from_bytes(q32.to_bytes(z), 3), z) and len(q32.to_bytes(z)) == 7 * 3 * 4
    assert torch.equal(q16.from_bytes(q16.to_bytes(z), 3), q16.roundtrip(z)) and len(q16.to_bytes(z)) == 7 * 3 * 2
    assert isinstance(make_quantizer(16), FloatQuantizer) and isinstance(make_quantizer(3), ScalarQuantizer)


def test_straight_through_gradient(gen):
    z = torch.randn(100, 2, generator=gen)
    q = ScalarQuantizer(2).fit(z)
    x = z.clone().requires_grad_(True)
    q.roundtrip(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(z))


def test_stage1_pipeline_bytes_and_receive_equals_transform(tiny, prompts, gen):
    table = tiny.embedding_table()
    pca = PCA(5).fit(table)
    for bits in (32, 16, 3, 1):
        q = make_quantizer(bits)
        if bits < 16:
            q.fit(pca.transform(table))
        pipe = EmbeddingPipeline("s1", tiny.embed, pca.transform, pca.inverse_transform, q, 5)
        sw = EvalSwitches()
        payloads, ntok = span_payloads(pipe, prompts, sw)
        assert len(payloads) == len({tuple(p.context_ids) for p in prompts})  # one payload per context
        for pl, n in zip(payloads, ntok):
            hdr = len(varint(n)) if 5 * bits < 8 else 0
            assert pl.nbytes == hdr + math.ceil(n * 5 * bits / 8)
            assert pl.positions == n
        rows = pipeline_rows(tiny, prompts, pipe, sw)
        for p, r in zip(prompts, rows):
            s, e = wire_span(p, sw)
            x = tiny.embed(torch.tensor(p.ids)).float()
            assert torch.equal(r[:s], x[:s]) and torch.equal(r[e:], x[e:])  # the receiver's own text
            assert torch.allclose(r[s:e], pipe.transform(x[s:e]), atol=1e-6)


def test_text_pipeline_reads_exactly_the_prompt(tiny, prompts):
    pipe = text_pipeline(tiny.tokenizer)
    for p, r in zip(prompts, pipeline_rows(tiny, prompts, pipe, EvalSwitches())):
        assert r.tolist() == p.ids
    stats = wire_stats(*[[pl.nbytes for pl in span_payloads(pipe, prompts, EvalSwitches())[0]],
                         span_payloads(pipe, prompts, EvalSwitches())[1]])
    utf8 = sorted({p.context_text for p in prompts})
    assert stats["bytes_mean"] == pytest.approx(sum(len(t.encode()) for t in utf8) / len(utf8))


def test_wire_scope_context_vs_prompt(tiny, prompts):
    p = prompts[0]
    m = wire_mask(p, EvalSwitches())
    assert m.sum() == len(p.context_ids) and m[p.ctx_start:p.ctx_end].all()
    mp = wire_mask(p, EvalSwitches(keep_bos=False, keep_cue=True, scope="prompt"))
    assert mp.sum() == len(p.ids) - p.n_cue
    # in context scope the shots, question and cue are text: a zeroing receiver changes only the context
    zero = as_pipeline(tiny, lambda x: torch.zeros_like(x))
    r = pipeline_rows(tiny, [p], zero, EvalSwitches())[0]
    assert float(r[p.ctx_start:p.ctx_end].abs().sum()) == 0 and float(r[:p.ctx_start].abs().sum()) > 0


def test_identity_pipeline_gives_text_answers(tiny, prompts):
    text = generate_predictions(tiny, prompts, max_new_tokens=5, progress=False)
    table = tiny.embedding_table()
    pca = PCA(tiny.d_model).fit(table)  # full rank: lossless up to float rounding
    ident = EmbeddingPipeline("id", tiny.embed, lambda x: x, lambda z: z, FloatQuantizer(32), tiny.d_model)
    assert generate_predictions(tiny, prompts, ident, max_new_tokens=5, progress=False) == text
    assert pca.n_components == tiny.d_model


def test_wire_report_without_zstandard_leaves_out_only_zstd(tiny, prompts, monkeypatch):
    # a bare GPU image had torch + transformers but not zstandard: the run must
    # still measure every other reference and say what it left out
    from latentwire.wire.wire import text_references
    said = []
    full = text_references(tiny, prompts, code_length=False, log=said.append)
    assert "zstd" in full and not said
    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` now raises ImportError
    part = text_references(tiny, prompts, code_length=False, log=said.append)
    assert set(full) - set(part) == {"zstd"}
    assert part["utf8"] == full["utf8"] and part["token_ids"] == full["token_ids"]
    assert len(said) == 1 and "zstd reference is left out" in said[0]
