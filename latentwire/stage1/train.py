"""Phase 1 training of the adapter on reconstruction.

The adapters are per-token maps (k -> d), and a token's input embedding
depends only on its id, so a training example is a token id: x = table[id],
z = compressor(x). Batches mix ids sampled from the training corpus (so
frequent tokens weigh as they do in text) with ids drawn uniformly from the
whole vocabulary (so tokens never seen in training text still reconstruct).
No LLM forward pass is needed, which is why Phase 1 takes seconds on a CPU.

Plain loop (torchtune style): sample -> loss terms -> clip -> step -> log.
Checkpoints (adapter, optimizer, scheduler, RNG, step, best) are written
atomically every `ckpt_every` steps; `resume=True` continues exactly.
"""
from __future__ import annotations

import math
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..util import dist
from ..config import TrainConfig
from ..errors import LatentWireError
from .losses import answer_cross_entropy, logit_kl, reconstruction_loss
from ..util.runio import JsonlLogger, NullLogger, atomic_torch_save, read_jsonl, safe_torch_load, write_jsonl
from ..evaluation.generate import wire_mask


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of
    the current step and then raises KeyboardInterrupt (never a torn file)."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# Phase 2's log rows; a Phase 1 resume leaves them to Phase 2's own resume
PHASE2_EVENTS = ("step2", "resume2", "interrupted2")


def _drop_rows_after(log, step: int, phase2: bool) -> None:
    """On resume: drop this phase's log rows of steps after the checkpoint
    (the killed run did them; they are done again); the other phase's rows
    stay. Rank 0 only (the others' NullLogger has no path)."""
    if log.path is not None and log.path.exists():
        write_jsonl(log.path, [r for r in read_jsonl(log.path)
                               if (r.get("event") in PHASE2_EVENTS) != phase2 or r.get("step", 0) <= step])


class _Checkpoint:
    """The resumable state of a training loop, saved atomically by rank 0:
    adapter, optimizer, scheduler, the batch sampler's and torch's RNG (dropout),
    and the loop's own fields (read through `fields()` when saving)."""

    def __init__(self, path: Path, adapter, opt, sched, g: torch.Generator, cfg: TrainConfig,
                 fields: Callable[[], dict], main: bool):
        self.path, self.adapter, self.opt, self.sched, self.g = path, adapter, opt, sched, g
        self.cfg, self.fields, self.main = cfg, fields, main

    def save(self) -> None:
        if self.main:  # one writer; every rank holds the same state
            atomic_torch_save({"adapter": self.adapter.state_dict(), "optimizer": self.opt.state_dict(),
                               "scheduler": self.sched.state_dict(), "sampler_rng": self.g.get_state(),
                               "torch_rng": torch.get_rng_state(), **self.fields(),
                               "train_config": asdict(self.cfg)}, self.path)

    def load(self) -> dict:
        ck = safe_torch_load(self.path, "--resume: checkpoint")
        self.adapter.load_state_dict(ck["adapter"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.g.set_state(ck["sampler_rng"])
        torch.set_rng_state(ck["torch_rng"])
        return ck

    def stop_if_signalled(self, stop: _StopFlag, d, bar, log, event: str, step: int, where: str = "") -> None:
        """After a step: on SIGINT/SIGTERM (on any rank) save and stop."""
        if dist.any_flag(stop.signum is not None, d):
            self.save()
            bar.close()
            log.log(event=event, step=step, signal=int(stop.signum or 0))
            raise KeyboardInterrupt(f"signal {stop.signum or 'on another rank'}{where} at step {step}; "
                                    f"checkpoint saved to {self.path}")


def checked_step(terms: dict, row: dict, params, opt, sched, clip: float, what: str, step: int,
                 ckpt_path: Path) -> float:
    """One optimizer step of a loop through the frozen LLM: refuse a
    non-finite loss term (nothing is saved, so the last good checkpoint on
    disk stays), then backward, clip, step. Returns the gradient norm."""
    for name, v in row.items():
        if not math.isfinite(v):
            raise LatentWireError(f"{what} stopped at step {step + 1}: loss term {name!r} is {v} "
                                  f"(last good checkpoint: {ckpt_path})")
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    gn = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    opt.step()
    sched.step()
    return float(gn)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def token_recovery(recon: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, chunk: int = 2048) -> float:
    """Share of reconstructed vectors whose nearest vocabulary row (cosine
    over the embedding table) is the original token."""
    tn = torch.nn.functional.normalize(table.float(), dim=-1)
    hits = 0
    for i in range(0, recon.shape[0], chunk):
        r = torch.nn.functional.normalize(recon[i:i + chunk].float(), dim=-1)
        hits += int(((r @ tn.T).argmax(-1) == ids[i:i + chunk].to(r.device)).sum())
    return hits / max(1, recon.shape[0])


@torch.no_grad()
def apply_adapter(adapter, z: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    return torch.cat([adapter(z[i:i + chunk]) for i in range(0, z.shape[0], chunk)]) if z.shape[0] else z


@torch.no_grad()
def recon_metrics(adapter, z_table: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> dict:
    was = adapter.training
    adapter.eval()
    y = apply_adapter(adapter, z_table[ids])
    x = table[ids]
    terms = reconstruction_loss(y, x)
    nr = (y.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-8))
    adapter.train(was)
    return {"cos": float(terms["cos"]), "mse": float(terms["mse"]), "norm_ratio": float(nr.mean()),
            "token_recovery": token_recovery(y, ids, table)}


def vocab_sample(V: int, mode: str, seed: int = 0, n: int = 8192) -> torch.Tensor | None:
    """The ids whole-vocabulary metrics are measured on: None = all of them
    (mode full, or auto with V <= 65,536), else n random ids."""
    if mode == "full" or (mode == "auto" and V <= 65536) or n >= V:
        return None
    return torch.randperm(V, generator=torch.Generator().manual_seed(seed + 7))[:n]


def vocab_recon_metrics(adapter, z_table: torch.Tensor, table: torch.Tensor, ids: torch.Tensor | None) -> dict:
    """recon_metrics over the whole vocabulary (ids None) or a sample of it,
    with the sample size and a Wilson 95% interval of the token recovery."""
    V = table.shape[0]
    m = recon_metrics(adapter, z_table, table, torch.arange(V) if ids is None else ids)
    n = V if ids is None else int(ids.numel())
    return m | {"ids_measured": n, "of_vocabulary": V,
                "token_recovery_ci95": [m["token_recovery"]] * 2 if ids is None else _recovery_ci(m["token_recovery"], n)}


def _has_params(adapter) -> bool:
    return any(p.requires_grad for p in adapter.parameters())


def _recovery_ci(p: float, n: int) -> list[float]:
    """Wilson 95% interval of a share measured on n tokens."""
    if n == 0:
        return [0.0, 1.0]
    z = 1.96
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, c - h), min(1.0, c + h)]


def train_phase1(adapter: torch.nn.Module, z_table: torch.Tensor, table: torch.Tensor, pool_ids: torch.Tensor,
                 cfg: TrainConfig, out_dir: str | Path, seed: int = 0, quick_ids: torch.Tensor | None = None,
                 progress: bool = True, resume: bool = False,
                 on_epoch: Callable[[int, dict], None] | None = None, stop_after: int | None = None,
                 vocab_ids: torch.Tensor | None = None) -> dict:
    """Train `adapter` so that adapter(z_table[id]) ~ table[id].

    `quick_ids`: the selection set -- token occurrences of held-out training
    articles (never in `pool_ids`, never evaluation text); the quick
    evaluations and the per-epoch choice of the best state use it (token
    recovery with a Wilson 95% interval). Whole-vocabulary metrics are
    computed once, for the state training ends on, over `vocab_ids` (default:
    every id; see `vocab_sample`). Returns a summary; writes
    `train_log.jsonl`, `ckpt.pt` (resumable) and the best state in `out_dir`.
    """
    out_dir = Path(out_dir)
    d = dist.current()
    log = JsonlLogger(out_dir / "train_log.jsonl") if d.is_main else NullLogger()
    V = table.shape[0]
    if not _has_params(adapter):
        return {"steps": 0, "note": "adapter has no trainable parameters"}
    if pool_ids.numel() == 0 and cfg.vocab_fraction < 1.0:
        raise LatentWireError("training token pool is empty (no training prompts?); set --vocab-fraction 1")
    g = torch.Generator().manual_seed(seed)
    select_set = "held-out training articles"
    if quick_ids is None or quick_ids.numel() == 0:
        quick_ids = torch.randint(0, V, (2048,), generator=torch.Generator().manual_seed(seed + 1))
        select_set = "2,048 random vocabulary ids (no held-out text)"
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * cfg.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, cfg.warmup_steps))
    step, best = 0, {"token_recovery": -1.0, "cos": -1.0}
    ckpt_path = out_dir / "ckpt.pt"
    ckpt = _Checkpoint(ckpt_path, adapter, opt, sched, g, cfg, lambda: {"step": step, "best": best}, d.is_main)
    if resume and ckpt_path.exists():
        ck = ckpt.load()
        step, best = ck["step"], ck["best"]
        _drop_rows_after(log, step, phase2=False)
        log.log(event="resume", step=step)

    if step == 0 and not resume:
        # an adapter that already reconstructs every held-out token (the vocab
        # adapter on fp32 codes: retrieval) has nothing to learn: say so, skip
        start = recon_metrics(adapter, z_table, table, quick_ids)
        if start["token_recovery"] == 1.0 and start["cos"] > 0.9999:
            log.log(event="skipped", reason="exact before training", select_set=select_set, **start)
            adapter.eval()
            best |= {"token_recovery": 1.0, "cos": start["cos"], "step": 0, "select_metrics": start,
                     "select_set": select_set, "note": "already exact on the selection set: training skipped",
                     "vocab_metrics": vocab_recon_metrics(adapter, z_table, table, vocab_ids)}
            return {"steps": 0, "best": best, "skipped": "exact before training"}
    n_vocab = round(cfg.vocab_fraction * cfg.batch_tokens)
    n_pool = cfg.batch_tokens - n_vocab
    # N processes: every rank draws the same global batch (same generator)
    # and trains on its 1/N slice; DDP averages the slices' gradients
    mine = dist.slice_for_rank(cfg.batch_tokens, d, "--batch-tokens")
    model = dist.wrap(adapter, d)
    adapter.train()
    bar = tqdm(total=total, initial=step, desc="train phase 1", disable=not (progress and d.is_main), leave=False)
    with _StopFlag() as stop:
        while step < total:
            ids = torch.cat([torch.randint(0, V, (n_vocab,), generator=g),
                             pool_ids[torch.randint(0, max(1, pool_ids.numel()), (n_pool,), generator=g)]
                             if n_pool else torch.empty(0, dtype=torch.long)])[mine]
            terms = reconstruction_loss(model(z_table[ids]), table[ids], w_cos=cfg.w_cos, w_mse=cfg.w_mse)
            logged = dist.mean_terms(terms, d)
            for name, v in logged.items():
                if not math.isfinite(v):
                    # no save here: the last good checkpoint on disk stays as it is
                    raise LatentWireError(f"training stopped at step {step}: loss term {name!r} is {v} "
                                          f"(last good checkpoint: {ckpt_path})")
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if not torch.isfinite(gn):
                raise LatentWireError(f"training stopped at step {step}: gradient norm is {float(gn)} "
                                      f"(loss terms {', '.join(terms)}; last good checkpoint: {ckpt_path})")
            opt.step()
            sched.step()
            step += 1
            row = {"event": "step", "step": step, "lr": sched.get_last_lr()[0], "grad_norm": float(gn), **logged}
            if step % cfg.eval_every == 0 or step == total:
                row.update({f"quick_{k}": v for k, v in recon_metrics(adapter, z_table, table, quick_ids).items()})
            log.log(**row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", cos=f"{row['cos']:.3f}")
            if step % cfg.steps_per_epoch == 0 or step == total:
                epoch = math.ceil(step / cfg.steps_per_epoch)
                sel = recon_metrics(adapter, z_table, table, quick_ids)
                sel["token_recovery_ci95"] = _recovery_ci(sel["token_recovery"], quick_ids.numel())
                log.log(event="epoch", epoch=epoch, step=step, select_set=select_set,
                        select_tokens=int(quick_ids.numel()), **{f"select_{k}": v for k, v in sel.items()})
                key = (sel["token_recovery"], sel["cos"])
                if key > (best["token_recovery"], best["cos"]):
                    best = {"token_recovery": sel["token_recovery"], "cos": sel["cos"], "step": step,
                            "select_metrics": sel, "select_set": select_set}
                    if d.is_main:
                        atomic_torch_save(adapter.state_dict(), out_dir / "adapter_best_state.pt")
                if on_epoch:
                    on_epoch(epoch, sel)
            if step % cfg.ckpt_every == 0 or step == total:
                ckpt.save()
            ckpt.stop_if_signalled(stop, d, bar, log, "interrupted", step)
            if stop_after is not None and step >= stop_after:
                bar.close()
                return {"steps": step, "best": best, "stopped_early": True}
    bar.close()
    dist.barrier(d)  # rank 0 has written the best state before anyone reads it
    # finish on the best checkpoint, as the seed's "best model" intended
    best_path = out_dir / "adapter_best_state.pt"
    if best_path.exists():
        adapter.load_state_dict(safe_torch_load(best_path, "best adapter state"))
    adapter.eval()
    # whole-vocabulary metrics once, for the state the run goes on with
    best["vocab_metrics"] = vocab_recon_metrics(adapter, z_table, table, vocab_ids)
    return {"steps": step, "best": best}


# ----------------------------------------------------------------- Phase 2

def phase2_batch(lm, prompts, switches, pad_id: int):
    """Right-padded prompt+answer ids for teacher forcing, with masks:
    `recon` (prompt positions that go through compressor+adapter), `labels`
    (gold answer tokens, -100 elsewhere, aligned so logits[:, t] predicts
    labels[:, t]), `prompt_pos` and `answer_pos` (where the KL may be taken)."""
    tok = lm.tokenizer
    seqs, metas = [], []
    for p in prompts:
        ans = tok(" " + p.example.answers[0] + "\n", add_special_tokens=False)["input_ids"]
        seqs.append(list(p.ids) + ans)
        metas.append((p, len(p.ids), len(ans)))
    T = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    recon = torch.zeros((B, T), dtype=torch.bool)
    labels = torch.full((B, T), -100, dtype=torch.long)
    prompt_pos = torch.zeros((B, T), dtype=torch.bool)
    answer_pos = torch.zeros((B, T), dtype=torch.bool)
    for i, (s, (p, L, A)) in enumerate(zip(seqs, metas)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        recon[i, :L] = wire_mask(p, switches)
        labels[i, L - 1:L + A - 1] = torch.tensor(s[L:L + A])
        prompt_pos[i, :L - 1] = True
        answer_pos[i, L - 1:L + A - 1] = True
    return {"ids": ids, "attn": attn, "recon": recon, "labels": labels, "prompt_pos": prompt_pos,
            "answer_pos": answer_pos}


def phase2_loss(lm, adapter, encode: Callable, batch: dict, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """One Phase 2 loss step, each term returned separately.

    The prompt is given to the frozen LLM as reconstructed embeddings; answer
    tokens (teacher forcing) enter as original embeddings, as generated tokens
    do at inference. Gradients reach only the adapter: the LLM's parameters
    have requires_grad=False and are not in the optimizer.
    """
    dev = lm.device
    ids, attn = batch["ids"].to(dev), batch["attn"].to(dev)
    sel = batch["recon"].to(dev)
    with torch.no_grad():
        orig = lm.embed(ids).float()
        teacher = lm.model(inputs_embeds=orig.to(lm.dtype), attention_mask=attn).logits if cfg.w_kl else None
    x = orig[sel]
    y = adapter(encode(x.cpu()).to(dev)).to(dev)  # encode: compressor (+ quantizer, straight-through)
    emb = orig.masked_scatter(sel[..., None], y) if sel.any() else orig
    student = lm.model(inputs_embeds=emb.to(lm.dtype), attention_mask=attn).logits
    terms = {"ce": answer_cross_entropy(student, batch["labels"].to(dev))}
    if cfg.w_kl:
        where = {"prompt": batch["prompt_pos"], "answer": batch["answer_pos"],
                 "both": batch["prompt_pos"] | batch["answer_pos"]}[cfg.kl_positions].to(dev)
        terms["kl"] = logit_kl(student, teacher, where & attn.bool(), cfg.kl_temperature)
    else:
        terms["kl"] = student.sum() * 0.0
    rec = reconstruction_loss(y, x, w_cos=cfg.w_cos, w_mse=cfg.w_mse)
    terms["cos_loss"], terms["mse"], terms["cos"] = rec["cos_loss"], rec["mse"], rec["cos"]
    terms["loss"] = cfg.w_ce * terms["ce"] + cfg.w_kl * terms["kl"] + rec["loss"]
    return terms


def train_phase2(lm, adapter, encode: Callable, prompts, switches, cfg: TrainConfig, out_dir: str | Path, seed: int = 0,
                 progress: bool = True, resume: bool = False, stop_after: int | None = None) -> dict:
    """Generation-aware fine-tuning of the adapter through the frozen LLM.

    With N processes each rank takes its 1/N of every step's questions;
    DDP averages the ranks' gradients (each rank's CE/KL is a mean over its
    own answer tokens, the usual DDP approximation of the global token mean).
    Checkpoints (`ckpt_phase2.pt`: adapter, optimizer, scheduler, RNGs, step)
    every `phase2_ckpt_every` steps and on SIGINT/SIGTERM; `resume=True`
    continues exactly where the last one left off.
    """
    out_dir = Path(out_dir)
    d = dist.current()
    log = JsonlLogger(out_dir / "train_log.jsonl") if d.is_main else NullLogger()
    params = [p for p in adapter.parameters() if p.requires_grad]
    if not params or cfg.phase2_steps == 0:
        return {"phase2_steps": 0}
    if not prompts:
        raise LatentWireError("--phase2-steps: no training questions to train on")
    mine = dist.slice_for_rank(cfg.phase2_batch, d, "--phase2-batch")
    g = torch.Generator().manual_seed(seed + 2)
    opt = torch.optim.AdamW(params, lr=cfg.phase2_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    step, first, last = 0, None, None
    ckpt_path = out_dir / "ckpt_phase2.pt"
    ckpt = _Checkpoint(ckpt_path, adapter, opt, sched, g, cfg,
                       lambda: {"step": step, "first": first, "last": last}, d.is_main)
    if resume:
        if ckpt_path.exists():
            ck = ckpt.load()
            step, first, last = ck["step"], ck["first"], ck["last"]
        _drop_rows_after(log, step, phase2=True)  # without a checkpoint (step 0): all of Phase 2 is redone
        log.log(event="resume2", step=step)

    model = dist.wrap(adapter, d)
    adapter.train()
    bar = tqdm(total=cfg.phase2_steps, initial=step, desc="train phase 2", disable=not (progress and d.is_main),
               leave=False)
    with _StopFlag() as stop:
        while step < cfg.phase2_steps:
            pick = torch.randint(0, len(prompts), (cfg.phase2_batch,), generator=g).tolist()[mine]
            batch = phase2_batch(lm, [prompts[i] for i in pick], switches, lm.tokenizer.pad_token_id)
            terms = phase2_loss(lm, model, encode, batch, cfg)
            row = dist.mean_terms(terms, d)
            gn = checked_step(terms, row, params, opt, sched, cfg.grad_clip, "phase 2", step, ckpt_path)
            step += 1
            first = first or row
            last = row
            log.log(event="step2", step=step, lr=sched.get_last_lr()[0], grad_norm=float(gn), **row)
            bar.update(1)
            if step % cfg.phase2_ckpt_every == 0 or step == cfg.phase2_steps:
                ckpt.save()
            ckpt.stop_if_signalled(stop, d, bar, log, "interrupted2", step, " during phase 2")
            if stop_after is not None and step >= stop_after:
                bar.close()
                return {"phase2_steps": step, "stopped_early": True}
    bar.close()
    adapter.eval()
    if d.is_main:
        atomic_torch_save(adapter.state_dict(), out_dir / "adapter_phase2_state.pt")
    return {"phase2_steps": cfg.phase2_steps, "phase2_first": first, "phase2_last": last}
