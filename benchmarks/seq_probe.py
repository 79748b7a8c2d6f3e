"""Probe a trained sequence compressor: its own loss terms (CE on the gold
answer, KL to the teacher) measured without gradient on N of its training
questions and N dev questions, beside the references on the same questions
(the receiver reading the whole text, its first M tokens, nothing).

  python benchmarks/seq_probe.py runs/seq_grid/learned_r4_s0 --n 64

Why: a training log gives single noisy batches; this gives the trained
state. Train ~ dev ~ `none` means the latents carry nothing (neither a
generalization gap nor a train/evaluation mismatch); train << dev means it
memorised its paragraphs. The "another paragraph's payload" column feeds each
question the latents of a different paragraph (the next one, in order): equal
to the trained compressor's own loss means the decoder has learned something
useful for every question (say, the answer's form), but nothing of *this*
context. Works for a `--sender-model` run too (the sender is loaded beside the
receiver). Uses the run's config.json and seq_compressor.pt,
the same data split and the teacher cache of training (read when present).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from latentwire.encoder import seqcomp as sc
from latentwire.config import GROUPS, RunConfig
from latentwire.errors import LatentWireError
from latentwire.llm.models import load_model
from latentwire.evaluation.report import reference_text
from latentwire.llm.forward import head_cache
from latentwire.evaluation.run import build_inputs, load_data, seq_prompt_builder, seq_train_prompts
from latentwire.evaluation.sweep import apply_overrides


def run_config(folder: Path) -> RunConfig:
    """The run's saved config (every group's fields; an unknown or mistyped one is named)."""
    raw = json.loads((folder / "config.json").read_text())
    flat = {k: v for g in GROUPS for k, v in raw.get(g, {}).items()}
    return apply_overrides(RunConfig(), flat, where=f"{folder / 'config.json'}")


def other_paragraph(items: list[dict]) -> list[dict]:
    """Each item with the sender input ("h") of the next distinct paragraph (cyclically): the same questions,
    a payload about another context."""
    order = list(dict.fromkeys(tuple(it["ctx"]) for it in items))
    if len(order) < 2:
        raise SystemExit("latentwire: error: --n: the probe needs questions on at least two paragraphs")
    h = {tuple(it["ctx"]): it["h"] for it in items}
    nxt = {c: order[(k + 1) % len(order)] for k, c in enumerate(order)}
    return [it | {"h": h[nxt[tuple(it["ctx"])]]} for it in items]


@torch.no_grad()
def student(lm, comp, items, hc, n_head, cfg) -> dict:
    tot, A = {"ce": 0.0, "kl": 0.0}, 0
    for b in range(0, len(items), 8):
        chunk = items[b:b + 8]
        terms = sc.seq_loss(lm, comp, sc.collate(chunk), hc, n_head, cfg)
        a = sum(len(i["ans"]) for i in chunk)
        for k in tot:
            tot[k] += float(terms[k]) * a
        A += a
    return {k: v / A for k, v in tot.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished `--sequence learned` run folder")
    ap.add_argument("--n", type=int, default=64, help="questions of each split")
    args = ap.parse_args(argv)
    folder = Path(args.run)
    if not (folder / "seq_compressor.pt").is_file() or not (folder / "config.json").is_file():
        raise SystemExit(f"latentwire: error: {folder}: no seq_compressor.pt / config.json (not a learned run)")
    cfg = run_config(folder)
    lm = load_model(cfg.model.model, cfg.model.device, cfg.model.dtype)
    sender = load_model(cfg.model.sender_model, cfg.model.device, cfg.model.dtype) if cfg.model.cross() else None
    inp = build_inputs(cfg, lm, load_data(cfg))
    b2 = seq_prompt_builder(cfg, lm)
    train_prompts = seq_train_prompts(cfg, lm, inp.train)[:cfg.seq.seq_max_questions]  # as training read them
    head = inp.prompts[0].head_ids
    hc = head_cache(lm, head)
    layer = sc.resolve_layer(sender or lm, cfg.seq.seq_layer)  # the sender's layer (as training)
    items, reused = sc.cached_items(lm, train_prompts, layer, cfg.seq.seq_teacher_topk, hc, len(head),
                                    sc.cache_root() / "seq_teacher", False, sender)
    comp, _ = sc.load_compressor(lm, folder / "seq_compressor.pt", sender)
    comp.eval()
    n = min(args.n, len(items), len(inp.eval))
    train = [items[i] for i in sorted(random.Random(0).sample(range(len(items)), n))]
    dev = sc.build_items(lm, [b2.build(e) for e in inp.eval][:n], layer, cfg.seq.seq_teacher_topk, hc, len(head),
                         False, sender)
    print(f"{folder}: r = {comp.ratio}, {n} training questions (teacher {'read from the cache' if reused else 'computed'})"
          f" and the first {n} dev questions; CE / KL per answer token")
    print("| questions | trained compressor | another paragraph's payload | references |\n|---|---|---|---|")
    for name, its in (("training", train), ("dev", dev)):
        s = student(lm, comp, its, hc, len(head), cfg.seq)
        o = student(lm, comp, other_paragraph(its), hc, len(head), cfg.seq)
        refs = sc.reference_losses(lm, its, hc, len(head), comp.ratio, len(its))
        print(f"| {name} | {s['ce']:.3f} / {s['kl']:.3f} | {o['ce']:.3f} / {o['kl']:.3f} | "
              f"{reference_text(refs, 3)} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LatentWireError as e:
        sys.exit(f"latentwire: error: {e}")
