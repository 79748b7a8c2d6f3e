"""Diagnostics for one reconstructed pipeline -- every measurement the seed's
DIAGNOSIS.md asked for, computed side by side with the text pipeline:

* first K examples: gold, text-baseline output, reconstructed output, and the
  prompt token by token: original tokens vs the nearest vocabulary token of
  each reconstructed vector (cosine over the embedding table);
* token recovery over the evaluated prompts (and, from training, over the
  whole vocabulary);
* norms: original vs reconstructed, ratio with status TOO LOW (< 0.8) / OK /
  TOO HIGH (> 1.2); per-example cosine, MSE and relative error;
* output diversity (distinct outputs / n), a collapse flag, and agreement
  (share of questions where the reconstructed pipeline says exactly what the
  text pipeline says).
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data import Prompt
from ..evaluation.generate import EmbedTransform, EvalSwitches, wire_mask

NORM_LOW, NORM_HIGH = 0.8, 1.2


def norm_status(ratio: float) -> str:
    return "TOO LOW" if ratio < NORM_LOW else ("TOO HIGH" if ratio > NORM_HIGH else "OK")


@torch.no_grad()
def per_example_embedding_stats(lm, prompts: Sequence[Prompt], transform: EmbedTransform, switches: EvalSwitches,
                                table_normed: torch.Tensor, chunk: int = 2048) -> list[dict]:
    """Per-example reconstruction statistics.

    Pipelines are row-wise (a token's reconstruction depends only on its
    embedding, i.e. its id), so every distinct id is reconstructed and
    nearest-neighbour decoded once, then looked up per position -- the same
    numbers as doing it position by position, ~15x cheaper on SQuAD prompts.
    """
    uniq = sorted({i for p in prompts for i in p.ids})
    pos_of = {t: j for j, t in enumerate(uniq)}
    u = torch.tensor(uniq, dtype=torch.long)
    xu = lm.embed(u.to(lm.device)).float().cpu()
    yu = torch.cat([transform(xu[i:i + chunk].to(lm.device)).float().cpu() for i in range(0, len(uniq), chunk)])
    near_u = torch.cat([(F.normalize(yu[i:i + chunk], dim=-1) @ table_normed.T).argmax(-1)
                        for i in range(0, len(uniq), chunk)])
    cos_u = F.cosine_similarity(xu, yu, dim=-1)
    xn, yn = xu.norm(dim=-1), yu.norm(dim=-1)
    ratio_u = yn / xn.clamp_min(1e-8)
    rel_u = (yu - xu).norm(dim=-1) / xn.clamp_min(1e-8)
    mse_u = (yu - xu).pow(2).mean(-1)
    rows = []
    for p in prompts:
        ids = torch.tensor(p.ids, dtype=torch.long)
        j = torch.tensor([pos_of[t] for t in p.ids], dtype=torch.long)
        sel = wire_mask(p, switches)
        js = j[sel]
        nearest = torch.where(sel, near_u[j], ids)  # kept positions are the original tokens
        ratio = ratio_u[js]
        mean_ratio = float(ratio.mean()) if len(js) else 1.0
        rows.append({
            "id": p.example.id,
            "cos": float(cos_u[js].mean()) if len(js) else 1.0,
            "mse": float(mse_u[js].mean()) if len(js) else 0.0,
            "rel_error": float(rel_u[js].mean()) if len(js) else 0.0,
            "orig_norm": float(xn[js].mean()) if len(js) else 0.0,
            "recon_norm": float(yn[js].mean()) if len(js) else 0.0,
            "norm_ratio": mean_ratio,
            "norm_status": norm_status(mean_ratio),
            "token_ratios": ratio.tolist(),
            "n_reconstructed": int(sel.sum()),
            "n_recovered": int((nearest[sel] == ids[sel]).sum()),
            "nearest_ids": nearest.tolist(),
            "reconstructed_mask": sel.tolist(),
        })
    return rows


def _tokens(tok, ids: Sequence[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def diagnose(lm, prompts: Sequence[Prompt], transform: EmbedTransform, switches: EvalSwitches,
             text_preds: Sequence[str], recon_preds: Sequence[str], table: torch.Tensor, k: int = 10,
             vocab_recovery: float | None = None) -> dict:
    """All diagnostics of one pipeline as a JSON-able dict."""
    tn = F.normalize(table.float().cpu(), dim=-1)
    stats = per_example_embedding_stats(lm, prompts, transform, switches, tn)
    n = len(prompts)
    n_tok = sum(s["n_reconstructed"] for s in stats)
    recovered = sum(s["n_recovered"] for s in stats)
    counts = Counter(recon_preds)
    top_share = counts.most_common(1)[0][1] / n if n else 0.0
    diversity = len(counts) / n if n else 0.0
    text_div = len(set(text_preds)) / n if n else 0.0
    agree = [a == b for a, b in zip(text_preds, recon_preds)]
    all_ratios = [r for s in stats for r in s["token_ratios"]]
    status = Counter(norm_status(r) for r in all_ratios)
    tok = lm.tokenizer
    examples = []
    for p, s, tp, rp in list(zip(prompts, stats, text_preds, recon_preds))[:k]:
        examples.append({"id": p.example.id, "question": p.example.question, "gold": p.example.answers,
                         "text_output": tp, "reconstructed_output": rp,
                         "original_tokens": _tokens(tok, p.ids), "nearest_tokens": _tokens(tok, s["nearest_ids"]),
                         "reconstructed_mask": s["reconstructed_mask"], "cos": s["cos"],
                         "norm_ratio": s["norm_ratio"], "norm_status": s["norm_status"]})
    mean = lambda key: sum(s[key] for s in stats) / n if n else 0.0  # noqa: E731
    return {
        "n": n,
        "token_recovery_prompts": recovered / n_tok if n_tok else 1.0,
        "token_recovery_vocab": vocab_recovery,
        "cos": mean("cos"), "mse": mean("mse"), "rel_error": mean("rel_error"),
        "orig_norm": mean("orig_norm"), "recon_norm": mean("recon_norm"), "norm_ratio": mean("norm_ratio"),
        "norm_status": norm_status(mean("norm_ratio")) if n else "OK",
        "token_norm_status_counts": dict(status),
        "token_norm_ratios_sample": all_ratios[:20000],
        "diversity": diversity, "text_diversity": text_div,
        "top_output": counts.most_common(1)[0][0] if n else "", "top_output_share": top_share,
        # collapse: the pipeline says one thing to everyone (or far less varied than the text pipeline)
        "collapsed": bool(n >= 5 and (top_share > 0.5 or diversity < 0.5 * text_div)),
        "agreement": sum(agree) / n if n else 0.0,
        "per_example": [{k2: s[k2] for k2 in ("id", "cos", "mse", "rel_error", "norm_ratio", "norm_status")}
                        | {"agree": a} for s, a in zip(stats, agree)],
        "examples": examples,
    }


def summary_lines(name: str, d: dict) -> list[str]:
    """A few console lines that say what is wrong, if anything."""
    vr = d.get("token_recovery_vocab")
    lines = [f"[{name}] cos={d['cos']:.3f} mse={d['mse']:.4f} rel_err={d['rel_error']:.3f} "
             f"norm_ratio={d['norm_ratio']:.3f} ({d['norm_status']}) token_recovery(prompts)="
             f"{100 * d['token_recovery_prompts']:.2f}%" + (f" (vocab)={100 * vr:.2f}%" if vr is not None else ""),
             f"[{name}] agreement={100 * d['agreement']:.1f}% diversity={d['diversity']:.2f} "
             f"(text {d['text_diversity']:.2f}) collapsed={d['collapsed']}"
             + (f" top output {d['top_output']!r} x{100 * d['top_output_share']:.0f}%" if d["collapsed"] else "")]
    for ex in d["examples"][:3]:
        lines.append(f"  gold={ex['gold'][0]!r} text={ex['text_output']!r} recon={ex['reconstructed_output']!r}")
    return lines


def findings(name: str, m: dict, d: dict) -> list[str]:
    """Plain-language reading of one pipeline's numbers, cause first."""
    out = []
    ret, ag = m.get("f1_retention"), m.get("agreement", 0.0)
    vr = m.get("token_recovery_vocab")
    if d["norm_status"] != "OK":
        out.append(f"{name}: magnitude mismatch -- reconstructed/original norm ratio {d['norm_ratio']:.2f} "
                   f"({d['norm_status']}); the LLM reads vectors of the wrong scale (try --calibration rms)")
    if vr is not None and vr < 0.99:
        out.append(f"{name}: reconstructions leave the vocabulary -- only {100 * vr:.1f}% of all token ids come back "
                   f"as their own nearest embedding row")
    if d["cos"] > 0.8 and ret is not None and ret < 0.5:
        out.append(f"{name}: cosine {d['cos']:.3f} looks high, yet F1 retention is {100 * ret:.0f}% -- direction "
                   f"alone is not what the LLM needs")
    if d["collapsed"]:
        out.append(f"{name}: outputs collapsed -- {d['top_output']!r} for {100 * d['top_output_share']:.0f}% of "
                   f"questions (diversity {d['diversity']:.2f} vs text {d['text_diversity']:.2f})")
    if ret is not None and ret >= 0.95 and ag >= 0.9:
        out.append(f"{name}: faithful to the text pipeline -- F1 retention {100 * ret:.1f}%, agreement {100 * ag:.1f}%")
    elif not out:
        out.append(f"{name}: F1 retention {100 * (ret or 0):.1f}%, agreement {100 * ag:.1f}%; no single diagnostic "
                   f"stands out")
    return out
