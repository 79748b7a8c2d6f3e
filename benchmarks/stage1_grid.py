"""Stage 1 quality grid: every adapter kind at every compression ratio, plus
the linear-PCA-inverse control and the seed preset, on the same questions.

Each cell is one `latentwire run` (its own run folder with report.md);
finished cells are skipped, so an interrupted grid resumes. Prints a table
and writes results.csv / results.md in --out.

  python benchmarks/stage1_grid.py --squad-train ../shared/squad/train-v1.1-first44.json \
      --squad-eval ../shared/squad/dev-v1.1-part-a.json --max-eval 500
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from latentwire.config import RunConfig, apply_preset
from latentwire.evaluation.rundir import finished_metrics
from latentwire.evaluation.run import run_experiment


def cell_config(args, adapter: str, ratio: float, controls: bool, preset: str = "none") -> RunConfig:
    """One grid cell = the `latentwire run` config for (adapter, ratio)."""
    c = RunConfig()
    c.model.model = args.model
    c.model.dtype = args.dtype
    c.data.squad_train, c.data.squad_eval = args.squad_train, args.squad_eval
    c.data.max_eval, c.data.template, c.data.seed = args.max_eval, args.template, args.seed
    c.compress.ratio = ratio
    c.adapter.adapter, c.adapter.preset = adapter, preset
    c.controls, c.progress = controls, False
    if getattr(args, "epochs", None):
        c.train.epochs = args.epochs
    apply_preset(c)
    name = "seed_preset" if preset == "seed" else adapter
    c.out = str(Path(args.out) / f"{name}_x{ratio:g}")
    return c


def row_from_metrics(name: str, ratio: float, m: dict, pipeline: str) -> dict:
    p = m["pipelines"][pipeline]
    t = m["pipelines"]["text"]
    return {"pipeline": name, "ratio": ratio, "dim": m["compressor"]["dim"], "n": p["n"],
            "text_f1": round(t["f1"], 2), "f1": round(p["f1"], 2),
            "f1_ci95": f"{p['f1_ci95'][0]:.1f}-{p['f1_ci95'][1]:.1f}", "em": round(p["exact_match"], 2),
            "f1_retention": None if p.get("f1_retention") is None else round(100 * p["f1_retention"], 1),
            "retention_ci95": None if not p.get("f1_retention_ci95") else
            f"{100 * p['f1_retention_ci95'][0]:.1f}-{100 * p['f1_retention_ci95'][1]:.1f}",
            "agreement": None if p.get("agreement") is None else round(100 * p["agreement"], 1),
            "token_recovery_vocab": None if p.get("token_recovery_vocab") is None else
            round(100 * p["token_recovery_vocab"], 2),
            "cos": None if p.get("cos") is None else round(p["cos"], 3),
            "norm_ratio": None if p.get("norm_ratio") is None else round(p["norm_ratio"], 2),
            "explained_variance": None if m["compressor"].get("explained_variance") is None else
            round(100 * m["compressor"]["explained_variance"], 1),
            "bytes_per_context": round(p["wire"]["bytes_mean"]) if p.get("wire") else None,
            "text_utf8_bytes": round(t["wire"]["bytes_mean"]) if t.get("wire") else None,
            "wall_s": round(m["wall_s"])}


def grid_cells(args) -> list[tuple[str, float, bool, str]]:
    cells = [(a, r, r in args.controls_at and a == args.adapters[0], "none") for r in args.ratios for a in args.adapters]
    return cells + [("mlp", r, False, "seed") for r in args.seed_preset_at]


def run_cell(cfg: RunConfig, use_cache: bool = True) -> dict:
    """Metrics of one cell. A finished cell is reused only when its resolved
    config (questions, epochs, every flag) equals this one; otherwise it is
    rerun, and the output says which field differed. `use_cache`: read text
    answers from the answer cache (same key) instead of generating them."""
    m, why = finished_metrics(cfg)
    if m is not None:
        print(f"[reuse] {cfg.out}: finished with the same settings", file=sys.stderr)
        return m
    if why != "not run yet":
        print(f"[rerun] {cfg.out}: {why}", file=sys.stderr)
    t0 = time.time()
    print(f"[run ] {cfg.out}", file=sys.stderr, flush=True)
    m = run_experiment(cfg, use_cache=use_cache, overwrite=True, log=lambda *a: None)
    print(f"[done] {cfg.out} in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return m


def cell_rows(m: dict, adapter: str, ratio: float, preset: str) -> list[dict]:
    name = "seed preset (mlp)" if preset == "seed" else adapter
    rows = [row_from_metrics(name, ratio, m, "latentwire")]
    if "linear_inverse" in m["pipelines"]:
        rows.append(row_from_metrics("linear PCA inverse", ratio, m, "linear_inverse"))
    return rows


COLS = ["pipeline", "ratio", "dim", "bytes_per_context", "n", "text_f1", "f1", "f1_ci95", "em", "f1_retention",
        "retention_ci95", "agreement", "token_recovery_vocab", "cos", "norm_ratio"]


def markdown_table(rows: list[dict], cols=COLS) -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)
    body = "\n".join("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows)
    return head + "\n" + body


def grid_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every quality grid shares: model, data, question count, seed."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--squad-train", default=None)
    ap.add_argument("--squad-eval", default=None)
    ap.add_argument("--max-eval", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0, help="data seed (questions, training split)")
    ap.add_argument("--dtype", default="auto", help="--dtype of every run (auto: bf16 on GPU, fp32 on CPU; give "
                                                    "float32 to compare GPU runs with CPU ones)")
    return ap


def main(argv=None) -> int:
    ap = grid_parser(__doc__)
    ap.add_argument("--template", default="fewshot")
    ap.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8, 16, 32, 64])
    ap.add_argument("--adapters", nargs="+", default=["vocab", "mlp"])
    ap.add_argument("--controls-at", type=float, nargs="*", default=[4, 16, 64],
                    help="ratios at which the linear-PCA-inverse control is also evaluated")
    ap.add_argument("--seed-preset-at", type=float, nargs="*", default=[4])
    ap.add_argument("--epochs", type=int, default=None, help="Phase 1 epochs per cell (default: latentwire run's)")
    ap.add_argument("--out", default="runs/stage1_grid")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for adapter, ratio, controls, preset in grid_cells(args):
        m = run_cell(cell_config(args, adapter, ratio, controls, preset))
        rows += cell_rows(m, adapter, ratio, preset)
        with open(out / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    table = markdown_table(rows)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
