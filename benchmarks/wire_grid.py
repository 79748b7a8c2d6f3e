"""Stage 1 on the wire: F1, retention, agreement and token recovery against
the bytes each context costs, for the vocab adapter and the MLP over code
dimensions x bits per dimension, beside the lossless text references
(UTF-8, zstd, lzma, token ids, the LLM's own code length and its arithmetic
coding) measured on the same contexts.

Each cell is one `latentwire run` (its own folder, report and metrics.json)
with `--compress-dim K --bits B`; a finished cell is reused only when its
resolved config equals the requested one (else it is rerun, and the output
says so). The first cell generates the text answers afresh (no cache read);
later cells read those answers from the answer cache (same key: model
weights, settings, code), and each row says how many it generated or read.

  python benchmarks/wire_grid.py --squad-train ../shared/squad/train-v1.1-first44.json \\
      --squad-eval ../shared/squad/dev-v1.1-part-a.json --max-eval 500 --out runs/wire_grid

Writes results.csv, results.md, references.json and f1_vs_bytes.png in --out
and prints the tables.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stage1_grid import grid_parser, markdown_table, run_cell  # noqa: E402

from latentwire.config import RunConfig  # noqa: E402
from latentwire.evaluation.report import REFERENCE_LABELS, plot_f1_vs_bytes  # noqa: E402
from latentwire.util.runio import atomic_write_text, write_json  # noqa: E402

# (adapter, dims, bits): what matters -- the vocab adapter from fp32 down to
# codes smaller than the token ids (16 bits a token), and the MLP where it
# still answers (it is already at F1 ~0 from 36 dims in fp32, so its
# low-bit cells would only repeat that)
DEFAULT_CELLS = ["vocab:144:32", "vocab:9:32", "vocab:9:8", "vocab:9:4", "vocab:9:2", "vocab:9:1",
                 "vocab:4:8", "vocab:4:4", "vocab:2:8", "vocab:1:8",
                 "mlp:144:32", "mlp:144:8", "mlp:144:4", "mlp:36:32"]


def cell_config(args, adapter: str, dims: int, bits: int) -> RunConfig:
    c = RunConfig()
    c.model.model = args.model
    c.model.dtype = args.dtype
    c.data.squad_train, c.data.squad_eval = args.squad_train, args.squad_eval
    c.data.max_eval, c.data.seed = args.max_eval, args.seed
    c.compress.compress_dim, c.compress.bits = dims, bits
    c.adapter.adapter = adapter
    c.eval.lm_code_length = False  # the references are measured once, below
    c.eval.vocab_metrics = "sample"  # 8,192 random ids with an interval: the exact V x V figure costs ~1 min a cell
    c.controls, c.progress = False, False
    c.out = str(Path(args.out) / f"{adapter}_d{dims}_b{bits}")
    return c


def row(adapter: str, m: dict) -> dict:
    p, t = m["pipelines"]["latentwire"], m["pipelines"]["text"]
    w, c = p["wire"], m["text_answer_cache"]
    return {"adapter": adapter, "dims": m["compressor"]["dim"], "bits": m["compressor"]["bits"],
            "bytes_per_context": round(w["bytes_mean"], 1), "bits_per_token": round(w["bits_per_token"], 2),
            "n": p["n"], "text_f1": round(t["f1"], 2), "f1": round(p["f1"], 2),
            "f1_ci95": f"{p['f1_ci95'][0]:.1f}-{p['f1_ci95'][1]:.1f}",
            "retention": None if p["f1_retention"] is None else round(100 * p["f1_retention"], 1),
            "retention_ci95": None if not p["f1_retention_ci95"] else
            f"{100 * p['f1_retention_ci95'][0]:.1f}-{100 * p['f1_retention_ci95'][1]:.1f}",
            "agreement": round(100 * p["agreement"], 1),
            "token_recovery_prompts": round(100 * p["token_recovery_prompts"], 2),
            "token_recovery_vocab": round(100 * p["token_recovery_vocab"], 2),
            "token_recovery_vocab_ci95": "{:.2f}-{:.2f}".format(*[100 * x for x in p["token_recovery_vocab_ci95"]]),
            "text_answers": f"{c['misses']} generated, {c['hits']} cached",
            "wall_s": round(m["wall_s"]), "_f1_ci": p["f1_ci95"], "_agree": p["agreement"]}


COLS = ["adapter", "dims", "bits", "bytes_per_context", "bits_per_token", "n", "text_f1", "f1", "f1_ci95",
        "retention", "retention_ci95", "agreement", "token_recovery_prompts", "token_recovery_vocab",
        "token_recovery_vocab_ci95", "text_answers"]


def references(args, first_cfg: RunConfig) -> dict:
    """Text references on exactly the evaluated contexts (the same prompts as every cell)."""
    from latentwire.llm.models import load_model
    from latentwire.evaluation.run import build_inputs, references
    path = Path(args.out) / "references.json"
    want = {"model": args.model, "squad_eval": args.squad_eval, "max_eval": args.max_eval, "seed": args.seed,
            "ac_contexts": args.ac_contexts}
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("settings") == want:
            print(f"[reuse] {path}: same settings", file=sys.stderr)
            return old["references"]
    cfg = first_cfg
    cfg.eval.lm_code_length, cfg.eval.ac_contexts = True, args.ac_contexts
    cfg.validate()
    lm = load_model(cfg.model.model)
    t0 = time.time()
    refs = references(lm, build_inputs(cfg, lm).prompts, cfg)
    print(f"[refs ] text references in {time.time() - t0:.0f} s", file=sys.stderr)
    write_json(path, {"settings": want, "references": refs})
    return refs


def main(argv=None) -> int:
    ap = grid_parser(__doc__)
    ap.add_argument("--cells", nargs="+", default=DEFAULT_CELLS, help="adapter:dims:bits, e.g. vocab:9:2")
    ap.add_argument("--ac-contexts", type=int, default=10,
                    help="contexts whose LLM arithmetic coding is run for real (encoded and decoded)")
    ap.add_argument("--reuse-text", action="store_true",
                    help="let the first cell read text answers from the answer cache too (same key: weights, "
                         "settings, code); by default it generates them afresh")
    ap.add_argument("--out", default="runs/wire_grid")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = []
    for spec in args.cells:
        try:
            a, k, b = spec.split(":")
            cells.append((a, int(k), int(b)))
        except ValueError:
            ap.error(f"--cells {spec!r}: expected adapter:dims:bits")
    rows = []
    for i, (a, k, b) in enumerate(cells):
        m = run_cell(cell_config(args, a, k, b), use_cache=i > 0 or args.reuse_text)
        rows.append(row(a, m))
        with open(out / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLS + ["wall_s"], extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    refs = references(args, cell_config(args, *cells[0]))
    ref_rows = [{"reference": REFERENCE_LABELS.get(n, n), "bytes_per_context": round(r["bytes_mean"], 1),
                 "bits_per_token": round(r["bits_per_token"], 2), "contexts": r["contexts"]}
                for n, r in refs.items()]
    ok = [r for r in rows if r["_agree"] >= 0.99]
    best = min(ok, key=lambda r: r["bytes_per_context"]) if ok else None
    lines = [markdown_table(rows, COLS), "", markdown_table(ref_rows, ["reference", "bytes_per_context", "bits_per_token", "contexts"]),
             ""]
    if best:
        cmp = ", ".join(f"{REFERENCE_LABELS[n]} {refs[n]['bytes_mean']:.0f}"
                        for n in ("token_ids", "zstd", "lm_code_length", "lm_arithmetic") if n in refs)
        lines.append(f"Smallest Stage 1 wire with agreement >= 99%: {best['adapter']} at {best['dims']} dims x "
                     f"{best['bits']} bits = {best['bytes_per_context']:.0f} bytes per context "
                     f"({best['bits_per_token']:.1f} bits a token); text references on the same contexts: {cmp} "
                     f"bytes.")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "results.md", text)
    pts = [{"label": f"{r['adapter']} {r['dims']}d x {r['bits']}b", "bytes": r["bytes_per_context"], "f1": r["f1"],
            "f1_ci95": r["_f1_ci"], "agreement": r["_agree"]} for r in rows]
    plot_f1_vs_bytes(out / "f1_vs_bytes.png", pts, refs,
                     title=f"Stage 1 on the wire ({args.model}, {rows[0]['n']} questions)")
    print(text)
    print(f"plot: {out / 'f1_vs_bytes.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
