"""One evaluation path for every pipeline: each is scored on the same
questions as the text pipeline (F1, EM, retention with a paired interval,
agreement, bytes and positions on the wire, seconds at each end), and every
learned pipeline -- one that is trained or fitted (`learned = True`: the
learned compressor, the per-paragraph ceiling, a plug-in that says so) --
beside its controls:

* **another paragraph's payload** (`NAME:other`): the same receiver fed the
  payload of the next paragraph in the evaluation order. The wire carries
  *this* paragraph only if its own payload does clearly better;
* **nothing** (`none`) and **truncation at equal positions**
  (`truncate_r{r}`), added to the run when missing;
* **the first-M control** when the run has one (a pooled LM encoder trained
  the same way but sent only the first M tokens: what training adds with no
  content beyond truncation's);
* **reading probes** on held-out (evaluation) paragraphs, question-free:
  reconstruction (token accuracy and CE of the receiver writing the
  paragraph back after "Repeat the context:") and continuation (CE of the
  article's next paragraph read after it), for the pipeline, its
  other-paragraph control and the references.

Paired differences against each control (95% bootstrap intervals over
questions) go to metrics.json (`controls`), the report and the console.
Every run with a truncation row also splits every row's F1 by where the gold
answer lies -- within the first M tokens (what truncation keeps) or beyond
them -- paired against truncation (`answer_split`, metrics.json
`answer_split`).
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data import context_token_ids, distinct_contexts
from .generate import EvalSwitches, span_payloads, wire_span, wire_text
from .metrics import paired_delta, pipeline_metrics, retention, score_example
from ..pipelines.base import Pipeline
from ..wire.wire import wire_stats
from ..pipelines.tokens import budget
from ..llm.forward import head_cache, read_tails
from .probes import Probe, probe_terms, repeat_probe


def is_learned(p) -> bool:
    return bool(getattr(p, "learned", False))


def pipeline_ratio(p) -> float | None:
    r = p.describe().get("ratio")
    return float(r) if r is not None else None


class OtherParagraph(Pipeline):
    """A control: `inner` sends, for each context, the payload of the next distinct context of the evaluation
    (cyclically); its receiver reads that payload. The same questions, a payload about another paragraph."""
    learned = False

    def __init__(self, inner: Pipeline, prompts):
        super().__init__()
        self.inner, self.name, self.reads, self.lm = inner, f"{inner.name}:other", inner.reads, inner.lm
        order = distinct_contexts(prompts)
        self.next = {tuple(p.context_ids): order[(i + 1) % len(order)] for i, p in enumerate(order)}

    def encode(self, text, ids):
        o = self.next[tuple(ids)]
        return self.inner.send(o.context_text, o.context_ids)

    def decode(self, data):
        return self.inner.receive(data)

    def describe(self):
        return self.inner.describe() | {"name": self.name, "control": "another paragraph's payload"}


def wire_entry(pipe, prompts, sw: EvalSwitches) -> dict:
    """Bytes and positions of a pipeline's payloads over the distinct contexts, and seconds at each end."""
    payloads, ntok = span_payloads(pipe, prompts, sw)
    scope_ctx = pipe.reads != "embeds" or sw.scope == "context"
    by_ctx = {tuple(p.context_ids): pl.positions for p, pl in zip(distinct_contexts(prompts), payloads)} \
        if scope_ctx else {}
    prefill = [len(p.ids) - len(p.context_ids) + by_ctx[tuple(p.context_ids)] for p in prompts] if by_ctx else \
        [len(p.ids) for p in prompts]
    timing = pipe.timing() if hasattr(pipe, "timing") else {}
    return wire_stats([len(p) for p in payloads], ntok, [getattr(p, "positions", 0) for p in payloads]) \
        | pipe.describe() | timing | {"prompt_positions_mean": sum(prefill) / max(1, len(prefill))}


def send_all(pipe, prompts, sw: EvalSwitches, progress: bool, chunk: int = 32) -> None:
    """Every distinct context's payload, sent and received before generation (a progress bar for slow senders:
    fits, LLM coding), `chunk` contexts at a time through send_many / receive_many where the pipeline has them
    (the LLM-coded wires step 8 contexts together; they sort each chunk by length)."""
    seen = {}
    for p in prompts:
        s, e = wire_span(p, sw, pipe)
        seen.setdefault(tuple(p.ids[s:e]), wire_text(p, sw, pipe))
    items = [(text, list(span)) for span, text in seen.items()]
    batched = callable(getattr(pipe, "send_many", None)) and callable(getattr(pipe, "receive_many", None))
    step = chunk if batched else 1
    bar = tqdm(total=len(items), desc=f"{pipe.name}: send", disable=not progress, leave=False)
    for i in range(0, len(items), step):
        part = items[i:i + step]
        if batched:
            pipe.receive_many(pipe.send_many(part))
        else:
            pipe.receive(pipe.send(*part[0]))
        bar.update(len(part))
    bar.close()


def score_rows(prompts, preds: Sequence[str], text_preds: Sequence[str] | None = None) -> list[dict]:
    """Per-question rows: gold, prediction, EM/F1 (the official v1.1 metric), and agreement with the text answer."""
    rows = []
    for i, (p, pred) in enumerate(zip(prompts, preds)):
        s = score_example(pred, p.example.answers)
        row = {"id": p.example.id, "title": p.example.title, "question": p.example.question,
               "gold": p.example.answers, "prediction": pred, "em": s["em"], "f1": s["f1"],
               "prompt_tokens": len(p.ids), "truncated": p.truncated}
        if text_preds is not None:
            row["text_prediction"] = text_preds[i]
            row["agree"] = pred == text_preds[i]
        rows.append(row)
    return rows


def pipeline_entry(rows: list[dict], text_rows: list[dict], n_boot: int, seed: int) -> dict:
    ret, ret_ci = retention(text_rows, rows, n_boot, seed)
    return pipeline_metrics(rows, n_boot, seed) | {
        "f1_retention": ret, "f1_retention_ci95": ret_ci,
        "agreement": sum(r["agree"] for r in rows) / len(rows) if rows else None}


def add_controls(pipelines: dict, prompts, build_baseline) -> dict[str, dict]:
    """For every learned pipeline: its other-paragraph control (added to `pipelines` right after it) and the
    names of its nothing / truncation controls (built with `build_baseline(kind, ratio)` when missing), and, when
    the run has one, its first-M control (a pipeline whose `first_m_of` names it: the same encoder trained the
    same way but sent only the first M tokens).
    Returns {learned name: {"other": name, "none": name, "truncate": name or None[, "first_m": name]}}."""
    out: dict[str, dict] = {}
    first_m = {getattr(p, "first_m_of", None): n for n, p in pipelines.items() if getattr(p, "first_m_of", None)}
    for name, p in list(pipelines.items()):
        if not is_learned(p):
            continue
        r = pipeline_ratio(p)
        ctl = {"other": f"{name}:other", "none": "none", "truncate": None if r is None else f"truncate_r{r:g}"}
        if name in first_m:
            ctl["first_m"] = first_m[name]
        if "none" not in pipelines:
            pipelines["none"] = build_baseline("none", 1.0)
        if ctl["truncate"] and ctl["truncate"] not in pipelines:
            pipelines[ctl["truncate"]] = build_baseline("truncate", r)
        out[name] = ctl
    ordered: dict = {}
    for name, p in pipelines.items():
        ordered[name] = p
        if name in out and getattr(p, "other_control", True):
            ordered[out[name]["other"]] = OtherParagraph(p, prompts)
        elif name in out:  # a variant of another row (the same fits at fewer bits): that row has the control
            out[name]["other"] = None
    pipelines.clear()
    pipelines.update(ordered)
    return out


def control_deltas(rows: dict[str, list[dict]], controls: dict[str, dict], n_boot: int, seed: int) -> dict:
    """Per learned pipeline: F1 and agreement minus each control's, paired over questions, [delta, lo, hi]."""
    out = {}
    for name, ctl in controls.items():
        if name not in rows:
            continue
        d = {}
        for which, other in ctl.items():
            if other is None or other not in rows:
                continue
            if [r["id"] for r in rows[other]] != [r["id"] for r in rows[name]]:
                raise ValueError(f"{name} and {other} were scored on different questions")
            d[which] = {"pipeline": other, "d_f1": list(paired_delta(rows[other], rows[name], "f1", n_boot, seed)),
                        "d_agreement": list(paired_delta(rows[other], rows[name], "agree", n_boot, seed))}
        out[name] = d
    return out


def answer_within(tokenizer, example, context_text: str, ratio: float) -> bool:
    """Whether one of the question's gold answers lies wholly inside the first M = ceil(L / r) tokens of the
    context as the prompt holds it (the receiver's tokens of ' ' + context, `data.context_token_ids`): what
    truncation at r keeps. Only a reading that carries more than those tokens can win on the other questions."""
    if not context_text:
        return False
    offsets = tokenizer(" " + context_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    M = budget(len(offsets), ratio)
    kept = offsets[M - 1][1] - 1 if M else 0  # characters of the context the M tokens cover (after the space)
    return any(s + len(a) <= kept for a, s in zip(example.answers, example.answer_starts) if s >= 0)


def answer_split(tokenizer, prompts, rows_by: dict[str, list[dict]], ratios: Sequence[float], n_boot: int,
                 seed: int, controls: dict | None = None) -> dict:
    """Every row's F1 on the questions whose answer lies within the first M tokens and on the rest, at each ratio
    r whose truncation row the run has, with ΔF1 against truncation paired over those questions, and -- for a
    learned row whose first-M control is in the run (`controls`, from add_controls) -- ΔF1 against that control
    (`d_first_m`: on the questions beyond M, what the wire's content past truncation's tokens adds):
    {"r4": {"within": n, "beyond": n, "pipelines": {name: {"within": {"f1", "d_truncate"[, "d_first_m"]},
    "beyond": ...}}}}."""
    out = {}
    cache: dict[tuple, bool] = {}
    for r in ratios:
        tname = f"truncate_r{r:g}"
        if tname not in rows_by or not prompts or not prompts[0].example.answer_starts:
            continue
        inside = []
        for p in prompts:
            key = (p.context_text, p.example.id, r)
            if key not in cache:
                cache[key] = answer_within(tokenizer, p.example, p.context_text, r)
            inside.append(cache[key])
        parts = {"within": [i for i, x in enumerate(inside) if x], "beyond": [i for i, x in enumerate(inside) if not x]}
        base = rows_by[tname]
        entry = {"within": len(parts["within"]), "beyond": len(parts["beyond"]), "truncate": tname, "pipelines": {}}
        base_ids = [x["id"] for x in base]
        same = {n for n, rows in rows_by.items() if [x["id"] for x in rows] == base_ids}
        for name, rows in rows_by.items():
            if name not in same:
                continue
            fm = ((controls or {}).get(name) or {}).get("first_m")
            fm_rows = rows_by[fm] if fm in same else None
            cell = {}
            for part, idx in parts.items():
                if not idx:
                    continue
                a, b = [base[i] for i in idx], [rows[i] for i in idx]
                cell[part] = {"f1": 100 * sum(x["f1"] for x in b) / len(b),
                              "d_truncate": None if name == tname else list(paired_delta(a, b, "f1", n_boot, seed))}
                if fm_rows is not None:
                    cell[part]["d_first_m"] = list(paired_delta([fm_rows[i] for i in idx], b, "f1", n_boot, seed))
            entry["pipelines"][name] = cell
        out[f"r{r:g}"] = entry
    return out


@torch.no_grad()
def measure_readings(lm, prompts, pipelines: dict, builder, n_contexts: int, cont_tokens: int = 64) -> dict:
    """Question-free probes of what each pipeline's reading holds, on the first `n_contexts` evaluation
    paragraphs: reconstruction (teacher-forced token accuracy and CE of the receiver writing the paragraph
    back after REPEAT_CUE) and continuation (CE per token of the article's next paragraph, its first
    `cont_tokens` tokens, read right after the reading)."""
    ctxs = distinct_contexts(prompts)[:n_contexts]
    if not ctxs:
        return {}
    head = ctxs[0].head_ids
    hc = head_cache(lm, head)
    out = {}
    for name, pipe in pipelines.items():
        if pipe.reads not in ("ids", "embeds", "kv"):
            continue
        acc = {"recon_acc": 0.0, "recon_ce": 0.0, "recon_tokens": 0, "cont_ce": 0.0, "cont_tokens": 0}
        t0 = time.time()
        for c in ctxs:
            reading = pipe.receive(pipe.send(c.context_text, c.context_ids))
            probes = [repeat_probe(builder, c.context_ids)]
            nxt = context_token_ids(lm.tokenizer, c.example.next_context)[:cont_tokens + 1] \
                if c.example.next_context else []
            if len(nxt) > 1:
                probes.append(Probe(nxt[:1], nxt[1:], "continue"))
            for p in probes:
                first = len(p.tail) - 1
                logits = read_tails(lm, hc, len(head), [reading], pipe.reads, [p.tail + p.target[:-1]],
                                    keep_from=first)
                t = probe_terms(logits, [p], first)
                n = len(p.target)
                if p.kind == "repeat":
                    acc["recon_acc"] += float(t["acc"]) * n
                    acc["recon_ce"] += float(t["ce"]) * n
                    acc["recon_tokens"] += n
                else:
                    acc["cont_ce"] += float(t["ce"]) * n
                    acc["cont_tokens"] += n
        out[name] = {"contexts": len(ctxs),
                     "recon_acc": acc["recon_acc"] / max(acc["recon_tokens"], 1),
                     "recon_ce": acc["recon_ce"] / max(acc["recon_tokens"], 1),
                     "cont_ce": acc["cont_ce"] / acc["cont_tokens"] if acc["cont_tokens"] else None,
                     "cont_contexts": sum(bool(c.example.next_context) for c in ctxs), "probe_s": time.time() - t0}
    return out


def probe_set(pipelines: dict, controls: dict[str, dict]) -> dict:
    """The pipelines whose readings are probed: the learned ones, their controls, and the text reference."""
    names = [n for n in ("text", "none") if n in pipelines]
    for name, ctl in controls.items():
        names += [name] + [c for c in ctl.values() if c]
    return {n: pipelines[n] for n in dict.fromkeys(names) if n in pipelines}


__all__ = ["OtherParagraph", "add_controls", "control_deltas", "is_learned", "measure_readings", "pipeline_entry",
           "pipeline_ratio", "probe_set", "score_rows", "send_all", "wire_entry"]
