"""The learned sequence compressor: a paragraph -> M = ceil(L / r) latents
that the frozen LLM reads in the paragraph's place.

Sender (sees the context only, never the question, nor the receiver's
prompt template): the frozen LLM's hidden states of the context's tokens at
one layer (one no-grad forward of the context alone) -> a linear map to
`width` -> 0..n transformer layers over the whole context -> window
attention pooling (each window of r consecutive positions is pooled by one
learned query; a learned slot embedding tells the pool where in its window
a position sits) -> a `dim`-dimensional code per latent -> tanh -> a
`bits`-bit uniform quantizer on [-1, 1]. What crosses the wire is those
M x dim x bits bits (exact bytes: `wire.pack_rows`).

Receiver: code -> MLP -> RMS-normalised and multiplied by a gain
initialised to the RMS of the LLM's embedding table (the vectors arrive at
the scale the LLM reads its own tokens at; Gemma's sqrt(d) factor is in
the table) -> [M, d] in the context's place.

Training (`train_seq`, a plain loop like Phase 2): the teacher is the
frozen LLM reading the full text [head][context][question][cue][answer];
the student reads [head][latents][question][cue][answer]. Losses on the
answer positions: KL(teacher || student) over the teacher's top-k tokens
and teacher-forced CE on the gold answer. The head's KV cache (few-shot
shots and 'Context:', identical for every prompt) is computed once and
shared by every row, so a step runs the LLM over M + question + answer
positions only; the teacher's outputs and the sender's hidden states are
computed once per question / paragraph and cached ($LATENTWIRE_CACHE/seq_teacher, keyed by everything they
depend on).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..util import dist
from ..config import SeqConfig
from ..data import context_token_ids
from ..errors import LatentWireError
from ..llm.forward import cache_copy, forward_after, head_cache, logits_kw, right_pad
from ..llm.models import cache_root, get_cache, same_model_source
from ..evaluation.report import reference_text
from ..pipelines.tokens import budget
from ..util.runio import JsonlLogger, NullLogger, atomic_torch_save, safe_torch_load
from ..wire.wire import Quantizer, bounded_quantizer
from ..stage1.train import _Checkpoint, _drop_rows_after, _StopFlag, checked_step, warmup_cosine

FORMAT = 1  # of seq_compressor.pt


# ------------------------------------------------------------- the module

class SeqCompressor(torch.nn.Module):
    """Sender (`encode`: hidden states [B, L, d_in] -> codes [B, M, dim]) and
    receiver (`decode`: codes -> [.., d_model]); `forward` is the pair with
    the quantizer between them (straight-through gradients)."""

    def __init__(self, d_in: int, d_model: int, ratio: int, width: int = 256, layers: int = 1, dim: int = 32,
                 bits: int = 2, emb_rms: float = 1.0, decoder: str = "mlp", table: torch.Tensor | None = None):
        super().__init__()
        if decoder not in ("mlp", "vocab") or (decoder == "vocab" and table is None):
            raise ValueError(f"decoder {decoder!r} (vocab needs the receiver's embedding table)")
        self.decoder = decoder
        self.ratio, self.dim, self.bits = int(ratio), dim, bits
        self.inp = torch.nn.Linear(d_in, width)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.slot = torch.nn.Parameter(torch.zeros(self.ratio, width))
        self.query = torch.nn.Parameter(torch.zeros(width))
        self.code = torch.nn.Linear(width, dim)
        self.dec = torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.GELU(), torch.nn.Linear(width, d_model))
        self.gain = torch.nn.Parameter(torch.tensor(float(emb_rms)))
        self.quantizer = bounded_quantizer(bits, dim)
        if decoder == "vocab":
            # the receiver's own table, not saved with the weights (both ends hold it)
            self.register_buffer("table", table.detach().float(), persistent=False)
            # cosine logits times 30 at the start: sharp enough that a vector near one row reads as that row
            # (with 49k rows at cosine ~0.1, a scale of 10 still spreads most of the mass over the others)
            self.log_scale = torch.nn.Parameter(torch.tensor(math.log(30.0)))

    ENCODER = ("inp.", "layers.", "slot", "query", "code.")
    """The sender's parameters (everything before the wire); the rest -- `dec`, `gain` -- is the receiver's."""

    def encoder_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.ENCODER)}

    def share_encoder(self, state: dict[str, torch.Tensor]) -> None:
        """Load a trained sender and freeze it: its payloads are then the
        other run's, byte for byte, and only this receiver's decoder trains."""
        missing = set(self.encoder_state()) - set(state)
        if missing:
            raise ValueError(f"encoder state lacks {sorted(missing)[:3]}")
        self.load_state_dict({k: state[k] for k in self.encoder_state()}, strict=False)
        for name, p in self.named_parameters():
            if name.startswith(self.ENCODER):
                p.requires_grad_(False)

    def encode(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, L, d_in] (right-padded), mask [B, L] bool -> codes [B, M, dim]
        in [-1, 1] and their mask [B, M]; row b has ceil(L_b / r) latents."""
        h = h.float()
        # each position at unit RMS: the sender's states differ in scale by layer (SmolLM2's embeddings ~0.12,
        # its middle layer ~10x that), and an unnormalised small input makes every layer after it learn slowly
        x = self.inp(h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~mask)
        B, L, w = x.shape
        r = self.ratio
        M = math.ceil(L / r)
        pad = M * r - L
        x = F.pad(x, (0, 0, 0, pad)).view(B, M, r, w) + self.slot
        m = F.pad(mask, (0, pad)).view(B, M, r)
        s = (x @ self.query) / math.sqrt(w)
        a = torch.softmax(s.masked_fill(~m, float("-inf")), -1).nan_to_num(0.0)  # an empty window pools to 0
        z = torch.tanh(self.code((a[..., None] * x).sum(2)))
        return z, m.any(-1)

    def vocab_logits(self, z: torch.Tensor) -> torch.Tensor:
        """vocab decoder: logits over the receiver's vocabulary, cosine to each row times a learned scale."""
        y = F.normalize(self.dec(z.float()), dim=-1)
        return self.log_scale.exp() * (y @ F.normalize(self.table, dim=-1).T)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """codes -> [.., d_model]. mlp: an MLP's output at the table's RMS; vocab: a convex combination of the
        receiver's own embedding rows (softmax over vocab_logits), so what it reads stays on the manifold of the
        vectors it was trained on -- at a sharp softmax, exactly one of its tokens."""
        if self.decoder == "vocab":
            return torch.softmax(self.vocab_logits(z), -1) @ self.table
        y = self.dec(z.float())
        return self.gain * y / y.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    def forward(self, h: torch.Tensor, mask: torch.Tensor, logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair with the quantizer between them: the receiver's vectors [B, M, d] (or, `logits`, the vocab
        decoder's logits [B, M, V]) and the latents' mask [B, M]."""
        z, m = self.encode(h, mask)
        zq = self.quantizer.roundtrip(z.reshape(-1, self.dim)).view(z.shape)  # the quantizer takes [N, dim]
        return (self.vocab_logits(zq) if logits else self.decode(zq)), m


def build_compressor(lm, cfg: SeqConfig, sender=None) -> SeqCompressor:
    """Encoder on the sender's hidden states (`sender`, default: the receiver
    `lm`), decoder into the receiver's embedding space at its table's RMS."""
    table = lm.embedding_table().float()
    emb_rms = float(table.pow(2).mean(-1).sqrt().mean())
    return SeqCompressor((sender or lm).d_model, lm.d_model, cfg.seq_ratio, cfg.seq_width, cfg.seq_layers,
                         cfg.seq_dim, cfg.seq_bits, emb_rms, cfg.seq_decoder,
                         table if cfg.seq_decoder == "vocab" else None)


def resolve_layer(lm, layer: int | None) -> int:
    """Index into the LLM's hidden_states tuple (0 = embeddings .. n = last)."""
    n = int(lm.model.config.get_text_config().num_hidden_layers)
    if layer is None:
        return n // 2
    if not -(n + 1) <= layer <= n:
        raise LatentWireError(f"--seq-layer {layer}: this model has layers 0..{n} (or -1 for the last)")
    return layer % (n + 1)


@torch.no_grad()
def context_states(lm, ids: Sequence[int], layer: int) -> torch.Tensor:
    """The sender's input: hidden states [L, d] of the context read alone."""
    if not len(ids):
        return torch.zeros((0, lm.d_model))
    x = torch.tensor([list(ids)], dtype=torch.long, device=lm.device)
    if layer == 0:  # the input embeddings (hidden_states[0]): no forward pass needed
        return lm.model.get_input_embeddings()(x)[0].detach().float().cpu()
    out = lm.model(input_ids=x, output_hidden_states=True, use_cache=False, **logits_kw(lm.model))
    return out.hidden_states[layer][0].float().cpu()


def save_compressor(comp: SeqCompressor, path: Path, meta: dict) -> None:
    """State dict plus JSON-able metadata (read back with weights_only=True)."""
    atomic_torch_save({"format": FORMAT, "state": comp.state_dict(), "meta": json.dumps(meta)}, path)


def read_compressor_file(path: str | Path, flag: str = "--seq-path") -> dict:
    """The saved blob, or a one-line error naming `flag` (checked before the model loads)."""
    blob = safe_torch_load(path, flag)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise LatentWireError(f"{flag} {path}: not a LatentWire sequence compressor (seq_compressor.pt)")
    return blob


def _check_model(flag: str, path, saved: dict | None, lm, role: str) -> None:
    fp = lm.fingerprint()
    for k in ("model", "d_model", "vocab_size"):
        have = (saved or {}).get(k)
        if have != fp[k] and not (k == "model" and same_model_source(have, fp[k])):
            raise LatentWireError(f"{flag} {path}: its {role} has {k}={have!r}, "
                                  f"this run's {role} has {fp[k]!r}")


def load_compressor(lm, path: str | Path, sender=None, flag: str = "--seq-path") -> tuple[SeqCompressor, dict]:
    """A compressor saved by an earlier run; refuses one made for another
    receiver, sender or shape (naming `flag`)."""
    blob = read_compressor_file(path, flag)
    meta = json.loads(blob["meta"])
    _check_model(flag, path, meta.get("model"), lm, "receiver")
    _check_model(flag, path, meta.get("sender", meta.get("model")), sender or lm, "sender")
    shape = meta["shape"]
    dec = shape.get("decoder", "mlp")
    comp = SeqCompressor((sender or lm).d_model, lm.d_model, shape["ratio"], shape["width"], shape["layers"],
                         shape["dim"], shape["bits"], decoder=dec,
                         table=lm.embedding_table().float() if dec == "vocab" else None)
    comp.load_state_dict(blob["state"])
    return comp.eval(), meta


SHAPE_FLAGS = {"ratio": "seq_ratio", "width": "seq_width", "layers": "seq_layers", "dim": "seq_dim",
               "bits": "seq_bits", "decoder": "seq_decoder"}


def shared_sender(path: str | Path, cfg: SeqConfig, sender, layer: int) -> dict[str, torch.Tensor]:
    """The encoder state of --seq-sender-path, after checking that it was
    trained on this sender model with this run's shape (one-line errors)."""
    blob = read_compressor_file(path, "--seq-sender-path")
    meta = json.loads(blob["meta"])
    _check_model("--seq-sender-path", path, meta.get("sender", meta.get("model")), sender, "sender")
    shape = meta["shape"]
    for key, field in SHAPE_FLAGS.items():
        if shape.get(key, "mlp" if key == "decoder" else None) != getattr(cfg, field):
            raise LatentWireError(f"--seq-sender-path {path}: its sender has {key} {shape[key]}, this run asks "
                                  f"--{field.replace('_', '-')} {getattr(cfg, field)}")
    if shape["layer"] != layer:
        raise LatentWireError(f"--seq-sender-path {path}: its sender reads layer {shape['layer']}, this run "
                              f"--seq-layer {layer}")
    return blob["state"]


# ------------------------------------------------------------- training data

def answer_ids(tokenizer, answer: str) -> list[int]:
    """The gold answer as the model would write it after the cue: ' answer' and the newline that ends it."""
    return tokenizer(" " + answer + "\n", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def teacher_topk(lm, hc, n_head: int, ctx: Sequence[int], rows: Sequence[tuple[list[int], list[int]]],
                 k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each (tail, answer) row about one context: the teacher's top-k
    log-probabilities and ids [A, k] at the positions that predict the
    answer's tokens, reading [head][context][tail][answer] as text."""
    dev = lm.device
    cache = cache_copy(hc, 1)
    n = n_head
    if len(ctx):
        x = torch.tensor([list(ctx)], dtype=torch.long, device=dev)
        cache = get_cache(forward_after(lm, cache, n, x, torch.ones_like(x, dtype=torch.bool), True))
        n += len(ctx)
    cache.batch_repeat_interleave(len(rows))
    segs = [torch.tensor(t + a, dtype=torch.long, device=dev) for t, a in rows]
    x, m = right_pad(segs)
    logits = forward_after(lm, cache, n, x, m, True).logits
    out = []
    for i, (t, a) in enumerate(rows):
        lp = torch.log_softmax(logits[i, len(t) - 1:len(t) - 1 + len(a)].float(), -1)
        v, ix = lp.topk(min(k, lp.shape[-1]), -1)
        out.append((v.cpu(), ix.cpu()))
    return out


def build_items(lm, prompts, layer: int, topk: int, hc, n_head: int, progress: bool = True,
                sender=None) -> list[dict]:
    """One training item per question: the sender's input (its context's
    hidden states, shared by the paragraph's questions; `sender`: another
    model, reading its own tokens of the context's text), the tail (question
    and cue), the gold answer ids and the teacher's top-k at the answer (the
    teacher is always the receiver `lm` reading the text). `topk` 0: no
    teacher (runs that only reconstruct or autoencode the context never read it)."""
    groups: dict[tuple, list] = {}
    for p in prompts:
        groups.setdefault(tuple(p.context_ids), []).append(p)
    items = []
    desc = "seq: teacher + context states" if topk else "seq: context states"
    for ctx, ps in tqdm(groups.items(), desc=desc, disable=not progress, leave=False):
        h = (context_states(lm, ctx, layer) if sender is None else
             context_states(sender, context_token_ids(sender.tokenizer, ps[0].context_text), layer)).half()
        rows = [(list(p.ids[p.ctx_end:]), answer_ids(lm.tokenizer, p.example.answers[0])) for p in ps]
        teacher = teacher_topk(lm, hc, n_head, ctx, rows, topk) if topk else [None] * len(rows)
        for p, (t, a), tk in zip(ps, rows, teacher):
            item = {"qid": p.example.id, "h": h, "ctx": list(ctx), "tail": t, "ans": a}
            if tk is not None:
                item |= {"t_logp": tk[0].half(), "t_ids": tk[1].int()}
            items.append(item)
    return items


def items_key(lm, prompts, layer: int, topk: int, sender=None) -> str:
    """What the cached items depend on: model weights (the sender's too), layer, top-k, every prompt's ids and
    answer."""
    who = {} if sender is None else {"sender": sender.fingerprint(), "sender_weights": sender.weights_digest()}
    h = hashlib.sha256(json.dumps({"model": lm.fingerprint(), "weights": lm.weights_digest(), "layer": layer,
                                   "topk": topk} | who, sort_keys=True, default=str).encode())
    for p in prompts:
        h.update(json.dumps([p.ids, p.ctx_start, p.ctx_end, p.example.answers[0]]).encode())
    return h.hexdigest()


def cached_items(lm, prompts, layer: int, topk: int, hc, n_head: int, folder: Path | None,
                 progress: bool = True, sender=None) -> tuple[list[dict], bool]:
    """build_items, read from / written to `folder`/<key>.pt, the key being
    everything the items depend on (model weights, layer, top-k, every
    prompt): runs that differ only in the compressor's shape, seed or steps
    share one teacher computation. Returns (items, reused)."""
    key = items_key(lm, prompts, layer, topk, sender)
    path = None if folder is None else Path(folder) / f"{key[:32]}.pt"
    if path is not None and path.exists():
        blob = safe_torch_load(path, "seq teacher cache")
        if isinstance(blob, dict) and blob.get("key") == key:
            return blob["items"], True
    items = build_items(lm, prompts, layer, topk, hc, n_head, progress, sender)
    if path is not None and dist.current().is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"key": key, "items": items}, path)
    return items, False


# ------------------------------------------------------------- the loss

def collate(items: Sequence[dict]) -> dict:
    h, hm = right_pad([it["h"].float() for it in items])
    return {"h": h, "h_mask": hm, "items": list(items)}


def window_targets(items: Sequence[dict], ratio: int, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each latent's window of context ids [B, M, r] and its mask (the last window may be short)."""
    ids = torch.zeros((len(items), M * ratio), dtype=torch.long)
    mask = torch.zeros((len(items), M * ratio), dtype=torch.bool)
    for i, it in enumerate(items):
        ids[i, :len(it["ctx"])] = torch.tensor(it["ctx"], dtype=torch.long)
        mask[i, :len(it["ctx"])] = True
    return ids.view(len(items), M, ratio), mask.view(len(items), M, ratio)


def recon_loss(comp, batch: dict) -> dict[str, torch.Tensor]:
    """Token reconstruction, no LLM (--seq-recon-steps; vocab decoder): each latent's logits over the
    receiver's vocabulary against the tokens of its window -- CE (mean over tokens) and the share of windows
    whose first token is the decoder's top choice. At r = 1 this is "send every token"; at r > 1 it asks for
    the window's tokens at once (their mixture)."""
    core = getattr(comp, "module", comp)  # under DDP: the wrapped compressor's ratio and device
    dev = next(core.parameters()).device
    logits, m = comp(batch["h"].to(dev), batch["h_mask"].to(dev), logits=True)
    lp = torch.log_softmax(logits, -1)  # [B, M, V]
    ids, mask = window_targets(batch["items"], core.ratio, logits.shape[1])
    ids, mask = ids.to(dev), mask.to(dev)
    got = lp.gather(-1, ids)  # [B, M, r]
    ce = -(got * mask).sum() / mask.sum().clamp_min(1)
    first = m & mask[..., 0]
    acc = ((lp.argmax(-1) == ids[..., 0]) & first).sum() / first.sum().clamp_min(1)
    return {"loss": ce, "ce": ce, "acc": acc.float(), "positions": batch["h_mask"].sum().float()}


def autoencode_items(items: Sequence[dict], max_tokens: int = 128) -> list[dict]:
    """Pretraining items, one per distinct paragraph: no tail, and the
    'answer' is the context itself (its first max_tokens tokens), no teacher."""
    seen, out = set(), []
    for it in items:
        key = tuple(it["ctx"])
        if key not in seen and key:
            seen.add(key)
            out.append({"h": it["h"], "ctx": it["ctx"], "tail": [], "ans": it["ctx"][:max_tokens]})
    return out


def seq_loss(lm, comp, batch: dict, hc, n_head: int, cfg: SeqConfig) -> dict[str, torch.Tensor]:
    """One loss step, each term returned: the student reads [head][latents]
    [tail][answer]; KL(teacher || student) over the teacher's top-k ids and
    CE on the gold answer, both at the positions that predict the answer.
    Pretraining items (no teacher) give CE only: reconstructing the context."""
    dev = lm.device
    items = batch["items"]
    y, ym = comp(batch["h"].to(dev), batch["h_mask"].to(dev))  # [B, M, d], [B, M]
    emb = lm.model.get_input_embeddings()
    segs, where = [], []
    for i, it in enumerate(items):
        M = int(ym[i].sum())
        ta = torch.tensor(it["tail"] + it["ans"], dtype=torch.long, device=dev)
        with torch.no_grad():
            e = emb(ta).float()
        segs.append(torch.cat([y[i, :M].float(), e]))
        start = M + len(it["tail"]) - 1
        where.append((start, len(it["ans"])))
    x, m = right_pad(segs)
    logits = forward_after(lm, cache_copy(hc, len(items)), n_head, x, m, False).logits.float()
    terms = answer_terms(logits, items, where)
    terms["positions"] = m.sum().float()  # what the LLM ran over (throughput), not a loss
    pre = "t_logp" not in items[0]
    terms["loss"] = terms["ce"] if pre else cfg.seq_w_ce * terms["ce"] + cfg.seq_w_kl * terms["kl"]
    return terms


def answer_terms(logits: torch.Tensor, items: Sequence[dict], where) -> dict[str, torch.Tensor]:
    """Mean CE on the gold answer and KL(teacher top-k || model) per answer
    token, row i's answer predicted from logits[i, start_i : start_i + A_i]."""
    dev = logits.device
    ce, kl, n = logits.new_zeros(()), logits.new_zeros(()), 0
    for i, (it, (s, A)) in enumerate(zip(items, where)):
        lp = torch.log_softmax(logits[i, s:s + A], -1)  # [A, V]
        gold = torch.tensor(it["ans"], dtype=torch.long, device=dev)
        ce = ce - lp.gather(-1, gold[:, None]).sum()
        n += A
        if "t_logp" not in it:
            continue
        t_lp = it["t_logp"].float().to(dev)
        p = torch.softmax(t_lp, -1)  # the teacher's top-k, renormalised
        kl = kl + (p * (torch.log(p.clamp_min(1e-12)) - lp.gather(-1, it["t_ids"].long().to(dev)))).sum()
    return {"ce": ce / n, "kl": kl / n}


@torch.no_grad()
def reference_losses(lm, items: Sequence[dict], hc, n_head: int, ratio: int, n: int, seed: int = 0,
                     batch: int = 8) -> dict[str, dict[str, float]]:
    """seq_loss's CE and KL for what the learned compressor is measured
    against, on a fixed sample of n training questions: the receiver reading
    the whole context as text (the teacher's own input: its KL is the floor of
    the top-k term, -log of the mass the top-k holds), its first M
    tokens (truncation at the same positions) and no context (the question
    alone). Why: a loss curve means nothing without them -- a compressor whose
    loss stays at `none` sends nothing the receiver can use."""
    if n <= 0 or not items:
        return {}
    pick = [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), min(n, len(items))))]
    cuts = {"text": lambda c: c, "truncate": lambda c: c[:budget(len(c), ratio)], "none": lambda c: []}
    out = {}
    for name, cut in cuts.items():
        tot = {"ce": 0.0, "kl": 0.0}
        for b in range(0, len(pick), batch):
            chunk = pick[b:b + batch]
            ctxs = [cut(it["ctx"]) for it in chunk]
            rows = [c + it["tail"] + it["ans"] for c, it in zip(ctxs, chunk)]
            x, m = right_pad([torch.tensor(r, dtype=torch.long, device=lm.device) for r in rows])
            logits = forward_after(lm, cache_copy(hc, len(chunk)), n_head, x, m, True).logits.float()
            where = [(len(c) + len(it["tail"]) - 1, len(it["ans"])) for c, it in zip(ctxs, chunk)]
            A = sum(len(it["ans"]) for it in chunk)
            for k, v in answer_terms(logits, chunk, where).items():
                tot[k] += float(v) * A
        A = sum(len(it["ans"]) for it in pick)
        out[name] = {k: v / A for k, v in tot.items()} | {"questions": len(pick)}
    return out


# ------------------------------------------------------------- training

def train_seq(lm, comp: SeqCompressor, items: Sequence[dict], hc, n_head: int, cfg: SeqConfig, out_dir: str | Path,
              seed: int = 0, progress: bool = True, resume: bool = False, stop_after: int | None = None) -> dict:
    """Plain loop: sample questions -> loss terms -> clip -> step -> log.
    Checkpoints (`ckpt_seq.pt`: compressor, optimizer, scheduler, RNGs,
    step) every --seq-ckpt-every steps and on SIGINT/SIGTERM; `resume=True`
    continues exactly where the last one left off. Under torchrun each rank
    takes its share of every step's questions (DDP averages gradients)."""
    out_dir = Path(out_dir)
    d = dist.current()
    if not items:
        raise LatentWireError("--sequence learned: no training questions to train on")
    R, P = cfg.seq_recon_steps, cfg.seq_pretrain_steps
    pre_items = autoencode_items(items) if (P or R) else []
    total = R + P + cfg.seq_steps

    def stage(s: int) -> str:  # token reconstruction, then autoencoding through the LLM, then QA
        return "recon" if s < R else "pretrain" if s < R + P else "qa"
    log = JsonlLogger(out_dir / "seq_train_log.jsonl") if d.is_main else NullLogger()
    mine = dist.slice_for_rank(cfg.seq_batch, d, "--seq-batch")
    g = torch.Generator().manual_seed(seed + 3)
    params = [p for p in comp.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.seq_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, cfg.seq_warmup))
    step, first, last = 0, None, None
    positions = {"recon": 0.0, "pretrain": 0.0, "qa": 0.0}
    seconds = {"recon": 0.0, "pretrain": 0.0, "qa": 0.0}
    ckpt_path = out_dir / "ckpt_seq.pt"
    ckpt = _Checkpoint(ckpt_path, comp, opt, sched, g, cfg, lambda: {"step": step, "first": first, "last": last},
                       d.is_main)
    if resume:
        if ckpt_path.exists():
            ck = ckpt.load()
            step, first, last = ck["step"], ck["first"], ck["last"]
        if log.path is not None and log.path.exists():
            _drop_rows_after(log, step, phase2=False)
        log.log(event="resume", step=step)
    model = dist.wrap(comp, d)
    comp.train()
    t0 = time.time()
    bar = tqdm(total=total, initial=step, desc="train seq compressor", disable=not (progress and d.is_main),
               leave=False)
    with _StopFlag() as stop:
        while step < total:
            st = stage(step)
            ts = time.time()
            pool = items if st == "qa" else pre_items
            pick = torch.randint(0, len(pool), (cfg.seq_batch,), generator=g).tolist()[mine]
            batch = collate([pool[i] for i in pick])
            terms = recon_loss(model, batch) if st == "recon" else seq_loss(lm, model, batch, hc, n_head, cfg)
            row = dist.mean_terms(terms, d)
            gn = checked_step(terms, row, params, opt, sched, 1.0, "seq training", step, ckpt_path)
            positions[st] += row["positions"] * d.world
            seconds[st] += time.time() - ts
            step += 1
            if st == "qa":  # the summary's first/last are QA losses
                first = first or row
                last = row
            log.log(event="step", step=step, stage=st, lr=sched.get_last_lr()[0], grad_norm=float(gn),
                    wall_s=time.time() - t0, **row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if step % cfg.seq_ckpt_every == 0 or step == total:
                ckpt.save()
            ckpt.stop_if_signalled(stop, d, bar, log, "interrupted", step, " during seq training")
            if stop_after is not None and step >= stop_after:
                bar.close()
                return {"steps": step, "stopped_early": True}
    bar.close()
    comp.eval()
    return {"steps": total, "recon_steps": R, "pretrain_steps": P, "first": first, "last": last,
            "train_s": time.time() - t0,
            # throughput of each stage on this machine: positions the step ran over (the compressor's input for
            # reconstruction; the LLM's latents + question + answer otherwise) per second (this run's steps)
            "positions_per_s": {k: positions[k] / seconds[k] for k in positions if seconds[k]}}


def shape_meta(comp: SeqCompressor, cfg: SeqConfig, layer: int) -> dict:
    return {"ratio": comp.ratio, "width": cfg.seq_width, "layers": cfg.seq_layers, "dim": comp.dim,
            "bits": comp.bits, "layer": layer, "decoder": comp.decoder}


def prepare_learned(lm, cfg: SeqConfig, train_prompts, head_ids: Sequence[int], out_dir: Path, seed: int,
                    progress: bool, resume: bool, log=print, use_cache: bool = True,
                    sender=None) -> tuple[SeqCompressor, int, dict]:
    """Train (or load, --seq-path) the compressor and return it, the hidden-state
    layer its sender reads, and a summary. `sender`: another model on the sending side (default: the
    receiver `lm`); with --seq-sender-path its trained encoder is loaded and
    frozen and only the decoder into `lm` trains. The teacher's outputs and
    the context states are read from $LATENTWIRE_CACHE/seq_teacher when an
    identical set was computed before (`use_cache`, off with --no-cache); the
    summary says which."""
    layer = resolve_layer(sender or lm, cfg.seq_layer)
    where = lm.device if lm.device.type == "cuda" else "cpu"
    if cfg.seq_path:
        comp, meta = load_compressor(lm, cfg.seq_path, sender)
        comp.to(where)
        return comp, meta["shape"]["layer"], {"loaded_from": cfg.seq_path}
    torch.manual_seed(seed)
    comp = build_compressor(lm, cfg, sender).to(where)
    if cfg.seq_sender_path:
        comp.share_encoder(shared_sender(cfg.seq_sender_path, cfg, sender or lm, layer))
        log(f"seq compressor: sender loaded from {cfg.seq_sender_path} and frozen; training this receiver's "
            "decoder only")
    hc = head_cache(lm, head_ids)
    t0 = time.time()
    # the teacher is read by the QA stage only: a run that only reconstructs or autoencodes skips it
    topk = cfg.seq_teacher_topk if cfg.seq_steps > 0 else 0
    items, reused = cached_items(lm, train_prompts[:cfg.seq_max_questions], layer, topk, hc,
                                 len(head_ids), cache_root() / "seq_teacher" if use_cache else None, progress,
                                 sender)
    cache_s = time.time() - t0
    log(f"seq compressor: {len(items)} training questions, {'teacher + ' if topk else ''}context states "
        f"{'read from the cache (same model, layer, top-k, questions)' if reused else f'computed in {cache_s:.0f} s'}; "
        f"r={comp.ratio}, {comp.dim} dims x {comp.bits} bits, layer {layer}")
    refs = reference_losses(lm, items, hc, len(head_ids), comp.ratio, cfg.seq_ref_questions if topk else 0, seed)
    if refs:
        log(f"seq reference losses (CE / KL per answer token, {refs['text']['questions']} training questions): "
            + reference_text(refs))
        if dist.current().is_main and not resume:
            JsonlLogger(Path(out_dir) / "seq_train_log.jsonl").log(event="reference", ratio=comp.ratio, **refs)
    summary = train_seq(lm, comp, items, hc, len(head_ids), cfg, out_dir, seed, progress, resume)
    summary |= {"reference": refs, "questions": len(items), "cache_reused": reused, "cache_s": cache_s, "layer": layer,
                "params": sum(p.numel() for p in comp.parameters()),
                "trained_params": sum(p.numel() for p in comp.parameters() if p.requires_grad),
                "sender_from": cfg.seq_sender_path}
    if dist.current().is_main:
        save_compressor(comp, out_dir / "seq_compressor.pt",
                        {"model": lm.fingerprint(), "sender": (sender or lm).fingerprint(),
                         "shape": shape_meta(comp, cfg, layer), "config": asdict(cfg),
                         "summary": {k: v for k, v in summary.items() if k not in ("first", "last")}})
    return comp, layer, summary


__all__ = ["SeqCompressor", "autoencode_items", "build_compressor", "build_items",
           "cached_items", "collate",
           "context_states", "head_cache", "load_compressor", "prepare_learned", "resolve_layer", "save_compressor",
           "reference_losses", "seq_loss", "shared_sender", "teacher_topk", "train_seq"]
