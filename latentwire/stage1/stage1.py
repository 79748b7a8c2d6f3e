"""Stage 1's fitting and training, as a stage of `latentwire run`: the
compressor (PCA, streamed over the training tokens) and the quantizer are
fitted on training text only; the adapter is trained (Phase 1: reconstruction
over corpus and vocabulary tokens; Phase 2, when asked: through the frozen
LLM). The pipeline they make is latentwire/pipelines/stage1.py."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..util import dist
from .adapters import LinearAdapter, build_adapter, load_adapter_state, save_adapter
from ..wire.compress import check_meta, load_compressor, make_compressor, read_artifact
from ..config import RunConfig
from ..data import Example, PromptBuilder
from ..evaluation.generate import EvalSwitches
from ..util.runio import atomic_torch_save, write_json
from .train import train_phase1, train_phase2, vocab_recon_metrics, vocab_sample
from ..wire.wire import make_quantizer
from ..pipelines.stage1 import stage1_pipeline
from .diagnose import diagnose, findings, summary_lines


def training_pool(builder: PromptBuilder, train: Sequence[Example]) -> torch.Tensor:
    """Token ids of the training text: each distinct context once, every
    question, plus the template's fixed parts -- what the compressor is fitted
    on and what Phase 1 samples corpus tokens from."""
    ids: list[int] = list(builder.prefix_ids) + list(builder.cue_ids)
    seen: set[str] = set()
    for e in train:
        if e.context not in seen:
            seen.add(e.context)
            ids += builder._ids(e.context)
        ids += builder._ids(e.question)
    return torch.tensor(ids, dtype=torch.long)


def fit_compressor(cfg: RunConfig, lm, pool: torch.Tensor, fp: dict):
    """Stage "compress": load --compressor-path (checked against `fp`), or fit
    PCA on the training tokens (streamed) or the vocabulary, or build the
    random/identity map. Fitting stays on the CPU."""
    k = cfg.compress.resolve_dim(lm.d_model)
    if cfg.compress.compressor_path:
        return load_compressor(cfg.compress.compressor_path, fp | {"kind": cfg.compress.compressor})
    if cfg.compress.compressor == "pca":
        src = pool if cfg.compress.fit_source == "corpus" else torch.arange(lm.vocab_size)
        return make_compressor("pca", k, cfg.data.seed).fit_token_ids(lambda t: lm.embed(t.to(lm.device)), src)
    return make_compressor(cfg.compress.compressor, k, cfg.data.seed).fit(d_model=lm.d_model)


def fit_quantizer(cfg: RunConfig, lm, comp, pool: torch.Tensor):
    """Stage "quantize": --bits per code dimension; scalar levels are fitted
    on the codes of (up to 200k) training tokens, never on evaluation text."""
    q = make_quantizer(cfg.compress.bits, cfg.compress.quantizer)
    if cfg.compress.bits in (16, 32):
        return q
    g = torch.Generator().manual_seed(cfg.data.seed)
    ids = pool[torch.randperm(pool.numel(), generator=g)[:200_000]]
    with torch.no_grad():
        z = torch.cat([comp.transform(lm.embed(ids[i:i + 16384].to(lm.device)).float().cpu())
                       for i in range(0, ids.numel(), 16384)])
    return q.fit(z, seed=cfg.data.seed)


def check_saved_artifacts(cfg: RunConfig, fp: dict) -> None:
    """--compressor-path / --adapter-path must match this model and width (checked before any work starts)."""
    if cfg.compress.compressor_path:
        meta = read_artifact("--compressor-path", cfg.compress.compressor_path)["meta"]
        check_meta("--compressor-path", cfg.compress.compressor_path, meta, fp | {"kind": cfg.compress.compressor})
    if cfg.adapter.adapter_path:
        meta = read_artifact("--adapter-path", cfg.adapter.adapter_path)["meta"]
        check_meta("--adapter-path", cfg.adapter.adapter_path, meta, fp | {"adapter": cfg.adapter.adapter})


def fit_stage1(cfg: RunConfig, lm, inp, fp: dict, k: int, out: Path, events, resume: bool, log,
               sw: EvalSwitches) -> tuple:
    """Stage 1: fit the compressor and the quantizer on training text, train
    the adapter (Phase 1, then Phase 2 when asked), save both. Returns the
    fields of `Stage1`."""
    d = dist.current()
    # the adapter trains where the LLM runs when that is a GPU (Phase 2 and
    # DDP over NCCL need it there); the compressor's fit stays on the CPU
    work = lm.device if lm.device.type == "cuda" else torch.device("cpu")
    table = lm.embedding_table().float().to(work)
    pool, train = inp.pool, inp.train
    # --- compress: fit on training text only (streamed in chunks) -----------
    tc = time.time()
    comp = fit_compressor(cfg, lm, pool, fp)
    if d.is_main:
        comp.save(out / "compressor.pt", meta=fp | {"kind": comp.kind})
    evr = float(comp.explained_variance_ratio_.sum()) if hasattr(comp, "explained_variance_ratio_") else None
    events.log(event="compressor", kind=comp.kind, dim=k, fit_tokens=int(pool.numel()), wall_s=time.time() - tc,
               explained_variance_of_total=evr)
    log(f"compressor: {comp.kind} {lm.d_model} -> {k}" + (f", explained variance {100 * evr:.1f}% of total" if evr else ""))

    quant = fit_quantizer(cfg, lm, comp, pool)
    if d.is_main and cfg.compress.bits not in (16, 32):  # its levels: what a receiver loading this run needs
        atomic_torch_save(quant.state(), out / "quantizer.pt")
    # the adapter learns from what the receiver will get: quantized codes
    z_table = quant.roundtrip(comp.transform(table)).detach() if cfg.compress.bits != 32 else comp.transform(table)

    # --- adapter: Phase 1 ---------------------------------------------------
    adapter = build_adapter(cfg.adapter, comp, table).to(work)
    vocab_ids = vocab_sample(lm.vocab_size, cfg.eval.vocab_metrics, cfg.data.seed)
    if cfg.adapter.adapter_path:
        load_adapter_state(adapter, cfg.adapter.adapter_path, fp | {"adapter": cfg.adapter.adapter})
        adapter.eval()
        summary = {"steps": 0, "loaded_from": cfg.adapter.adapter_path}
    else:
        summary = train_phase1(adapter, z_table, table, pool, cfg.train, out, seed=cfg.data.seed,
                               quick_ids=inp.select, progress=cfg.progress, resume=resume, vocab_ids=vocab_ids)
    if cfg.train.phase2_steps and not cfg.adapter.adapter_path:
        b2 = PromptBuilder(lm.tokenizer, cfg.data.template, cfg.train.phase2_max_tokens, cfg.data.bos != "none",
                           flag="--phase2-max-tokens")
        train_prompts = [b2.build(e) for e in train]
        summary |= train_phase2(lm, adapter, lambda x: quant.roundtrip(comp.transform(x)), train_prompts, sw,
                                cfg.train, out, seed=cfg.data.seed,
                                progress=cfg.progress, resume=resume)
    if d.is_main:
        save_adapter(adapter, out / "adapter.pt", fp | {"adapter": cfg.adapter.adapter})
    events.log(event="trained", **summary)
    return comp, quant, adapter, z_table, vocab_ids, summary, evr, table, work


@dataclass
class Stage1:
    """What Stage 1 fitted and trained, and what the run does with it."""
    comp: object
    quant: object
    adapter: torch.nn.Module
    z_table: torch.Tensor
    vocab_ids: torch.Tensor
    summary: dict
    evr: float | None
    table: torch.Tensor
    work: torch.device
    names: tuple = ("linear_inverse", "latentwire")

    def pipelines(self, cfg: RunConfig, lm) -> dict:
        """`latentwire` (compressor + quantizer + adapter) and, with --controls, `linear_inverse` (the PCA
        inverse as the receiver: the seed's failure in one line)."""
        info = {"kind": "stage1", "compressor": self.comp.kind}
        linear = stage1_pipeline("linear_inverse", lm, self.comp, self.quant, self.comp.inverse_transform,
                                 self.work, info)
        if cfg.adapter.adapter == "linear":
            return {"latentwire": linear}
        recon = stage1_pipeline("latentwire", lm, self.comp, self.quant, self.adapter, self.work,
                                info | {"adapter": cfg.adapter.adapter})
        return {"linear_inverse": linear, "latentwire": recon} if cfg.controls else {"latentwire": recon}

    def describe(self, cfg: RunConfig, lm, k: int) -> dict:
        return {"kind": self.comp.kind, "dim": k, "ratio": lm.d_model / k, "explained_variance": self.evr,
                "bits": cfg.compress.bits, "quantizer": self.quant.scheme}

    def diagnose(self, cfg: RunConfig, lm, prompts, name: str, pipe, sw, text_preds, preds, entry: dict, out: Path,
                 log, metrics: dict) -> dict:
        """Per-token diagnostics of a Stage 1 pipeline (cosine, norms, token recovery, collapse): written to
        diagnostics_NAME.json, added to its metrics entry and the run's verdict."""
        mod = self.adapter if name == "latentwire" else None
        # the adapter ends on its best state, whose whole-vocabulary metrics
        # training measured once; Phase 2 changes it
        known = (self.summary.get("best") or {}).get("vocab_metrics") if not self.summary.get("phase2_steps") \
            else None
        vocab_m = known if (mod is not None and known) else \
            vocab_recon_metrics(mod if mod is not None else LinearAdapter(self.comp), self.z_table, self.table,
                                self.vocab_ids)
        diag = diagnose(lm, prompts, pipe.transform, sw, text_preds, preds, self.table, cfg.eval.diagnostics_k,
                        vocab_recovery=vocab_m["token_recovery"])
        write_json(out / f"diagnostics_{name}.json", diag)
        entry |= {"token_recovery_vocab": vocab_m["token_recovery"],
                  "token_recovery_vocab_ids": vocab_m["ids_measured"],
                  "token_recovery_vocab_ci95": vocab_m["token_recovery_ci95"],
                  "token_recovery_prompts": diag["token_recovery_prompts"], "cos": diag["cos"],
                  "norm_ratio": diag["norm_ratio"], "norm_status": diag["norm_status"],
                  "collapsed": diag["collapsed"]}
        metrics.setdefault("verdict", []).extend(findings(name, entry, diag))
        for line in summary_lines(name, diag):
            log(line)
        return diag
