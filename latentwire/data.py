"""Data: SQuAD (official JSON v1.1/v2.0, or the HF hub), a built-in synthetic
extractive-QA set for offline runs and tests, article-level splits, and prompt
construction with a token budget.

Prompts are built as token segments -- [BOS] + prefix + body + cue -- rather
than as one string, because the reconstruction switches need to know which
positions are the answer cue ("\\nAnswer:") or the kept prefix. Every pipeline
(text baseline, linear control, reconstructed) sees the same ids.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .errors import LatentWireError

TEMPLATES = ("plain", "fewshot", "chat")


@dataclass
class Example:
    id: str
    title: str
    context: str
    question: str
    answers: list[str]
    answer_starts: list[int] = field(default_factory=list)
    next_context: str = ""  # the article's next paragraph ("" for the last, or when unknown): continuation probes


@dataclass
class LoadReport:
    """What the loader skipped, and why; written to the run log."""
    source: str
    n_articles: int = 0
    n_questions: int = 0
    skipped_unanswerable: int = 0
    skipped_answer_not_in_context: int = 0


# ---------------------------------------------------------------- SQuAD JSON

def load_squad_json(path: str | Path, flag: str = "--squad") -> tuple[list[Example], LoadReport]:
    """Read official SQuAD JSON (v1.1 or v2.0).

    v2.0 unanswerable questions are skipped (v1.1-style scoring needs a gold
    span); answers whose text is not in the context are skipped too. Both are
    counted in the returned report. Structural problems raise an error that
    names the file, the article and the question.
    """
    p = Path(path)
    if not p.is_file():
        raise LatentWireError(f"{flag} {path}: no such file")
    try:
        raw = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LatentWireError(f"{flag} {path}: not UTF-8 text (byte {e.start})") from None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LatentWireError(f"{flag} {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise LatentWireError(f"{flag} {path}: not SQuAD JSON (expected an object with a 'data' list of articles)")
    rep = LoadReport(source=str(p))
    out: list[Example] = []
    for ai, art in enumerate(obj["data"]):
        where = f"{flag} {path}: article #{ai}"
        if not isinstance(art, dict) or not isinstance(art.get("paragraphs"), list):
            raise LatentWireError(f"{where}: missing 'paragraphs' list")
        title = art.get("title")
        if not isinstance(title, str) or not title.strip():
            raise LatentWireError(f"{where}: missing 'title'")
        where = f"{flag} {path}: article {title!r}"
        n_before = len(out)
        pars = art["paragraphs"]
        for pi, par in enumerate(pars):
            if not isinstance(par, dict) or not isinstance(par.get("qas"), list):
                raise LatentWireError(f"{where}, paragraph #{pi}: missing 'qas' list")
            ctx = par.get("context")
            if not isinstance(ctx, str) or not ctx.strip():
                raise LatentWireError(f"{where}, paragraph #{pi}: empty or missing 'context'")
            for qi, qa in enumerate(par["qas"]):
                if not isinstance(qa, dict):
                    raise LatentWireError(f"{where}, paragraph #{pi}, question #{qi}: not an object")
                qid = qa.get("id")
                q = qa.get("question")
                if not isinstance(qid, str) or not qid:
                    raise LatentWireError(f"{where}, paragraph #{pi}, question #{qi}: missing 'id'")
                if not isinstance(q, str) or not q.strip():
                    raise LatentWireError(f"{where}, question {qid}: missing 'question'")
                if qa.get("is_impossible", False):
                    rep.skipped_unanswerable += 1
                    continue
                answers = qa.get("answers")
                if not isinstance(answers, list) or not answers:
                    raise LatentWireError(f"{where}, question {qid}: missing 'answers' (and not marked is_impossible)")
                texts, starts = [], []
                for a in answers:
                    if not isinstance(a, dict) or not isinstance(a.get("text"), str):
                        raise LatentWireError(f"{where}, question {qid}: an answer has no 'text'")
                    t = a["text"]
                    s = a.get("answer_start")
                    if isinstance(s, int) and ctx[s:s + len(t)] == t:
                        texts.append(t); starts.append(s)
                    elif t and t in ctx:
                        texts.append(t); starts.append(ctx.index(t))
                if not texts:
                    rep.skipped_answer_not_in_context += 1
                    continue
                nxt = pars[pi + 1].get("context") if pi + 1 < len(pars) and isinstance(pars[pi + 1], dict) else ""
                out.append(Example(qid, title, ctx, q.strip(), texts, starts, nxt if isinstance(nxt, str) else ""))
        if len(out) == n_before:
            raise LatentWireError(f"{where}: has no answerable question")
        rep.n_articles += 1
    rep.n_questions = len(out)
    if not out:
        raise LatentWireError(f"{flag} {path}: no answerable questions")
    return out, rep


def load_squad_hub(split: str = "validation", name: str = "rajpurkar/squad") -> tuple[list[Example], LoadReport]:
    """SQuAD from the Hugging Face hub (needs `datasets` and a network)."""
    try:
        import datasets  # lazy: only users with a network need it
    except ImportError:
        raise LatentWireError("--squad hub: the `datasets` package is not installed (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds when offline
        raise LatentWireError(f"--squad hub: could not load {name}:{split} from the hub "
                              f"(offline? use --squad-train/--squad-eval PATH instead): {type(e).__name__}") from None
    rep = LoadReport(source=f"hub:{name}:{split}")
    out = []
    for r in ds:
        texts = list(r["answers"]["text"])
        if not texts:
            rep.skipped_unanswerable += 1
            continue
        out.append(Example(r["id"], r["title"], r["context"], r["question"].strip(), texts,
                           list(r["answers"]["answer_start"])))
    rep.n_questions = len(out)
    rep.n_articles = len({e.title for e in out})
    return out, rep


# ---------------------------------------------------------- synthetic set

_SYL = ["ka", "lo", "mi", "ra", "ten", "vo", "shi", "bel", "dor", "an", "qui", "zu", "fen", "mar", "ol",
        "ris", "tha", "gu", "nel", "pa", "sor", "vin", "el", "du", "kor"]
_PROFESSIONS = ["painter", "chemist", "sailor", "architect", "baker", "astronomer", "violinist", "engineer"]
_SUBJECTS = ["physics", "history", "music", "botany", "mathematics", "law", "medicine", "geology"]
_PRODUCTS = ["bicycles", "telescopes", "glass lamps", "wooden toys", "solar panels", "maps", "cheese", "boats"]
_THINGS = ["clock tower", "salt mines", "spring festival", "stone bridge", "orchards", "glass museum"]


def _name(rng: random.Random, n: int = 2) -> str:
    return "".join(rng.choice(_SYL) for _ in range(n)).capitalize()


def synthetic_squad(n_articles: int = 60, seed: int = 0) -> list[Example]:
    """A deterministic extractive-QA set about invented people and towns.

    Every answer is a span of its context (checked), names are invented so the
    model cannot answer from memory, and each article has a unique title so
    article-level splits are clean.
    """
    rng = random.Random(seed)
    out: list[Example] = []
    titles: set[str] = set()
    for a in range(n_articles):
        while True:
            first, last = _name(rng), _name(rng, 3)
            title = f"{first} {last}" if a % 2 == 0 else _name(rng, 3)
            if title not in titles:
                titles.add(title)
                break
        if a % 2 == 0:  # a person
            name = title
            city, uni, company, river = _name(rng, 3), _name(rng, 2), _name(rng, 2) + " Works", _name(rng, 2)
            prof, subj, prod = rng.choice(_PROFESSIONS), rng.choice(_SUBJECTS), rng.choice(_PRODUCTS)
            year, year2, cats = rng.randint(1800, 1990), rng.randint(1991, 2020), rng.randint(2, 9)
            ctx = (f"{name} is a {prof} from {city}. {first} was born in {year} and studied {subj} at the "
                   f"University of {uni}. In {year2}, {first} founded a company called {company}, which makes "
                   f"{prod}. Today {first} lives near the {river} River with {cats} cats.")
            qas = [(f"What is the profession of {name}?", prof), (f"Where is {name} from?", city),
                   (f"In what year was {name} born?", str(year)), (f"What did {first} study?", subj),
                   (f"What company did {first} found?", company), (f"What does {company} make?", prod),
                   (f"Near which river does {first} live?", f"{river} River")]
        else:  # a town
            town = title
            prov, founder, hero = _name(rng, 3), f"{_name(rng)} {_name(rng, 3)}", f"{_name(rng)} {_name(rng, 2)}"
            thing, year, pop = rng.choice(_THINGS), rng.randint(1100, 1900), rng.randint(2, 98) * 1000
            ctx = (f"{town} is a town in the province of {prov}. It was founded in {year} by {founder}. "
                   f"The town is known for its {thing} and has a population of {pop}. "
                   f"Its main square is named after {hero}.")
            qas = [(f"In which province is {town}?", prov), (f"When was {town} founded?", str(year)),
                   (f"Who founded {town}?", founder), (f"What is {town} known for?", f"its {thing}"),
                   (f"What is the population of {town}?", str(pop)),
                   (f"Who is the main square of {town} named after?", hero)]
        for qi, (q, ans) in enumerate(qas):
            start = ctx.find(ans)
            assert start >= 0, (ctx, ans)
            out.append(Example(f"syn-{seed}-{a}-{qi}", title, ctx, q, [ans], [start]))
    return out


def synthetic_corpus_text(n_articles: int = 60, seed: int = 0) -> Iterable[str]:
    """Text for training the tiny test tokenizer (contexts, questions, templates)."""
    for e in synthetic_squad(n_articles, seed):
        yield f"Context: {e.context}\nQuestion: {e.question}\nAnswer: {e.answers[0]}\n"
    for s in FEWSHOT_SHOTS:
        yield _format_shot(s)


# ---------------------------------------------------------------- splits

def split_by_title(examples: Sequence[Example], eval_fraction: float, seed: int = 0
                   ) -> tuple[list[Example], list[Example]]:
    """Split whole articles (titles), never questions: no context is shared
    between fitting/training and evaluation."""
    titles = sorted({e.title for e in examples})
    if len(titles) < 2:
        raise LatentWireError("cannot split by article: the data has fewer than 2 articles")
    rng = random.Random(seed)
    rng.shuffle(titles)
    n_eval = min(len(titles) - 1, max(1, round(eval_fraction * len(titles))))
    eval_titles = set(titles[:n_eval])
    return ([e for e in examples if e.title not in eval_titles], [e for e in examples if e.title in eval_titles])


def interleave_by_title(examples: Sequence[Example]) -> list[Example]:
    """Order questions round-robin over articles so that the first N questions
    span many articles (a `--max-eval 500` run must not be 2 articles)."""
    by_title: dict[str, list[Example]] = {}
    for e in examples:
        by_title.setdefault(e.title, []).append(e)
    groups = list(by_title.values())
    out, i = [], 0
    while len(out) < len(examples):
        for g in groups:
            if i < len(g):
                out.append(g[i])
        i += 1
    return out


# ---------------------------------------------------------------- prompts

# Hand-written shots about topics outside both SQuAD files we evaluate on.
FEWSHOT_SHOTS = [
    ("Ada Lovelace was born in London in 1815. She worked with Charles Babbage on the Analytical Engine.",
     "Who did Ada Lovelace work with?", "Charles Babbage"),
    ("The Amazon River flows through Brazil, Peru and Colombia and is about 6,400 km long.",
     "How long is the Amazon River?", "about 6,400 km"),
]
CUE = "\nAnswer:"


def _format_shot(shot: tuple[str, str, str]) -> str:
    c, q, a = shot
    return f"Context: {c}\nQuestion: {q}\nAnswer: {a}\n\n"


def context_token_ids(tokenizer, context: str) -> list[int]:
    """The context's tokens as they sit in a prompt (after 'Context:'): what
    a text receiver makes of the context it is sent."""
    return tokenizer(" " + context, add_special_tokens=False)["input_ids"] if context else []


@dataclass
class Prompt:
    example: Example
    ids: list[int]
    n_bos: int  # leading BOS positions (0 or 1)
    n_prefix: int  # fixed prefix (few-shot shots / chat header), after BOS
    n_cue: int  # trailing answer-cue positions
    truncated: bool = False
    ctx_start: int = 0  # ids[ctx_start:ctx_end] are the context's tokens: what crosses the wire
    ctx_end: int = 0
    context_text: str = ""  # the context as sent (shortened when the prompt was truncated)

    @property
    def head_ids(self) -> list[int]:
        """Everything before the context (BOS, shots, 'Context:'): the receiver's own text."""
        return self.ids[:self.ctx_start]

    @property
    def context_ids(self) -> list[int]:
        return self.ids[self.ctx_start:self.ctx_end]


class PromptBuilder:
    """Turn an Example into token ids for a template under a token budget.

    The body is tokenized in three segments -- 'Context:', ' ' + context,
    '\nQuestion: ...' -- so that the context's token span is known exactly
    (it is what a sender compresses); on SQuAD dev this gives the same ids as
    tokenizing the body in one piece (checked on 993 prompts with SmolLM2).
    Truncation only ever shortens the *context* (from its end); the question
    and the answer cue are never cut. A prompt that does not fit even with an
    empty context is an error naming the question id.
    """

    def __init__(self, tokenizer, template: str = "fewshot", max_prompt_tokens: int = 512, add_bos: bool = False,
                 flag: str = "--max-prompt-tokens"):
        if template not in TEMPLATES:
            raise LatentWireError(f"--template: unknown template {template!r}; choose {', '.join(TEMPLATES)}")
        if max_prompt_tokens < 16:
            raise LatentWireError(f"{flag} must be >= 16 (got {max_prompt_tokens})")
        self.tok = tokenizer
        self.template = template
        self.max_tokens, self.flag = max_prompt_tokens, flag
        self.add_bos = add_bos
        if add_bos and tokenizer.bos_token_id is None:
            raise LatentWireError("--bos: this tokenizer has no BOS token")
        if template == "fewshot":
            self.prefix_text, self.cue_text = "".join(_format_shot(s) for s in FEWSHOT_SHOTS), CUE
        elif template == "plain":
            self.prefix_text, self.cue_text = "", CUE
        else:
            self.prefix_text, self.cue_text = self._chat_parts()
        self.prefix_ids = self._ids(self.prefix_text)
        self.cue_ids = self._ids(self.cue_text)
        self.lead_ids = self._ids(self.lead_text())

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def _chat_parts(self) -> tuple[str, str]:
        if not getattr(self.tok, "chat_template", None):
            raise LatentWireError("--template chat: this tokenizer has no chat template")
        marker = "\u0000BODY\u0000"
        msgs = [{"role": "user", "content": marker}]
        with_gen = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        pre, post = with_gen.split(marker)
        return pre, post

    def lead_text(self) -> str:
        """The body's text before the context."""
        return "Answer with a short span copied from the context.\nContext:" if self.template == "chat" else "Context:"

    def context_ids(self, context: str) -> list[int]:
        return context_token_ids(self.tok, context)

    def tail_ids(self, question: str) -> list[int]:
        return self._ids("\nQuestion: " + question)

    def build(self, ex: Example) -> Prompt:
        bos = [self.tok.bos_token_id] if self.add_bos else []
        head = bos + self.prefix_ids + self.lead_ids
        tail = self.tail_ids(ex.question) + self.cue_ids
        context = ex.context
        ctx = self.context_ids(context)
        truncated = False
        if len(head) + len(ctx) + len(tail) > self.max_tokens:
            truncated = True
            budget = self.max_tokens - len(head) - len(tail)
            if budget < 0:
                raise LatentWireError(f"question {ex.id}: the question alone needs {len(head) + len(tail)} tokens, "
                                      f"more than {self.flag} {self.max_tokens}")
            # cut the text at a token boundary and tokenize it again (so the
            # sent text and its ids agree), shrinking until it fits
            enc = self.tok(context, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            keep = len(offsets)
            while len(ctx) > budget:
                keep -= max(1, len(ctx) - budget)
                context = context[:offsets[keep][0]].rstrip() if keep > 0 else ""
                ctx = self.context_ids(context)
        ids = head + ctx + tail
        return Prompt(ex, ids, len(bos), len(self.prefix_ids), len(self.cue_ids), truncated,
                      ctx_start=len(head), ctx_end=len(head) + len(ctx), context_text=context)


def distinct_contexts(prompts: Sequence[Prompt]) -> list[Prompt]:
    """One prompt per distinct context (by its token ids), in first-seen order."""
    seen: dict[tuple, Prompt] = {}
    for p in prompts:
        seen.setdefault(tuple(p.context_ids), p)
    return list(seen.values())
