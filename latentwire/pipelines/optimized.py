"""The per-paragraph ceiling: what M = ceil(L / r) positions *can* give this
frozen receiver when they are fitted for one paragraph by gradient descent,
with no encoder -- the bound an encoder that writes such positions in one
pass could at best reach. The sender holds the same frozen LLM and never
sees an evaluation question.

Two forms, each started at truncation (its answers equal truncation's before
the first step):
* ``emb`` -- M input vectors the receiver reads as embeddings, started at
  the first M context tokens' embeddings;
* ``kv``  -- per-layer keys and values of M positions (prefix-tuning style,
  RoPE at the positions right after the prompt head), started at the
  receiver's own K/V of the first M context tokens.

Two objectives:
* ``copy`` -- the receiver, cued with "Repeat the context:", writes the
  paragraph back (teacher-forced CE; stops at 100% token accuracy): the
  measured failure, kept as the control -- copying is not use;
* ``use``  -- context distillation on probes made from the paragraph alone
  (probes.py: questions the LLM writes about it, answered by the LLM
  reading it; cue-and-continue snippets): top-k KL to the LLM reading the
  paragraph as text. A share of the probes is held out; the state with the
  lowest held-out KL (step 0 included) is kept, so a fit that does not
  generalise to its own held-out probes stays at truncation.

The payload is the fitted state, quantized: fp16/fp32 floats, or 1..8 bits
per value with a per-vector absmax scale (`wire.RowQuantizer`); every
--opt-wire-bits entry is a pipeline of its own over the same fits. Fits are
kept in the run folder (`opt/<kind>_r<r>/<key>.pt`, with their statistics,
also appended to `opt_fits.jsonl`), so a killed run resumes where it stopped
and a rerun with the same settings refits nothing.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Sequence

import torch

from ..data import PromptBuilder
from ..llm.decode import sliding_window
from ..errors import LatentWireError
from ..llm.forward import context_kv, head_cache, read_tails
from ..evaluation.probes import (attach_teacher, continue_probes, paragraph_seed, probe_terms, question_probes, repeat_probe,
                      sample_questions)
from ..util.runio import JsonlLogger, atomic_torch_save, safe_torch_load
from ..wire.wire import FloatQuantizer, Payload, RowQuantizer, read_varint, varint
from .base import KVReading, Pipeline
from .tokens import budget
from ..config import OptConfig

FORMS = ("emb", "kv")
OBJECTIVES = ("copy", "use")


def kv_geometry(lm) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the receiver's cache."""
    c = lm.model.config.get_text_config()
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return int(c.num_hidden_layers), int(heads), int(hd)


def wire_quantizer(bits: int):
    return FloatQuantizer(bits) if bits in (16, 32) else RowQuantizer(bits)


class ParagraphFitter:
    """Fits one paragraph's M positions (memoised in memory and on disk)."""

    def __init__(self, lm, head_ids: Sequence[int], builder: PromptBuilder, ratio: float, form: str,
                 objective: str, cfg, folder: Path | None = None, probe_store: dict | None = None):
        if form not in FORMS or objective not in OBJECTIVES:
            raise ValueError((form, objective))
        if form == "kv":
            if sliding_window(lm.model):
                raise LatentWireError(f"--pipeline opt-kv-{objective}: {lm.name} has sliding-window layers, whose "
                                      f"caches this form does not build; use opt-emb-{objective}")
        self.lm, self.head, self.builder, self.ratio = lm, list(head_ids), builder, ratio
        self.form, self.objective, self.cfg = form, objective, cfg
        self.folder = folder
        self.hc = head_cache(lm, self.head)
        self.probe_store = probe_store if probe_store is not None else {}
        self.memo: dict[tuple, dict] = {}
        self.fit_log = JsonlLogger(folder.parent.parent / "opt_fits.jsonl") if folder is not None else None

    # --- identity of a fit: everything it depends on
    def settings(self) -> dict:
        c = self.cfg
        if self.objective == "copy":
            return {"form": self.form, "objective": "copy", "ratio": self.ratio, "steps": c.opt_copy_steps,
                    "lr": c.opt_copy_lr, "l2": c.opt_l2}
        return {"form": self.form, "objective": self.objective, "ratio": self.ratio, "steps": c.opt_steps,
                "lr": c.opt_lr, "batch": c.opt_batch, "questions": c.opt_questions, "continue": c.opt_continue,
                "holdout": c.opt_holdout, "eval_every": c.opt_eval_every, "patience": c.opt_patience,
                "l2": c.opt_l2, "topk": c.opt_topk, "seed": c.opt_seed}

    def key(self, ids: Sequence[int]) -> str:
        blob = {"model": self.lm.fingerprint(), "weights": self.lm.weights_digest(), "head": self.head,
                "ids": list(ids), "settings": self.settings(), "dtype": str(self.lm.dtype)}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]

    def fit(self, text: str, ids: Sequence[int]) -> dict:
        """{"state": tensor, "stats": dict}; read from disk when this paragraph was fitted with these settings."""
        k = tuple(ids)
        if k in self.memo:
            return self.memo[k]
        key = self.key(ids)
        path = None if self.folder is None else self.folder / f"{key}.pt"
        if path is not None and path.exists():
            blob = safe_torch_load(path, "opt fit")
            if isinstance(blob, dict) and blob.get("key") == key:
                self.memo[k] = {"state": blob["state"], "stats": json.loads(blob["stats"]) | {"reused": True}}
                return self.memo[k]
        with torch.enable_grad():  # a payload may be asked for inside the evaluation's no-grad generation
            res = self._fit(text, list(ids))
        if path is not None:
            atomic_torch_save({"key": key, "state": res["state"], "stats": json.dumps(res["stats"])}, path)
            self.fit_log.log(event="fit", kind=f"opt-{self.form}-{self.objective}", key=key, **res["stats"])
        self.memo[k] = res
        return res

    # --- probes (shared by the fitters of one run: both forms distil the same probes)
    def probes(self, text: str, ids: list[int]) -> list:
        c = self.cfg
        if self.objective == "copy":
            return [repeat_probe(self.builder, ids)]
        key = (tuple(ids), c.opt_questions, c.opt_continue, c.opt_topk, c.opt_seed)
        if key not in self.probe_store:
            seed = paragraph_seed(ids, c.opt_seed)
            qs = sample_questions(self.lm, text, c.opt_questions, seed)
            probes = question_probes(self.lm, self.builder, text, qs) + \
                continue_probes(self.builder, ids, c.opt_continue, seed)
            attach_teacher(self.lm, self.hc, len(self.head), ids, probes, c.opt_topk)
            self.probe_store[key] = probes
        return self.probe_store[key]

    # --- the representation
    def init_state(self, ids: list[int]) -> torch.Tensor:
        M = budget(len(ids), self.ratio)
        if self.form == "emb":
            with torch.no_grad():
                return self.lm.embed(torch.tensor(ids[:M], device=self.lm.device)).float().clone()
        kv = context_kv(self.lm, self.hc, len(self.head), ids[:M])  # the first M tokens' own K/V
        return torch.stack([torch.stack([k, v]) for k, v in kv]).float()  # [layers, 2, heads, M, hd]

    def reading(self, state: torch.Tensor):
        if self.form == "emb":
            return state
        return KVReading([state[i, 0] for i in range(state.shape[0])], [state[i, 1] for i in range(state.shape[0])],
                         len(self.head))

    def terms(self, state: torch.Tensor, probes: Sequence) -> dict[str, torch.Tensor]:
        """One loss step's terms (CE, KL, accuracy) for these probes read after [head][state]."""
        first = min(len(p.tail) for p in probes) - 1
        logits = read_tails(self.lm, self.hc, len(self.head), [self.reading(state)],
                            "kv" if self.form == "kv" else "embeds",
                            [p.tail + p.target[:-1] for p in probes], keep_from=first)
        return probe_terms(logits, probes, first)

    def _fit(self, text: str, ids: list[int]) -> dict:
        c = self.cfg
        t0 = time.time()
        if not ids:
            return {"state": self.init_state(ids), "stats": {"positions": 0, "steps": 0, "fit_s": 0.0}}
        probes = self.probes(text, ids)
        t_probes = time.time() - t0
        rng = random.Random(paragraph_seed(ids, c.opt_seed) + 1)
        order = list(range(len(probes)))
        rng.shuffle(order)
        if self.objective == "use":
            n_ho = max(1, round(c.opt_holdout * len(probes))) if len(probes) > 1 else 0
            held, train = [probes[i] for i in order[:n_ho]], [probes[i] for i in order[n_ho:]] or list(probes)
        else:
            held, train = [], list(probes)
        start = self.init_state(ids)
        # the fitted state is start + scale * delta, delta from 0: Adam's steps (--opt-lr) and the L2 term are in
        # units of each tensor's RMS -- per layer, keys and values apart (their scales differ 50-fold: values of
        # SmolLM2's first layer ~0.04, keys ~2), embeddings as one
        dims = tuple(range(2, start.dim())) if self.form == "kv" else tuple(range(start.dim()))
        scale = start.pow(2).mean(dim=dims, keepdim=True).sqrt().clamp_min(1e-6)
        delta = torch.zeros_like(start, requires_grad=True)
        copy = self.objective == "copy"
        max_steps = c.opt_copy_steps if copy else c.opt_steps
        opt = torch.optim.Adam([delta], lr=c.opt_copy_lr if copy else c.opt_lr)

        def current() -> torch.Tensor:
            return start + scale * delta

        def held_kl() -> float:
            with torch.no_grad():
                state = current()
                return sum(float(self.terms(state, held[b:b + c.opt_batch])["kl"]) * len(held[b:b + c.opt_batch])
                           for b in range(0, len(held), c.opt_batch)) / len(held)

        best = (held_kl() if held else float("inf"), 0, start.clone())
        h0, bad, step, tokens, t_steps, first, last = best[0], 0, 0, 0, 0.0, None, None
        while step < max_steps:
            batch = rng.sample(train, min(c.opt_batch, len(train)))
            ts = time.time()
            state = current()
            terms = self.terms(state, batch)
            main = terms["ce"] if copy else terms["kl"]
            l2 = delta.pow(2).mean()
            loss = main + c.opt_l2 * l2
            opt.zero_grad()
            loss.backward()
            opt.step()
            t_steps += time.time() - ts
            tokens += sum(len(p.tail) + len(p.target) - 1 for p in batch)
            step += 1
            row = {k: float(v.detach()) for k, v in terms.items()} | {"l2": float(l2.detach()), "loss": float(loss.detach())}
            first, last = first or row, row
            if copy:
                if row["acc"] >= 1.0:  # copied (before this step's update): keep the state that did
                    best = (row["ce"], step - 1, state.detach().clone())
                    break
                best = (row["ce"], step, current().detach().clone())
            elif step % c.opt_eval_every == 0 or step == max_steps:
                h = held_kl()
                if h < best[0]:
                    best, bad = (h, step, current().detach().clone()), 0
                else:
                    bad += 1
                    if c.opt_patience and bad >= c.opt_patience:
                        break
        stats = {"positions": int(budget(len(ids), self.ratio)), "context_tokens": len(ids),
                 "probes": len(probes), "probes_by_kind": _count(p.kind for p in probes), "held_out": len(held),
                 "steps": step, "best_step": best[1], "held_out_kl_start": h0 if held else None,
                 "held_out_kl_best": best[0] if held else None, "first": first, "last": last,
                 "probe_s": t_probes, "fit_s": time.time() - t0, "step_s": t_steps,
                 "tokens_per_s": tokens / t_steps if t_steps else None}
        return {"state": best[2].detach().cpu(), "stats": stats}


def _count(kinds) -> dict:
    out: dict[str, int] = {}
    for k in kinds:
        out[k] = out.get(k, 0) + 1
    return out


class OptimizedPipeline(Pipeline):
    """A fitter's states on the wire at `bits` per value (16/32: floats; 1..8: per-vector absmax levels)."""
    learned = True

    def __init__(self, fitter: ParagraphFitter, bits: int, name: str):
        super().__init__()
        self.fitter, self.bits, self.name, self.lm = fitter, bits, name, fitter.lm
        self.reads = "kv" if fitter.form == "kv" else "embeds"
        self.q = wire_quantizer(bits)
        self.layers, self.heads, self.hd = kv_geometry(fitter.lm)

    def encode(self, text, ids):
        state = self.fitter.fit(text, ids)["state"]
        M = budget(len(ids), self.fitter.ratio)
        if not M:
            return Payload(b"", 0)
        if self.fitter.form == "emb":
            return Payload(self.q.to_bytes(state), positions=M)
        rows = state.reshape(-1, self.hd)  # (layer, k/v, head, position) rows of head_dim values
        return Payload(varint(len(self.fitter.head)) + self.q.to_bytes(rows), positions=M)

    @torch.no_grad()
    def decode(self, data):
        dev = self.lm.device
        if self.fitter.form == "emb":
            if not data:
                return torch.zeros((0, self.lm.d_model), device=dev)
            return self.q.from_bytes(data, self.lm.d_model).to(dev)
        if not data:
            return KVReading([], [], len(self.fitter.head))
        start, used = read_varint(data)
        rows = self.q.from_bytes(data[used:], self.hd)
        state = rows.view(self.layers, 2, self.heads, -1, self.hd).to(dev)
        return KVReading([state[i, 0] for i in range(self.layers)], [state[i, 1] for i in range(self.layers)], start)

    def describe(self):
        return {"name": self.name, "kind": f"opt-{self.fitter.form}-{self.fitter.objective}",
                "ratio": self.fitter.ratio, "bits": self.bits} | self.fitter.settings()


def fit_summary(fitter: ParagraphFitter) -> dict:
    """Means over the paragraphs fitted so far: steps, best step, probes, seconds, tokens per second."""
    rows = [r["stats"] for r in fitter.memo.values() if r["stats"].get("positions")]
    if not rows:
        return {"paragraphs": 0}

    def mean(key):
        xs = [r[key] for r in rows if r.get(key) is not None]
        return sum(xs) / len(xs) if xs else None
    return {"paragraphs": len(rows), "reused": sum(bool(r.get("reused")) for r in rows),
            **{f"{k}_mean": mean(k) for k in ("steps", "best_step", "probes", "held_out_kl_start",
                                              "held_out_kl_best", "probe_s", "fit_s", "tokens_per_s")}}


def _build(form: str, objective: str):
    def build(ctx):
        cfg = ctx.cfg.opt if ctx.cfg is not None else OptConfig()
        builder = ctx.extra.get("builder") or PromptBuilder(ctx.lm.tokenizer, "fewshot")
        kind = f"opt-{form}-{objective}"
        folder = None if ctx.out is None else Path(ctx.out) / "opt" / f"{kind}_r{ctx.ratio:g}"
        fitter = ParagraphFitter(ctx.lm, ctx.head_ids, builder, ctx.ratio, form, objective, cfg, folder,
                                 ctx.extra.setdefault("opt_probes", {}))
        bits = cfg.wire_bits()
        name = f"{kind}_r{ctx.ratio:g}"
        pipes = [OptimizedPipeline(fitter, b, name if i == 0 else f"{name}_b{b}") for i, b in enumerate(bits)]
        for p in pipes[1:]:
            p.other_control = False  # the first wire's row carries the other-paragraph control for these fits
        return pipes
    return build


build_emb_copy, build_emb_use = _build("emb", "copy"), _build("emb", "use")
build_kv_copy, build_kv_use = _build("kv", "copy"), _build("kv", "use")

__all__ = ["FORMS", "OBJECTIVES", "OptimizedPipeline", "ParagraphFitter", "fit_summary", "kv_geometry",
           "wire_quantizer"]
