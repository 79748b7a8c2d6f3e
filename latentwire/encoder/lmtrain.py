"""Training the pooled LM encoder (latentwire/encoder/lmenc.py): a plain loop.

Stage A (self-supervised, `enc_steps_a`): each example is, at random,
* reconstruction -- the encoder reads the paragraph; the frozen receiver
  reads [head][vectors]["\\nRepeat the context:"] and is trained to write the
  first `enc_recon_tokens` context tokens (teacher-forced CE);
* continuation -- the encoder reads tokens[:s], s uniform in [L/3, 2L/3];
  the receiver writes the next `enc_cont_tokens` tokens right after the
  vectors.
Stage B (`enc_steps_b`): a training question; the receiver reads
[head][vectors]["\\nQuestion: " q "\\nAnswer:"] and is trained on " " +
gold + "\\n" (CE) plus `enc_w_kl` x KL to the receiver reading the text
(the teacher: the same frozen LM, the paragraph as tokens; over its top-k
tokens at each answer position).

Every `enc_eval_every` steps the held-out paragraphs' questions are answered
through the real wire (payload bytes -> the receiver's vectors -> greedy
answer, the evaluation's own path) and the best state by F1 is kept: that
state is what `save_encoder` writes.

Why the batch is assembled as one tensor: the receiver's head (shots,
"Context:") is the same for every row, so its K/V is computed once and
copied; each row is then [M_b vectors][tail_b tokens] right-padded, built by
one gather (no per-row model calls), and a step is one encoder forward, one
receiver forward and one backward -- the loop is GPU-bound, not Python-bound.
"""
from __future__ import annotations

import contextlib
import math
import random
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import EncConfig
from ..data import Example, PromptBuilder, interleave_by_title
from ..errors import LatentWireError
from ..evaluation.generate import generate_predictions
from ..evaluation.metrics import score_example
from ..evaluation.probes import REPEAT_CUE
from ..evaluation.run import load_data
from ..llm.forward import cache_copy, forward_after, head_cache, head_logits, right_pad
from ..llm.models import cache_root, display_name, file_digest, get_cache, load_model
from ..pipelines.learned import PooledLMPipeline
from ..stage1.train import _StopFlag
from ..util.runio import (JsonlLogger, TensorStore, atomic_torch_save, content_key, read_jsonl, safe_torch_load,
                          write_json, write_jsonl)
from ..wire.wire import torch_threads
from .lmenc import PooledEncoder, build_encoder, load_encoder, save_encoder
from .seqcomp import answer_ids


# ------------------------------------------------------------- data

@dataclass
class Para:
    """One training paragraph: its context ids (cut to enc_max_tokens) and its questions as
    (question id, tail ids: '\\nQuestion: q\\nAnswer:', answer ids: ' gold\\n')."""
    ids: list[int]
    questions: list[tuple[str, list[int], list[int]]] = field(default_factory=list)


def split_training(examples: Sequence[Example], builder: PromptBuilder, cfg: EncConfig
                   ) -> tuple[list[Para], list]:
    """Training paragraphs, and the held-out questions' prompts (the last enc_heldout_paragraphs paragraphs of a
    seeded shuffle are held out; their first enc_heldout_questions questions answered at each evaluation)."""
    tok = builder.tok
    by_ctx: dict[str, list[Example]] = {}
    for e in interleave_by_title(examples):
        by_ctx.setdefault(e.context, []).append(e)
    contexts = list(by_ctx)
    random.Random(cfg.enc_seed).shuffle(contexts)
    n_out = min(cfg.enc_heldout_paragraphs, max(0, len(contexts) - 1))
    train_ctx, held_ctx = contexts[:len(contexts) - n_out], contexts[len(contexts) - n_out:]
    paras = []
    for c in train_ctx:
        exs = by_ctx[c]
        p0 = builder.build(exs[0])
        para = Para(p0.context_ids[:cfg.enc_max_tokens])
        for e in exs:
            p = builder.build(e)
            para.questions.append((e.id, p.ids[p.ctx_end:], answer_ids(tok, e.answers[0])))
        if para.ids:
            paras.append(para)
    held = [builder.build(e) for c in held_ctx for e in by_ctx[c]][:cfg.enc_heldout_questions]
    if not paras:
        raise LatentWireError("--squad-train: no training paragraph left after holding out "
                              f"--enc-heldout-paragraphs {cfg.enc_heldout_paragraphs}")
    return paras, held


@dataclass
class Row:
    """One example of a batch: what the encoder reads, and the receiver's tail after the vectors, trained on
    tail[t0:] (t0 = 0: the first tail token is predicted from the last vector)."""
    enc_ids: list[int]
    tail: list[int]
    t0: int
    kind: str  # recon | cont | qa
    qid: str | None = None
    ctx: list[int] | None = None  # qa: the paragraph, for the teacher


def stage_a_row(p: Para, rng: random.Random, cue: list[int], cfg: EncConfig) -> Row:
    L = len(p.ids)
    if L >= 6 and rng.random() < 0.5:
        s = rng.randint(max(1, L // 3), max(1, (2 * L) // 3))
        return Row(p.ids[:s], p.ids[s:s + cfg.enc_cont_tokens], 0, "cont")
    if cfg.enc_recon_span == "window":  # anywhere in the paragraph, found by its first few tokens (the anchor)
        n, k = cfg.enc_recon_tokens, cfg.enc_recon_anchor
        w = rng.randint(0, max(0, L - n - k))
        return Row(p.ids, cue + p.ids[w:w + k + n], len(cue) + len(p.ids[w:w + k]), "recon")
    return Row(p.ids, cue + p.ids[:cfg.enc_recon_tokens], len(cue), "recon")


def stage_b_row(p: Para, rng: random.Random) -> Row:
    qid, tail, ans = p.questions[rng.randrange(len(p.questions))]
    return Row(p.ids, tail + ans, len(tail), "qa", qid, p.ids)


def make_batch(paras: Sequence[Para], stage: str, step: int, cfg: EncConfig, cue: list[int]) -> list[Row]:
    """The batch of a step, a function of (seed, step) alone: a resumed run draws the same batches."""
    rng = random.Random(cfg.enc_seed * 1_000_003 + step)
    if stage == "A":
        rows = [stage_a_row(paras[rng.randrange(len(paras))], rng, cue, cfg) for _ in range(cfg.enc_batch)]
    else:
        qa = [p for p in paras if p.questions]
        rows = [stage_b_row(qa[rng.randrange(len(qa))], rng) for _ in range(cfg.enc_batch)]
    return [r for r in rows if r.enc_ids and len(r.tail) > r.t0]


# ------------------------------------------------------------- one step

def _targets(rows: Sequence[Row], bases: Sequence[int], dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat (row, position, target id) of every trained token: row b's tail[t0 + k] is predicted at position
    bases[b] + t0 + k - 1 of its [reading][tail] row."""
    b_idx, pos, tgt = [], [], []
    for b, (r, base) in enumerate(zip(rows, bases)):
        n = len(r.tail) - r.t0
        b_idx += [b] * n
        pos += range(base + r.t0 - 1, base + r.t0 - 1 + n)
        tgt += r.tail[r.t0:]
    t = lambda v: torch.tensor(v, dtype=torch.long, device=dev)  # noqa: E731
    return t(b_idx), t(pos), t(tgt)


def receiver_logits(lm, hc, n_head: int, vecs: torch.Tensor, vmask: torch.Tensor, rows: Sequence[Row],
                    span: bool = False):
    """The frozen receiver reading [head][vectors_b][tail_b] for every row: logits at the trained positions
    [N, V] and the targets [N]. One gather builds the rows: position j of row b is vector j (j < M_b) or tail
    token j - M_b. `span`: the head over every position from the first trained one to the last, in every row
    (the step before the head was cut to the trained positions; benchmarks/encoder_cost.py times both)."""
    dev = vecs.device
    B, Mx, d = vecs.shape
    Mb = vmask.sum(1)
    tails, tmask = right_pad([torch.tensor(r.tail, dtype=torch.long, device=dev) for r in rows])
    E = lm.embed(tails).to(vecs.dtype)  # [B, T, d]
    S = Mx + tails.shape[1]
    j = torch.arange(S, device=dev)[None].expand(B, S)
    in_v = j < Mb[:, None]
    v = vecs.gather(1, j.clamp(max=Mx - 1)[..., None].expand(B, S, d)) if Mx else vecs.new_zeros(B, S, d)
    e = E.gather(1, (j - Mb[:, None]).clamp(0, tails.shape[1] - 1)[..., None].expand(B, S, d))
    x = torch.where(in_v[..., None], v, e)
    mask = j < (Mb + tmask.sum(1))[:, None]
    b_idx, pos, tgt = _targets(rows, Mb.tolist(), dev)
    # the head only where a token is trained (~5 positions a row in stage B): the [B, S, vocab] logits between
    # the first and the last trained position of any row were most of the step's head cost, forward and backward
    if span:
        lo, hi = int(pos.min()), int(pos.max())
        out = forward_after(lm, cache_copy(hc, B), n_head, x, mask, False, keep=torch.arange(lo, hi + 1, device=dev))
        return out.logits[b_idx, pos - lo], tgt
    h = forward_after(lm, cache_copy(hc, B), n_head, x, mask, False, hidden=True).last_hidden_state
    return head_logits(lm, h[b_idx, pos]), tgt


def teacher_key(r: Row) -> str:
    """What a question's teacher entry depends on besides the model, the head and k: its tokens."""
    return content_key(r.ctx, r.tail, r.t0)[:32]


@torch.no_grad()
def teacher_fill(lm, hc, n_head: int, paras: Sequence[Para], k: int, store: TensorStore, progress: bool = False,
                 flush: bool = True) -> int:
    """The teacher's top-k of every question of `paras` that `store` lacks, a paragraph at a time: [head][ctx]
    is run once and its K/V copied to the paragraph's questions (~5 a paragraph), which then read only their
    tails -- a third of the positions of reading each question's whole prompt. Returns the questions computed.
    `flush`: write what was computed to the store's folder at the end (and every 200 paragraphs)."""
    dev = lm.device
    todo = []
    for p in paras:
        rows = [Row(p.ids, tail + ans, len(tail), "qa", qid, p.ids) for qid, tail, ans in p.questions]
        rows = [r for r in rows if teacher_key(r) not in store]
        if rows:
            todo.append((p, rows))
    for i, (p, rows) in enumerate(tqdm(todo, desc="teacher top-k", disable=not progress)):
        x = torch.tensor([p.ids], dtype=torch.long, device=dev)
        ctx = get_cache(forward_after(lm, cache_copy(hc, 1), n_head, x, torch.ones_like(x, dtype=torch.bool), True,
                                      keep=torch.tensor([x.shape[1] - 1], device=dev)))
        if len(rows) > 1:
            ctx.batch_repeat_interleave(len(rows))
        t, tm = right_pad([torch.tensor(r.tail, dtype=torch.long, device=dev) for r in rows])
        h = forward_after(lm, ctx, n_head + len(p.ids), t, tm, True, hidden=True).last_hidden_state
        b_idx, pos, _ = _targets(rows, [0] * len(rows), dev)
        v, ix = torch.log_softmax(head_logits(lm, h[b_idx, pos]).float(), -1).topk(min(k, lm.vocab_size), -1)
        s = 0
        for r in rows:
            n = len(r.tail) - r.t0
            store.put(teacher_key(r), {"v": v[s:s + n].half(), "i": ix[s:s + n].int()})
            s += n
        if flush and i % 200 == 199:
            store.flush()
    if flush:
        store.flush()
    return sum(len(rows) for _, rows in todo)


@torch.no_grad()
def teacher_topk(lm, hc, n_head: int, rows: Sequence[Row], k: int, store: TensorStore | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each qa row: the receiver reading the paragraph as text, [head][ctx][tail], its top-k
    log-probabilities and ids at the answer positions ([A, k] each); read from `store` where it holds the row
    (teacher_fill), else one batched forward (and kept in `store` when given)."""
    todo = [i for i, r in enumerate(rows) if store is None or teacher_key(r) not in store]
    got: dict[int, tuple] = {}
    if todo:
        dev = lm.device
        sub = [rows[i] for i in todo]
        x, m = right_pad([torch.tensor(r.ctx + r.tail, dtype=torch.long, device=dev) for r in sub])
        b_idx, pos, _ = _targets(sub, [len(r.ctx) for r in sub], dev)
        h = forward_after(lm, cache_copy(hc, len(sub)), n_head, x, m, True, hidden=True).last_hidden_state
        lp = torch.log_softmax(head_logits(lm, h[b_idx, pos]).float(), -1)
        v, ix = lp.topk(min(k, lp.shape[-1]), -1)
        s = 0
        for i, r in zip(todo, sub):
            n = len(r.tail) - r.t0
            got[i] = (v[s:s + n], ix[s:s + n])
            s += n
            if store is not None:
                store.put(teacher_key(r), {"v": got[i][0].half(), "i": got[i][1].int()})
    out = []
    for i, r in enumerate(rows):
        t = got.get(i)
        if t is None:
            e = store.get(teacher_key(r))
            t = (e["v"], e["i"])
        out.append((t[0].float().to(lm.device), t[1].long().to(lm.device)))
    return out


def loss_step(enc: PooledEncoder, lm, hc, n_head: int, rows: Sequence[Row], cfg: EncConfig,
              store: TensorStore | None = None, span: bool = False) -> dict[str, torch.Tensor]:
    """One batch's loss terms: `ce` (teacher-forced, per trained token), `kl` (qa rows: KL(teacher top-k ||
    student) per answer token, the teacher renormalised over its top-k) and `loss`, their weighted sum."""
    dev = lm.device
    ids, m = right_pad([torch.tensor(enc.sender_input(r.enc_ids)[0], dtype=torch.long, device=dev) for r in rows])
    vecs, vm = enc(ids, m, enc.sender_input(rows[0].enc_ids)[1])
    logits, tgt = receiver_logits(lm, hc, n_head, vecs, vm, rows, span)
    lp = torch.log_softmax(logits.float(), -1)
    terms = {"ce": F.nll_loss(lp, tgt)}
    if rows[0].kind == "qa" and cfg.enc_w_kl:
        teach = teacher_topk(lm, hc, n_head, rows, cfg.enc_teacher_topk, store)
        t_lp = torch.cat([t[0] for t in teach])
        t_ids = torch.cat([t[1] for t in teach])
        p = torch.softmax(t_lp, -1)
        terms["kl"] = (p * (torch.log(p.clamp_min(1e-12)) - lp.gather(-1, t_ids))).sum(-1).mean()
        terms["loss"] = terms["ce"] + cfg.enc_w_kl * terms["kl"]
    else:
        terms["loss"] = terms["ce"]
    return terms


# ------------------------------------------------------------- the loop

def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (oneDNN's own check: AVX512-BF16 or AMX), where bf16
    autocast runs the step at up to twice fp32's rate. Without them bf16 is emulated: on an AVX2-only EPYC a
    [512 x 576] @ [576 x 1536] product ran at 4.7 GFLOP/s in bf16 against 38 in fp32 (one thread)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older torch without the check: the CPU's own flags
        try:
            return bool(set(Path("/proc/cpuinfo").read_text().split()) & {"avx512_bf16", "amx_bf16"})
        except OSError:
            return False


def step_precision(choice: str, device: torch.device) -> str:
    """--enc-precision resolved: bf16 (autocast) or fp32. auto: bf16 on a GPU and on a CPU with bf16
    instructions, fp32 elsewhere."""
    if choice == "auto":
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else "fp32"
    return choice


def lr_at(step: int, cfg: EncConfig) -> float:
    """Multiplier of the peak learning rate at a global step: each stage warms up, then follows a cosine to 10%."""
    a = cfg.enc_steps_a
    s, n = (step, a) if step < a else (step - a, cfg.enc_steps_b)
    if s < cfg.enc_warmup:
        return (s + 1) / cfg.enc_warmup
    t = (s - cfg.enc_warmup) / max(1, n - cfg.enc_warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def prompts_scores(lm, prompts, pipe, batch_size: int = 16) -> list[float]:
    """Each question's F1 (0..1, the official v1.1 metric) of greedy answers on `prompts` through `pipe`'s wire
    (payload bytes -> what the LLM reads), in the prompts' order: per question, so that a caller can put an
    interval on the mean and pair two pipelines on the same questions."""
    if not prompts:
        return []
    preds = generate_predictions(lm, prompts, pipe, batch_size=batch_size, progress=False)
    return [score_example(p, pr.example.answers)["f1"] for p, pr in zip(preds, prompts)]


def mean100(scores: Sequence[float]) -> float:
    """Mean x 100 of per-question scores (nan without any)."""
    return 100 * sum(scores) / len(scores) if scores else float("nan")


def prompts_f1(lm, prompts, pipe, batch_size: int = 16) -> float:
    """Mean F1 (x 100) of `prompts_scores`."""
    return mean100(prompts_scores(lm, prompts, pipe, batch_size))


def heldout_scores(enc: PooledEncoder, lm, prompts, batch_size: int = 16) -> list[float]:
    """Each held-out question's F1 (0..1) through the wire itself (payload bytes -> vectors -> greedy answer)."""
    was = enc.training
    enc.eval()
    try:
        return prompts_scores(lm, prompts, PooledLMPipeline(lm, enc), batch_size)
    finally:
        enc.train(was)


def _optimizer(enc: PooledEncoder, cfg: EncConfig) -> torch.optim.Optimizer:
    lm_p = [p for n, p in enc.named_parameters() if p.requires_grad and n.startswith("sender.")]
    pr_p = [p for n, p in enc.named_parameters() if p.requires_grad and not n.startswith("sender.")]
    groups = [{"params": pr_p, "lr": cfg.enc_lr_proj, "peak": cfg.enc_lr_proj}]
    if lm_p:
        groups.insert(0, {"params": lm_p, "lr": cfg.enc_lr, "peak": cfg.enc_lr})
    return torch.optim.AdamW(groups, weight_decay=0.0)


def train_encoder(lm, train_examples: Sequence[Example], builder: PromptBuilder, cfg: EncConfig,
                  out: str | Path, resume: bool = False, progress: bool = True, log=print,
                  record: dict | None = None) -> dict:
    """Train (or, `resume`, continue) an encoder for receiver `lm` and write `out`: the best held-out state
    (lmenc.save_encoder: safetensors + encoder.json), train_log.jsonl (every step's terms), heldout.jsonl (every
    evaluation), ckpt.pt (to resume). Returns encoder.json's content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.enc_seed)
    paras, held = split_training(train_examples, builder, cfg)
    enc = build_encoder(lm, cfg)
    enc.train()
    opt = _optimizer(enc, cfg)
    step, best, seconds = 0, {"f1": -1.0, "step": None, "state": None}, 0.0
    ckpt = out / "ckpt.pt"
    if resume and ckpt.is_file():
        blob = safe_torch_load(ckpt, "--resume")
        enc.load_state_dict(blob["trainable"], strict=False)
        try:
            opt.load_state_dict(blob["opt"])
        except (ValueError, KeyError):
            log("warning: ckpt.pt's optimizer state does not fit this encoder; starting the optimizer afresh")
        step, best, seconds = blob["step"], blob["best"], blob["seconds"]
        log(f"resumed {ckpt} at step {step} ({seconds:.0f} s trained, best held-out F1 {best['f1']:.2f})")
    elif resume and (out / "encoder.json").is_file():
        # an archive without the optimizer state (it did not fit): the saved weights, a fresh optimizer
        loaded, meta = load_encoder(lm, out, "--resume")
        enc.load_state_dict(loaded.trainable_state(), strict=False)
        step, seconds = meta["record"].get("steps", 0), meta["record"].get("seconds", 0.0)
        best = {"f1": meta["record"].get("heldout_f1", -1.0), "step": step,
                "state": {k: v.cpu().clone() for k, v in enc.trainable_state().items()}}
        log(f"resumed the weights of {out} at step {step} (no optimizer state in the folder)")
    elif resume:
        raise LatentWireError(f"--resume: {out} holds neither ckpt.pt nor encoder.json")
    head = builder.build(Example("head", "head", "", "?", ["-"])).head_ids
    hc, n_head = head_cache(lm, head), len(head)
    cue = builder._ids(REPEAT_CUE)
    total = cfg.enc_steps_a + cfg.enc_steps_b
    if resume:  # a run killed between checkpoints logged steps the resumed one will log again: drop them
        for name in ("train_log.jsonl", "heldout.jsonl"):
            if (out / name).is_file():
                kept = [r for r in read_jsonl(out / name, skip_bad=True) if r.get("step", 0) <= step]
                write_jsonl(out / name, kept)
    steps_log, evals_log = JsonlLogger(out / "train_log.jsonl"), JsonlLogger(out / "heldout.jsonl")
    precision = step_precision(cfg.enc_precision, lm.device)
    amp = torch.autocast(lm.device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    params = [p for p in enc.parameters() if p.requires_grad]
    # the receiver is frozen, but gradients must flow through it to the vectors
    lm.model.requires_grad_(False)

    def open_caches() -> TensorStore | None:
        """The stores of the teacher's top-k and of the bottom's states, read from $LATENTWIRE_CACHE where an
        earlier run with the same model, head, k / layer and precision left them. Filled as training meets a
        paragraph (the teacher: all of a paragraph's questions at once, sharing its K/V), written at every
        checkpoint: each is paid once per paragraph over all runs, and only for paragraphs a run reaches --
        on a CPU without bf16 a paragraph's teacher costs ~2 s, all 2,229 of the training file over an hour."""
        store = None
        if cfg.enc_cache_teacher and cfg.enc_w_kl and cfg.enc_steps_b:
            store = TensorStore(cache_root() / "enc_teacher" / content_key(
                lm.weights_digest(), head, cfg.enc_teacher_topk, precision)[:16])
            log(f"teacher top-k: {len(store)} questions stored in {store.folder}")
        if enc.bottom is not None:
            folder = cache_root() / "enc_bottom" / content_key(lm.weights_digest(), enc.bottom.start, precision)[:16]
            enc.bottom.fill(enc.sender, [], folder)
            log(f"bottom states: {len(enc.bottom.store)} sequences stored in {folder}")
        return store

    by_ids = {tuple(p.ids): p for p in paras}

    def evaluate(at: int) -> None:
        scores = heldout_scores(enc, lm, held)
        f1 = mean100(scores)
        # each question's F1 too: the curves put intervals on a point and pair runs on the same questions
        evals_log.log(step=at, heldout_f1=f1, seconds=seconds, f1s=[round(x, 4) for x in scores])
        log(f"step {at}: held-out F1 {f1:.2f} on {len(held)} questions")
        if f1 > best["f1"]:
            best.update(f1=f1, step=at, state={k: v.detach().cpu().clone() for k, v in enc.trainable_state().items()})

    def save_ckpt() -> None:
        for st in (store, enc.bottom.store if enc.bottom is not None else None):
            if st is not None:
                st.flush()
        atomic_torch_save({"step": step, "trainable": enc.trainable_state(), "opt": opt.state_dict(),
                           "best": best, "seconds": seconds, "config": asdict(cfg)}, ckpt)

    store = open_caches()
    bar = tqdm(total=total, initial=step, desc="encoder", disable=not progress)
    stopped = None
    # SIGINT / SIGTERM (a device call's deadline through `timeout`, a Ctrl-C) end the step under way, then stop
    # as the time limit does: the best state, encoder.json and ckpt.pt are written, and --resume continues
    with _StopFlag() as stop:
        try:
            if step == 0:  # the curve starts where the untrained encoder is (what training is measured from)
                evaluate(0)
            while step < total:
                if cfg.enc_time_limit and seconds >= cfg.enc_time_limit:
                    stopped = f"time limit ({cfg.enc_time_limit:g} s)"
                    break
                if stop.signum is not None:
                    stopped = f"signal {stop.signum}"
                    break
                t0 = time.perf_counter()
                stage = "A" if step < cfg.enc_steps_a else "B"
                rows = make_batch(paras, stage, step, cfg, cue)
                for g in opt.param_groups:
                    g["lr"] = g["peak"] * lr_at(step, cfg)
                with amp:
                    if store is not None and stage == "B":  # the teacher of each new paragraph, once
                        teacher_fill(lm, hc, n_head, [by_ids[tuple(r.ctx)] for r in rows], cfg.enc_teacher_topk,
                                     store, flush=False)
                    terms = loss_step(enc, lm, hc, n_head, rows, cfg, store)
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.enc_clip)
                opt.step()
                step += 1
                if lm.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - t0
                steps_log.log(step=step, stage=stage, **{k: float(v.detach()) for k, v in terms.items()},
                              grad_norm=float(gnorm), lr=opt.param_groups[0]["lr"], seconds=seconds, rows=len(rows))
                bar.update(1)
                bar.set_postfix(stage=stage, loss=f"{float(terms['loss'].detach()):.3f}")
                if step % cfg.enc_eval_every == 0 or step in (cfg.enc_steps_a, total):
                    evaluate(step)
                if step % cfg.enc_ckpt_every == 0:
                    save_ckpt()
        except KeyboardInterrupt:
            stopped = "interrupted"
        finally:
            bar.close()
    if best["state"] is None:  # stopped before the first evaluation: the state it reached is the best
        evaluate(step)
    save_ckpt()
    if stopped:
        log(f"stopped at step {step} of {total}: {stopped}; `--resume` continues from {ckpt}")
    enc.load_state_dict(best["state"], strict=False)
    rec = (record or {}) | {"steps": step, "steps_total": total, "seconds": round(seconds, 1),
                            "heldout_f1": best["f1"], "best_step": best["step"], "heldout_questions": len(held),
                            "train_paragraphs": len(paras), "examples_seen": step * cfg.enc_batch,
                            "finished": step >= total, "precision": precision, "threads": torch.get_num_threads(),
                            "config": asdict(cfg)}
    meta = save_encoder(enc, out, lm, cfg, rec, getattr(torch, cfg.enc_save_dtype))
    write_json(out / "train_summary.json", {k: v for k, v in rec.items() if k != "config"})
    return meta


def code_version() -> str:
    """The package version and, from a git checkout, the commit (with '+dirty' when files differ)."""
    from .. import __version__  # the package's own __init__: upward, listed in the layers contract
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty=+dirty"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{__version__}" + (f" ({rev})" if rev else "")


def train_job(cfg, enc_cfg: EncConfig, out: str | Path, resume: bool = False, argv: Sequence[str] = (),
              progress: bool = True, log=print) -> dict:
    """`latentwire train-encoder`: load the receiver (cfg.model) and the training questions (cfg.data's
    --squad-train, else the built-in synthetic set's training articles), train, write `out` (config.json beside
    the weights). Returns encoder.json's content."""
    enc_cfg.validate()
    cfg.model.validate()
    for flag, v in (("--sender-model", cfg.model.sender_model), ("--codec-model", cfg.model.codec_model),
                    ("--device-map", cfg.model.device_map)):
        if v is not None:  # the sender is a copy of the receiver itself; one device
            raise LatentWireError(f"{flag} {v}: train-encoder trains a copy of --model as the sender (no other "
                                  "sender, codec or device map)")
    cfg.data.validate(need_train=False)
    out = Path(out)
    if not resume and (out / "encoder.json").exists():
        raise LatentWireError(f"--out {out}: already holds a trained encoder (--resume continues it; or choose "
                              "another folder)")
    train, _, desc = load_data(cfg)
    lm = load_model(cfg.model.model, cfg.model.device, cfg.model.dtype)
    builder = PromptBuilder(lm.tokenizer, cfg.data.template, cfg.data.max_prompt_tokens, cfg.data.bos != "none")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"model": asdict(cfg.model), "data": asdict(cfg.data), "enc": asdict(enc_cfg)})
    data = {"train": desc.get("train"), "train_questions": len(train), "train_articles": desc.get("train_articles")}
    if cfg.data.squad_train and Path(cfg.data.squad_train).is_file():
        data["train_sha256"] = file_digest(Path(cfg.data.squad_train))
    record = {"command": "latentwire " + shlex.join(argv), "model": display_name(lm.source),
              "device": str(lm.device), "data": data, "code_version": code_version(),
              "torch": torch.__version__}
    log(f"training the pooled LM encoder for {display_name(lm.source)} on {len(train)} questions "
        f"({desc.get('train')}), {enc_cfg.enc_steps_a} + {enc_cfg.enc_steps_b} steps of {enc_cfg.enc_batch}, "
        f"tune {enc_cfg.enc_tune}, on {lm.device} ({step_precision(enc_cfg.enc_precision, lm.device)})")
    with torch_threads(enc_cfg.enc_threads) if enc_cfg.enc_threads else contextlib.nullcontext():
        return train_encoder(lm, train, builder, enc_cfg, out, resume=resume, progress=progress, log=log,
                             record=record)


__all__ = ["Para", "Row", "heldout_scores", "mean100", "prompts_f1", "prompts_scores", "loss_step", "lr_at",
           "make_batch", "receiver_logits", "split_training", "teacher_topk", "train_encoder", "train_job"]
