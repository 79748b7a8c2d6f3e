"""SQuAD v1.1 EM/F1, exactly as the official evaluation script defines them.

Per-example scoring (`score_example`) is separate from aggregation
(`aggregate`), so diagnostics and bootstrap intervals reuse the same numbers.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import torch

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace
    (official v1.1: lower -> remove_punc -> remove_articles -> white_space_fix)."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        return "".join(ch for ch in text if ch not in _PUNCT)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(metric_fn, prediction: str, ground_truths: Sequence[str]):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def score_example(prediction: str, ground_truths: Sequence[str]) -> dict:
    """EM and F1 of one prediction against its gold answers, each in [0, 1]."""
    if not ground_truths:
        raise ValueError("score_example: no gold answers")
    return {"em": float(metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)),
            "f1": float(metric_max_over_ground_truths(f1_score, prediction, ground_truths))}


def aggregate(scores: Sequence[dict]) -> dict:
    """Mean x 100 over all questions, as the official script reports."""
    n = len(scores)
    if n == 0:
        return {"exact_match": 0.0, "f1": 0.0, "n": 0}
    return {"exact_match": 100.0 * sum(s["em"] for s in scores) / n,
            "f1": 100.0 * sum(s["f1"] for s in scores) / n, "n": n}


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                 stat=None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (x100) over questions.

    `values` may be a 1-D sequence (interval of its mean) or, with `stat`, a
    [n, k] tensor and a function of a resampled tensor (e.g. a ratio of means).
    """
    x = torch.as_tensor(values, dtype=torch.float64)
    n = x.shape[0]
    if n == 0:
        return (float("nan"), float("nan"))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    if stat is None:
        boots = x[idx].mean(dim=1) * 100.0
    else:
        boots = torch.stack([torch.as_tensor(stat(x[i]), dtype=torch.float64) for i in idx])
    lo = torch.quantile(boots, alpha / 2).item()
    hi = torch.quantile(boots, 1 - alpha / 2).item()
    return (lo, hi)


# ---------------------------------------------------------- aggregation over a pipeline's rows

def pipeline_metrics(rows: list[dict], n_boot: int, seed: int) -> dict:
    """F1 / EM over per-question rows (each with "f1", "em"), with 95% bootstrap intervals."""
    agg = aggregate(rows)
    f1s = [r["f1"] for r in rows]
    ems = [r["em"] for r in rows]
    return {"f1": agg["f1"], "exact_match": agg["exact_match"], "n": agg["n"],
            "f1_ci95": list(bootstrap_ci(f1s, n_boot, seed)), "em_ci95": list(bootstrap_ci(ems, n_boot, seed))}


def retention(text_rows: list[dict], rows: list[dict], n_boot: int, seed: int
              ) -> tuple[float | None, list[float] | None]:
    """F1 / the text pipeline's F1 on the same questions, with a paired bootstrap interval."""
    t = sum(r["f1"] for r in text_rows)
    if t == 0:
        return None, None
    ret = sum(r["f1"] for r in rows) / t
    pairs = torch.tensor([[a["f1"], b["f1"]] for a, b in zip(text_rows, rows)], dtype=torch.float64)
    ci = bootstrap_ci(pairs, n_boot, seed, stat=lambda x: x[:, 1].sum() / x[:, 0].sum().clamp_min(1e-12))
    return ret, list(ci)


def paired_delta(base_rows: list[dict], rows: list[dict], key: str, n_boot: int, seed: int
                 ) -> tuple[float, float, float]:
    """mean(rows[key]) - mean(base_rows[key]) x 100 over the same questions, and its 95% paired bootstrap
    interval (rows matched by position; the caller checks the question ids)."""
    a = torch.tensor([float(r[key]) for r in base_rows], dtype=torch.float64)
    b = torch.tensor([float(r[key]) for r in rows], dtype=torch.float64)
    lo, hi = bootstrap_ci((b - a).tolist(), n_boot, seed)
    return 100.0 * float(b.mean() - a.mean()), lo, hi

