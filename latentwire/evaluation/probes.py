"""Probes: what a sender can ask of a paragraph without seeing any
evaluation question, to fit or train a representation for *use* rather than
for copying (Cartridges' self-study; ICAE's continuation).

A probe is a tail the receiver reads after [head][M positions] and a target
(the tokens after it, teacher-forced): the loss distils the receiver's
distribution at each target token towards the same LLM reading the whole
paragraph as text (top-k KL), or, for copying, is the CE of the paragraph's
own tokens.

* ``question`` (self-study): the LLM writes questions about the paragraph
  (sampled after the few-shot shots' context/question pairs), the LLM reading
  the paragraph answers each as the evaluation would (greedy, same template);
  the target is that answer.
* ``continue`` (cue-and-continue): a snippet of the paragraph in a question
  ("What comes after "..."?"), the target the paragraph's next tokens.
* ``repeat`` (copying): "Repeat the context:", the target the paragraph itself.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..data import FEWSHOT_SHOTS, Example, PromptBuilder
from ..llm.forward import read_tails

REPEAT_CUE = "\nRepeat the context:"
"""The cue after which a receiver writes the paragraph back (copy objective, reconstruction accuracy)."""


@dataclass
class Probe:
    tail: list[int]
    target: list[int]
    kind: str
    t_logp: torch.Tensor | None = None  # [A, k]: the teacher's top-k log-probabilities at the target positions
    t_ids: torch.Tensor | None = None   # [A, k]
    text: str = field(default="", repr=False)


def paragraph_seed(ids: Sequence[int], seed: int) -> int:
    """A per-paragraph seed: the same paragraph gets the same probes in every run with this --opt-seed."""
    return int(hashlib.sha256(repr((list(ids), seed)).encode()).hexdigest()[:8], 16)


def question_prompt(text: str) -> str:
    """The shots' context/question pairs, then the paragraph: the LLM continues with a question about it."""
    shots = "".join(f"Context: {c}\nQuestion: {q}\n\n" for c, q, _ in FEWSHOT_SHOTS)
    return f"{shots}Context: {text}\nQuestion:"


@torch.no_grad()
def sample_questions(lm, text: str, n: int, seed: int, max_new_tokens: int = 32) -> list[str]:
    """Up to n distinct questions the LLM writes about `text` (sampled: temperature 1, top-p 0.95)."""
    if n <= 0:
        return []
    tok = lm.tokenizer
    ids = tok(question_prompt(text), add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids], device=lm.device).expand(n, -1)
    with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = lm.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0,
                                top_p=0.95, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    qs = [tok.decode(o[len(ids):], skip_special_tokens=True).split("\n")[0].strip() for o in out]
    return [q for q in dict.fromkeys(qs) if len(q) > 8]


def question_probes(lm, builder: PromptBuilder, text: str, questions: Sequence[str], batch_size: int = 8
                    ) -> list[Probe]:
    """Each question answered by the LLM reading the paragraph (the evaluation's path and template)."""
    from .generate import generate_predictions  # upward: the layers contract lists it
    prompts = [builder.build(Example(f"probe-{i}", "probe", text, q, ["-"])) for i, q in enumerate(questions)]
    answers = generate_predictions(lm, prompts, None, batch_size=batch_size, progress=False)
    tok = lm.tokenizer
    out = []
    for p, q, a in zip(prompts, questions, answers):
        if a:
            out.append(Probe(builder.tail_ids(q) + builder.cue_ids,
                             tok(" " + a + "\n", add_special_tokens=False)["input_ids"], "question", text=q))
    return out


def continue_probes(builder: PromptBuilder, ctx_ids: Sequence[int], n: int, seed: int, snippet: int = 8,
                    cont: int = 12) -> list[Probe]:
    """n snippets of the paragraph (starts drawn over all of it), each asking for the tokens that follow."""
    tok = builder.tok
    L = len(ctx_ids)
    if L < snippet + 2 or n <= 0:
        return []
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = rng.randrange(0, L - snippet - 1)
        snip = tok.decode(list(ctx_ids[s:s + snippet])).strip()
        q = f'What comes after "{snip}"?'
        out.append(Probe(builder.tail_ids(q) + builder.cue_ids, list(ctx_ids[s + snippet:s + snippet + cont]),
                         "continue", text=q))
    return out


def repeat_probe(builder: PromptBuilder, ctx_ids: Sequence[int]) -> Probe:
    """Copying: the receiver writes the paragraph back after REPEAT_CUE."""
    return Probe(builder._ids(REPEAT_CUE), list(ctx_ids), "repeat", text="repeat")


@torch.no_grad()
def attach_teacher(lm, hc, n_head: int, ctx_ids: Sequence[int], probes: Sequence[Probe], topk: int = 64,
                   batch: int = 16) -> None:
    """The teacher's top-k at each probe's target positions: the LLM reading [head][paragraph as text][tail][target]."""
    reading = torch.tensor(list(ctx_ids), dtype=torch.long)
    for b in range(0, len(probes), batch):
        chunk = probes[b:b + batch]
        first = min(len(p.tail) for p in chunk) - 1
        logits = read_tails(lm, hc, n_head, [reading], "ids", [p.tail + p.target for p in chunk], keep_from=first)
        for i, p in enumerate(chunk):
            s = len(p.tail) - 1 - first
            lp = torch.log_softmax(logits[i, s:s + len(p.target)].float(), -1)
            v, ix = lp.topk(min(topk, lp.shape[-1]), -1)
            p.t_logp, p.t_ids = v.half().cpu(), ix.int().cpu()


def probe_terms(logits: torch.Tensor, probes: Sequence[Probe], first: int) -> dict[str, torch.Tensor]:
    """Per target token: CE on the target, top-1 accuracy, and KL(teacher top-k || receiver) where a teacher is
    attached; row i's target is predicted from logits[i, len(tail_i) - 1 - first ...]."""
    dev = logits.device
    ce = kl = logits.new_zeros(())
    hit, n, n_kl = 0.0, 0, 0
    for i, p in enumerate(probes):
        s = len(p.tail) - 1 - first
        lp = torch.log_softmax(logits[i, s:s + len(p.target)].float(), -1)
        gold = torch.tensor(p.target, dtype=torch.long, device=dev)
        ce = ce - lp.gather(-1, gold[:, None]).sum()
        hit += float((lp.argmax(-1) == gold).sum())
        n += len(p.target)
        if p.t_logp is not None:
            q = torch.softmax(p.t_logp.float().to(dev), -1)
            kl = kl + (q * (torch.log(q.clamp_min(1e-12)) - lp.gather(-1, p.t_ids.long().to(dev)))).sum()
            n_kl += len(p.target)
    return {"ce": ce / max(n, 1), "kl": kl / max(n_kl, 1), "acc": torch.tensor(hit / max(n, 1)),
            "tokens": torch.tensor(float(n))}


__all__ = ["Probe", "REPEAT_CUE", "attach_teacher", "continue_probes", "paragraph_seed", "probe_terms",
           "question_probes", "question_prompt", "repeat_probe", "sample_questions"]
