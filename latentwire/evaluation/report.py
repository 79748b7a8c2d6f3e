"""The run report: Markdown with plots (loss/cosine curves, norm-ratio
histogram, F1 by pipeline), written next to metrics.json."""
from __future__ import annotations

import json
from pathlib import Path

from ..pipelines.frame import FRAME_BYTES
from ..util.runio import atomic_write_text, read_jsonl
from ..wire.wire import LMArithmeticCodec


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_training(run_dir: Path) -> str | None:
    log = run_dir / "train_log.jsonl"
    if not log.exists():
        return None
    rows = [r for r in read_jsonl(log) if r.get("event") == "step"]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in rows]
    ax[0].plot(steps, [r["loss"] for r in rows], label="loss")
    ax[0].plot(steps, [r["mse"] for r in rows], label="mse", alpha=0.7)
    ax[0].plot(steps, [r["cos_loss"] for r in rows], label="1-cos", alpha=0.7)
    ax[0].set_yscale("log"); ax[0].set_xlabel("step"); ax[0].legend(); ax[0].set_title("Phase 1 loss terms")
    ax[1].plot(steps, [r["cos"] for r in rows], label="train cos")
    q = [r for r in rows if "quick_token_recovery" in r]
    if q:
        ax[1].plot([r["step"] for r in q], [r["quick_token_recovery"] for r in q], "o-", label="quick token recovery")
    ax[1].set_ylim(0, 1.02); ax[1].set_xlabel("step"); ax[1].legend(); ax[1].set_title("cosine / token recovery")
    fig.tight_layout()
    fig.savefig(run_dir / "training.png", dpi=110)
    plt.close(fig)
    return "training.png"


def plot_seq_training(run_dir: Path) -> str | None:
    """Loss terms of the learned sequence compressor against steps (seq_train_log.jsonl)."""
    log = run_dir / "seq_train_log.jsonl"
    rows = [r for r in read_jsonl(log, skip_bad=True) if r.get("event") == "step"] if log.exists() else []
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in rows]
    for key in ("loss", "kl", "ce"):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key, alpha=1.0 if key == "loss" else 0.7)
    if any(r.get("stage") == "recon" for r in rows):  # token reconstruction: no LLM, its own loss scale
        ax.axvline(max(r["step"] for r in rows if r.get("stage") == "recon"), color="k", lw=0.8, ls=":",
                   label="end of token reconstruction")
    ref = next((r for r in read_jsonl(log, skip_bad=True) if r.get("event") == "reference"), None)
    for (name, style) in (("none", ":"), ("truncate", "--")) if ref else ():
        if name in ref:  # the CE of the references on the same scale: where the curve has to go
            ax.axhline(ref[name]["ce"], color="grey", ls=style, lw=1, label=f"CE, {name}")
    ax.set_xlabel("step"); ax.set_ylabel("nats per answer token"); ax.legend()
    ax.set_title("learned sequence compressor: training loss")
    fig.tight_layout()
    fig.savefig(run_dir / "seq_training.png", dpi=110)
    plt.close(fig)
    return "seq_training.png"


def _compressor_line(metrics: dict) -> str:
    c = metrics.get("compressor")
    if c is None and "compressor" not in metrics:
        return "- Stage 1: not part of this evaluation"
    if c is None:
        return "- Stage 1: not run (--no-stage1)"
    if c.get("explained_variance") is not None:
        return (f"- compressor: {c['kind']} {metrics['d_model']} -> {c['dim']} (ratio {c['ratio']:.1f}x), "
                f"explained variance (of total) {100 * c['explained_variance']:.1f}%")
    return f"- compressor: {c['kind']} -> {c['dim']}"


def reference_text(refs: dict, digits: int = 3) -> str:
    """The learned compressor's reference losses as 'text CE / KL, truncate ..., none ...'."""
    return ", ".join(f"{k} {v['ce']:.{digits}f} / {v['kl']:.{digits}f}" for k, v in refs.items())


def _seq_line(metrics: dict) -> list[str]:
    s = metrics.get("seq_train")
    if not s:
        return []
    if s.get("loaded_from"):
        return [f"- learned sequence compressor: loaded from `{s['loaded_from']}`"]
    first, last = s.get("first") or {}, s.get("last") or {}
    cache = "reused" if s.get("cache_reused") else f"{s.get('cache_s', 0):.0f} s"
    refs = s.get("reference") or {}
    ref = ("" if not refs else "; the same terms (CE / KL) for the references on "
           f"{refs['text']['questions']} training questions: " + reference_text(refs))
    return [f"- learned sequence compressor: {s.get('steps')} steps on {s.get('questions')} training questions "
            f"(layer {s.get('layer')}, {s.get('params')} parameters), loss {first.get('loss', float('nan')):.3f} -> "
            f"{last.get('loss', float('nan')):.3f} (KL {last.get('kl', float('nan')):.3f}, CE "
            f"{last.get('ce', float('nan')):.3f}), training {s.get('train_s', 0):.0f} s, teacher cache "
            f"{cache}{ref}"]


def plot_norms(run_dir: Path, diags: dict) -> str | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    drew = False
    for name, d in diags.items():
        r = d.get("token_norm_ratios_sample") or []
        if r:
            ax.hist([min(x, 3.0) for x in r], bins=60, histtype="step", linewidth=1.5, label=name)
            drew = True
    if not drew:
        plt.close(fig)
        return None
    ax.axvline(0.8, color="k", ls="--", lw=0.8); ax.axvline(1.2, color="k", ls="--", lw=0.8)
    ax.set_xlabel("reconstructed / original norm, per token (clipped at 3)"); ax.legend()
    ax.set_title("norm ratio (OK between the dashed lines)")
    fig.tight_layout()
    fig.savefig(run_dir / "norm_ratio.png", dpi=110)
    plt.close(fig)
    return "norm_ratio.png"


def plot_f1(run_dir: Path, metrics: dict) -> str:
    plt = _plt()
    names = list(metrics["pipelines"].keys())
    f1 = [metrics["pipelines"][n]["f1"] for n in names]
    lo = [metrics["pipelines"][n]["f1"] - metrics["pipelines"][n]["f1_ci95"][0] for n in names]
    hi = [metrics["pipelines"][n]["f1_ci95"][1] - metrics["pipelines"][n]["f1"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, f1, yerr=[lo, hi], capsize=4, color=["#888", "#c66", "#36c", "#6a6"][:len(names)])
    ax.set_ylabel("SQuAD F1 (95% CI)"); ax.set_title("F1 by pipeline")
    fig.tight_layout()
    fig.savefig(run_dir / "f1_by_pipeline.png", dpi=110)
    plt.close(fig)
    return "f1_by_pipeline.png"


REFERENCE_LABELS = {"utf8": "UTF-8", "zstd": "zstd -19", "lzma": "lzma -9e", "token_ids": "token ids",
                    "lm_code_length": "LLM code length (bound)", "lm_arithmetic": "LLM arithmetic coding"}


def _wire_cell(w: dict | None) -> str:
    if not w or not w.get("contexts"):
        return "-"
    return f"{w['bytes_mean']:,.0f}"


def plot_f1_vs_bytes(path: Path, points: list[dict], refs: dict, title: str = "") -> str:
    """F1 (with 95% CI) and agreement against wire bytes per context (log x),
    every pipeline a point, the text references as vertical lines. `points`:
    {label, bytes, f1, f1_ci95, agreement (or None)}."""
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r_name, r in refs.items():
        if r.get("contexts"):
            for a in ax:
                a.axvline(r["bytes_mean"], color="#999", ls=":", lw=1)
            ax[0].text(r["bytes_mean"], 1.0, " " + REFERENCE_LABELS.get(r_name, r_name), rotation=90, va="top",
                       fontsize=7, color="#555", transform=ax[0].get_xaxis_transform())
    for p in [p for p in points if not p["bytes"]]:  # nothing sent: a floor, drawn as a line (log x has no 0)
        ax[0].axhline(p["f1"], color="#c33", ls="--", lw=1, label=f"{p['label']} (0 bytes)")
        if p.get("agreement") is not None:
            ax[1].axhline(100 * p["agreement"], color="#c33", ls="--", lw=1, label=f"{p['label']} (0 bytes)")
    for p in [p for p in points if p["bytes"]]:
        lo, hi = p.get("f1_ci95") or (p["f1"], p["f1"])
        ax[0].errorbar([p["bytes"]], [p["f1"]], yerr=[[p["f1"] - lo], [hi - p["f1"]]], fmt="o", capsize=3,
                       label=p["label"])
        if p.get("agreement") is not None:
            ax[1].plot([p["bytes"]], [100 * p["agreement"]], "o", label=p["label"])
    for a in ax:
        a.set_xscale("log")
        a.set_xlabel("wire bytes per context (mean)")
    ax[0].set_ylabel("SQuAD F1 (95% CI)")
    ax[1].set_ylabel("agreement with the text pipeline, %")
    ax[1].set_ylim(-2, 102)
    ax[0].set_title("F1 against bytes on the wire")
    ax[1].set_title("agreement against bytes on the wire")
    if title:  # above both panels (a long model path would run over them)
        fig.suptitle(title, fontsize=9)
    if len(points) <= 14:
        ax[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def references_table(refs: dict) -> str:
    lines = ["| text reference (lossless) | bytes/context (mean) | median | bits/token | contexts |",
             "|---|---|---|---|---|"]
    for name, r in refs.items():
        if not r.get("contexts"):
            continue
        extra = ""
        if name == "lm_arithmetic":
            extra = f" (decoded exactly: {r['decoded_exactly']}/{r['contexts']}; bound on these: " \
                    f"{r['bound_same_contexts_mean']:,.1f})"
        lines.append(f"| {REFERENCE_LABELS.get(name, name)}{extra} | {r['bytes_mean']:,.1f} | {r['bytes_median']:,.1f} "
                     f"| {r['bits_per_token']:.2f} | {r['contexts']} |")
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _sec(x) -> str:
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.0f}")


def by_bytes(metrics: dict) -> list[tuple[str, dict]]:
    """Pipelines in the order of their bytes per context (text where its bytes put it)."""
    def b(item):
        w = item[1].get("wire") or {}
        return w.get("bytes_mean", float("inf")) if w.get("contexts") else float("inf")
    return sorted(metrics["pipelines"].items(), key=b)


def metrics_table(metrics: dict) -> str:
    """The first table: one row per pipeline, sorted by bytes per context -- F1, retention and agreement read
    beside what they cost on the wire, the positions the receiver prefills, and the seconds at each end."""
    lines = ["| pipeline | bytes/context | positions/context | F1 | 95% CI | EM | F1 retention | retention 95% CI | "
             "agreement | send s/context | receive s/context | s/question |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in by_bytes(metrics):
        w = m.get("wire") or {}
        pos = f"{w['positions_mean']:.1f}" if w.get("positions_mean") is not None else "-"
        ci = m.get("f1_retention_ci95")
        rci = "-" if not ci else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}"
        ret = "-" if name == "text" else _pct(m.get("f1_retention"))
        ag = "-" if name == "text" else _pct(m.get("agreement"))
        lines.append(f"| {name} | {_wire_cell(w)} | {pos} | {m['f1']:.2f} | {m['f1_ci95'][0]:.1f}-{m['f1_ci95'][1]:.1f} "
                     f"| {m['exact_match']:.2f} | {ret} | {'-' if name == 'text' else rci} | {ag} | "
                     f"{_sec(w.get('send_s_per_context'))} | {_sec(w.get('receive_s_per_context'))} | "
                     f"{_sec(m.get('s_per_question'))} |")
    return "\n".join(lines)


def stage1_table(metrics: dict) -> str:
    """Per-token diagnostics of the Stage 1 pipelines (empty when none ran)."""
    rows = [(n, m) for n, m in metrics["pipelines"].items() if m.get("cos") is not None]
    if not rows:
        return ""
    lines = ["| Stage 1 pipeline | token recovery (vocab) | token recovery (prompts) | cos | norm ratio |",
             "|---|---|---|---|---|"]
    for name, m in rows:
        tr = f"{100 * m['token_recovery_vocab']:.2f}%" if m.get("token_recovery_vocab") is not None else "-"
        lines.append(f"| {name} | {tr} | {_pct(m.get('token_recovery_prompts'))} | {m['cos']:.3f} | "
                     f"{m['norm_ratio']:.2f} ({m['norm_status']}) |")
    return "\n".join(lines)


def _delta(c: dict | None) -> str:
    if not c:
        return "-"
    d, lo, hi = c["d_f1"]
    return f"{d:+.2f} [{lo:+.1f}, {hi:+.1f}]"


def controls_table(metrics: dict) -> str:
    """Every learned pipeline against its controls on the same questions (paired ΔF1, 95% CI), and what its
    reading holds without questions (reconstruction accuracy, continuation CE) beside theirs."""
    ctl = metrics.get("controls") or {}
    if not ctl:
        return ""
    P = metrics["pipelines"]

    def probe(name, key, pct=False):
        r = (P.get(name) or {}).get("reading_probe") or {}
        v = r.get(key)
        return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.2f}")
    lines = ["| learned pipeline | F1 | − another paragraph's payload | − none | − truncation (equal positions) | "
             "− first-M control | reconstruction acc: own / other / truncation / none / text | continuation CE: "
             "own / other / truncation / none / text |", "|---|---|---|---|---|---|---|---|"]
    for name, c in ctl.items():
        if name not in P:
            continue
        cs = P[name].get("controls") or {}
        order = [name, c.get("other"), c.get("truncate"), c.get("none"), "text"]
        rec = " / ".join(probe(n, "recon_acc", True) for n in order)
        cont = " / ".join(probe(n, "cont_ce") for n in order)
        lines.append(f"| {name} | {P[name]['f1']:.2f} | {_delta(cs.get('other'))} | {_delta(cs.get('none'))} | "
                     f"{_delta(cs.get('truncate'))} | {_delta(cs.get('first_m'))} | {rec} | {cont} |")
    n = next((r.get("contexts") for r in ((P.get(x) or {}).get("reading_probe") for x in ctl) if r), None)
    lines.append("")
    lines.append("ΔF1: the learned pipeline minus the control, paired over the same questions (points, 95% "
                 "bootstrap interval). The wire carries *this* paragraph only if the other paragraph's payload does "
                 f"clearly worse. Reading probes on {n} evaluation paragraphs, no question: reconstruction = "
                 "teacher-forced token accuracy of the receiver writing the paragraph back after \"Repeat the "
                 "context:\"; continuation = CE per token (nats) of the article's next paragraph read right after it.")
    return "\n".join(lines)


def answer_split_table(metrics: dict) -> str:
    """Every row's F1 where the gold answer lies within the first M tokens (what truncation keeps) and beyond
    them, each with ΔF1 against truncation paired over those questions, one table per ratio."""
    out = []
    for key, e in (metrics.get("answer_split") or {}).items():
        r = key[1:]
        out += [f"At r = {r} (M = ceil(L / {r})): the gold answer lies within the first M context tokens for "
                f"{e['within']} questions, beyond them for {e['beyond']}.", "",
                f"| pipeline | F1, answer within (n={e['within']}) | ΔF1 vs {e['truncate']} | "
                f"F1, answer beyond (n={e['beyond']}) | ΔF1 vs {e['truncate']} |", "|---|---|---|---|---|"]
        for name, cell in e["pipelines"].items():
            cs = []
            for part in ("within", "beyond"):
                c = cell.get(part)
                cs += ["-", "-"] if c is None else [f"{c['f1']:.2f}", "-" if c["d_truncate"] is None else
                                                    _delta({"d_f1": c["d_truncate"]})]
            out.append(f"| {name} | " + " | ".join(cs) + " |")
        paired = [(n, c) for n, c in e["pipelines"].items() if any("d_first_m" in (c.get(p) or {})
                                                                   for p in ("within", "beyond"))]
        if paired:  # the wire against its first-M control: what content past truncation's tokens adds
            out += ["", f"| learned pipeline | ΔF1 vs its first-M control, answer within (n={e['within']}) | "
                        f"answer beyond (n={e['beyond']}) |", "|---|---|---|"]
            for name, c in paired:
                out.append(f"| {name} | " + " | ".join(
                    _delta({"d_f1": c[p]["d_first_m"]}) if "d_first_m" in (c.get(p) or {}) else "-"
                    for p in ("within", "beyond")) + " |")
        out.append("")
    return "\n".join(out).rstrip()


def _sender_text(metrics: dict) -> str:
    s = metrics.get("sender_model")
    return "" if not s else (f"; the receiver. Sender: `{s['model']}` (d_model={s['d_model']}, vocab={s['vocab_size']}): "
                             "token pipelines are chosen on its tokens and read through text, sender_ids = its ids "
                             "read as the receiver's")


def write_report(run_dir: str | Path, metrics: dict, diags: dict, config: dict) -> Path:
    run_dir = Path(run_dir)
    points = [{"label": n, "bytes": m["wire"]["bytes_mean"], "f1": m["f1"], "f1_ci95": m["f1_ci95"],
               "agreement": m.get("agreement", 1.0 if n == "text" else None)}
              for n, m in metrics["pipelines"].items() if (m.get("wire") or {}).get("contexts")]
    refs = metrics.get("wire_references") or {}
    figs = [plot_training(run_dir), plot_seq_training(run_dir), plot_norms(run_dir, diags), plot_f1(run_dir, metrics),
            plot_f1_vs_bytes(run_dir / "f1_vs_bytes.png", points, refs) if points else None]
    md = ["# LatentWire run report\n",
          f"- model: `{metrics['model']}` (d_model={metrics['d_model']}, vocab={metrics['vocab_size']})"
          + _sender_text(metrics),
          f"- data: train `{metrics['data']['train']}`, eval `{metrics['data']['eval']}` "
          f"({metrics['n_eval']} questions, {metrics['data']['eval_articles']} articles, none used for fitting/training)",
          _compressor_line(metrics), *_seq_line(metrics),
          f"- Stage 1 adapter: {metrics.get('adapter')}, template: {config['data']['template']}, "
          f"seed: {config['data']['seed']}",
          *([f"- pipelines given (latentwire.evaluate): {', '.join(p['name'] for p in metrics['pipelines_given'])}"]
            if metrics.get("pipelines_given") else []),
          f"- wall time: {metrics['wall_s']:.0f} s\n",
          "## Metrics (sorted by bytes on the wire)\n", metrics_table(metrics), "",
          *(["## Learned pipelines against their controls\n", controls_table(metrics), ""]
            if metrics.get("controls") else []),
          *(["## Where the answer lies\n", answer_split_table(metrics), ""] if metrics.get("answer_split") else []),
          *(["## Stage 1 diagnostics\n", stage1_table(metrics), ""] if stage1_table(metrics) else []),
          f"Wire: what crosses it is the {metrics.get('wire_scope', 'context')} (see README, 'The wire'); bytes are "
          "the lengths of the payloads actually sent, one per distinct context (questions about one paragraph "
          f"share it). LLM-coded payloads (`+ac`, `ac`) include their {LMArithmeticCodec.CHECK_BYTES}-byte integrity "
          f"check; a payload file (`latentwire send`) adds a {FRAME_BYTES}-byte frame, not counted here.\n",
          references_table(refs), ""]
    for f in figs:
        if f:
            md.append(f"![{f}]({f})\n")
    if diags:
        md.append("## Diagnostics\n")
    for name, d in diags.items():
        md.append(f"### {name}\n")
        md.append(f"- cosine {d['cos']:.3f}, MSE {d['mse']:.4f}, relative error {d['rel_error']:.3f}")
        md.append(f"- norms: original {d['orig_norm']:.3f}, reconstructed {d['recon_norm']:.3f}, "
                  f"ratio {d['norm_ratio']:.3f} -> **{d['norm_status']}** (per token: {d['token_norm_status_counts']})")
        vr = d.get("token_recovery_vocab")
        md.append(f"- token recovery: prompts {100 * d['token_recovery_prompts']:.2f}%"
                  + (f", whole vocabulary {100 * vr:.2f}%" if vr is not None else ""))
        md.append(f"- agreement with text pipeline {100 * d['agreement']:.1f}%, output diversity {d['diversity']:.2f} "
                  f"(text {d['text_diversity']:.2f}), collapsed: **{d['collapsed']}**"
                  + (f" (top output {d['top_output']!r} for {100 * d['top_output_share']:.0f}%)" if d['collapsed'] else ""))
        md.append("\n| gold | text pipeline | reconstructed |\n|---|---|---|")
        for ex in d["examples"]:
            cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            md.append(f"| {cell(ex['gold'][0])} | {cell(ex['text_output'])} | {cell(ex['reconstructed_output'])} |")
        if d["examples"]:
            ex = d["examples"][0]
            rec = [t for t, m in zip(ex["original_tokens"], ex["reconstructed_mask"]) if m][-40:]
            near = [t for t, m in zip(ex["nearest_tokens"], ex["reconstructed_mask"]) if m][-40:]
            md.append("\nLast 40 reconstructed positions of the first example (original -> nearest vocabulary token):\n")
            md.append("```\noriginal:      " + json.dumps("".join(rec)) + "\nreconstructed: " + json.dumps("".join(near)) + "\n```")
        md.append("")
    if "verdict" in metrics:
        md.append("## Verdict\n")
        md.extend(f"- {v}" for v in metrics["verdict"])
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path
