import math

import pytest
import torch
from hypothesis import given, strategies as st

from latentwire.evaluation.metrics import aggregate, bootstrap_ci, exact_match_score, f1_score, normalize_answer, score_example


@pytest.mark.parametrize("raw,norm", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  a  cat, an apple and THE dog ", "cat apple and dog"),
    ("theater", "theater"),  # article only as a whole word
    ("Denver Broncos.", "denver broncos"),
    ("1,000", "1000"),
    ("", ""),
])
def test_normalize_answer_matches_official(raw, norm):
    assert normalize_answer(raw) == norm


def test_f1_and_em_official_cases():
    assert f1_score("the Denver Broncos", "Denver Broncos") == 1.0
    assert exact_match_score("Denver Broncos!", "the denver broncos")
    # precision 1/3, recall 1/2 -> F1 0.4
    assert f1_score("Broncos of Denver", "Denver Colorado") == pytest.approx(0.4)
    assert f1_score("", "x") == 0.0
    assert f1_score("the", "a") == 0.0  # both normalize to empty -> no common tokens


def test_score_example_max_over_gold_and_aggregate():
    s = score_example("Paris", ["London", "paris"])
    assert s == {"em": 1.0, "f1": 1.0}
    agg = aggregate([s, score_example("Rome", ["Paris"])])
    assert agg == {"exact_match": 50.0, "f1": 50.0, "n": 2}
    with pytest.raises(ValueError):
        score_example("x", [])


def test_bootstrap_ci_brackets_mean():
    vals = [0.0] * 50 + [1.0] * 50
    lo, hi = bootstrap_ci(vals, 500, seed=1)
    assert lo < 50.0 < hi and hi - lo < 30
    assert bootstrap_ci([1.0] * 10) == (100.0, 100.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    pairs = torch.tensor([[1.0, 0.5]] * 20)
    lo, hi = bootstrap_ci(pairs, 100, stat=lambda x: x[:, 1].sum() / x[:, 0].sum())
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)


text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


@given(text, text)
def test_f1_properties(a, b):
    f = f1_score(a, b)
    assert 0.0 <= f <= 1.0
    assert f == pytest.approx(f1_score(b, a))  # symmetric
    if exact_match_score(a, b) and normalize_answer(a):
        assert f == 1.0


@given(text)
def test_normalize_idempotent(a):
    n = normalize_answer(a)
    assert normalize_answer(n) == n
    assert n == n.strip() and "  " not in n
