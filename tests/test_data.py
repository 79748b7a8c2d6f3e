import json

import pytest
from hypothesis import given, settings, strategies as st

from latentwire.data import (PromptBuilder, interleave_by_title, load_squad_json, split_by_title, synthetic_squad)
from latentwire.errors import LatentWireError


def _squad(articles):
    return {"version": "1.1", "data": articles}


def _article(title, ctx="Paris is the capital of France.", qas=None):
    qas = qas if qas is not None else [
        {"id": f"{title}-1", "question": "What is the capital?", "answers": [{"text": "Paris", "answer_start": 0}]}]
    return {"title": title, "paragraphs": [{"context": ctx, "qas": qas}]}


def write(tmp_path, obj, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj) if not isinstance(obj, (str, bytes)) else obj) if not isinstance(obj, bytes) \
        else p.write_bytes(obj)
    return p


def test_synthetic_is_deterministic_and_extractive():
    a, b = synthetic_squad(10, seed=3), synthetic_squad(10, seed=3)
    assert a == b
    assert synthetic_squad(10, seed=4) != a
    for e in a:
        assert e.context[e.answer_starts[0]:e.answer_starts[0] + len(e.answers[0])] == e.answers[0]
    assert len({e.title for e in a}) == 10


def test_split_by_title_never_shares_articles():
    ex = synthetic_squad(20, seed=0)
    tr, ev = split_by_title(ex, 0.3, seed=1)
    assert tr and ev and len(tr) + len(ev) == len(ex)
    assert not ({e.title for e in tr} & {e.title for e in ev})


def test_interleave_spans_articles():
    ex = synthetic_squad(6, seed=0)
    first = interleave_by_title(ex)[:6]
    assert len({e.title for e in first}) == 6


def test_v2_unanswerable_skipped_and_counted(tmp_path):
    qas = [{"id": "q1", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
           {"id": "q2", "question": "King?", "answers": [], "is_impossible": True},
           {"id": "q3", "question": "Moon?", "answers": [{"text": "Moon", "answer_start": 3}]}]
    ex, rep = load_squad_json(write(tmp_path, _squad([_article("A", qas=qas)])))
    assert [e.id for e in ex] == ["q1"]
    assert rep.skipped_unanswerable == 1 and rep.skipped_answer_not_in_context == 1


def test_answer_start_repaired_when_text_present(tmp_path):
    qas = [{"id": "q1", "question": "Capital?", "answers": [{"text": "France", "answer_start": 0}]}]
    ex, _ = load_squad_json(write(tmp_path, _squad([_article("A", qas=qas)])))
    assert ex[0].answer_starts == [ex[0].context.index("France")]


BAD = [
    ("missing file", None, "no such file"),
    ("invalid json", "{not json", "not valid JSON"),
    ("not squad", {"foo": 1}, "not SQuAD JSON"),
    ("no title", _squad([{"paragraphs": []}]), "missing 'title'"),
    ("no paragraphs", _squad([{"title": "A"}]), "missing 'paragraphs'"),
    ("empty context", _squad([_article("A", ctx="  ")]), "empty or missing 'context'"),
    ("no answerable", _squad([_article("A", qas=[{"id": "x", "question": "?", "answers": [],
                                                    "is_impossible": True}])]), "has no answerable question"),
    ("missing answers", _squad([_article("A", qas=[{"id": "x", "question": "Why?"}])]), "question x: missing 'answers'"),
    ("missing id", _squad([_article("A", qas=[{"question": "Why?", "answers": []}])]), "missing 'id'"),
    ("non utf8", b"\xff\xfe{", "not UTF-8"),
]


@pytest.mark.parametrize("name,content,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_squad_inputs(tmp_path, name, content, msg):
    path = tmp_path / "missing.json" if content is None else write(tmp_path, content)
    with pytest.raises(LatentWireError) as e:
        load_squad_json(path, "--squad-eval")
    assert msg in str(e.value) and "--squad-eval" in str(e.value)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=30).filter(str.strip),
                          st.integers(0, 20), st.integers(1, 8)), min_size=1, max_size=5))
def test_loader_roundtrip_property(tmp_path_factory, arts):
    """Any well-formed SQuAD file with span answers loads every question, and
    every loaded answer is a span of its context."""
    data, expect = [], 0
    for i, (ctx, s, n) in enumerate(arts):
        ctx = ctx + " tail"
        s = min(s, len(ctx) - 1)
        n = max(1, min(n, len(ctx) - s))
        ans = ctx[s:s + n]
        if not ans.strip():
            ans, s = "tail", ctx.rindex("tail")
        data.append(_article(f"T{i}", ctx=ctx, qas=[{"id": f"q{i}", "question": "q?", "answers": [
            {"text": ans, "answer_start": s}]}]))
        expect += 1
    p = tmp_path_factory.mktemp("h") / "d.json"
    p.write_text(json.dumps(_squad(data)))
    ex, rep = load_squad_json(p)
    assert len(ex) == expect == rep.n_questions
    for e in ex:
        st_ = e.answer_starts[0]
        assert e.context[st_:st_ + len(e.answers[0])] == e.answers[0]


@pytest.mark.parametrize("template", ["plain", "fewshot", "chat"])
def test_prompt_truncation_keeps_question_and_cue(tiny, template):
    tok = tiny.tokenizer
    ex = synthetic_squad(2, seed=0)[0]
    ex.context = " ".join([ex.context] * 30)
    full = PromptBuilder(tok, template, max_prompt_tokens=5000).build(ex)
    assert not full.truncated
    budget = len(full.ids) - 150
    b = PromptBuilder(tok, template, max_prompt_tokens=budget)
    p = b.build(ex)
    assert len(p.ids) <= budget and p.truncated
    text = tok.decode(p.ids)
    assert ex.question in text
    assert p.ids[-p.n_cue:] == b.cue_ids
    assert p.ids[:p.n_prefix] == full.ids[:full.n_prefix]


def test_prompt_question_too_long_is_an_error(tiny):
    ex = synthetic_squad(2, seed=0)[0]
    ex.question = "why " * 300
    with pytest.raises(LatentWireError, match="question syn-0-0-0"):
        PromptBuilder(tiny.tokenizer, "plain", 64).build(ex)


def test_prompt_bos_and_segments(tiny):
    ex = synthetic_squad(2, seed=0)[0]
    p = PromptBuilder(tiny.tokenizer, "fewshot", 512, add_bos=True).build(ex)
    assert p.ids[0] == tiny.tokenizer.bos_token_id and p.n_bos == 1 and p.n_prefix > 0
    with pytest.raises(LatentWireError, match="--template"):
        PromptBuilder(tiny.tokenizer, "nope")
