"""Sweeps: many `latentwire run`s described by one YAML/TOML file, one row
per run appended to results.csv, finished runs skipped (an interrupted sweep
resumes), plots from the CSV; and `latentwire diagnose`, which builds the
controlled comparisons for the seed's five hypotheses as a sweep and reads a
verdict from paired bootstrap intervals.

Sweep file:

    out: runs/sweep
    base: {model: smollm2-135m, max_eval: 300, squad_train: ..., squad_eval: ...}
    grid: {ratio: [4, 16], adapter: [vocab, mlp]}      # cartesian product
    runs: [{name: seed, preset: seed}]                  # extra runs (optional)

Keys are config field names (`latentwire run --help`, dashes or underscores).
"""
from __future__ import annotations

import copy
import csv
import itertools
import json
import time
from dataclasses import fields
from pathlib import Path


from ..config import GROUPS, RunConfig, apply_preset
from ..errors import LatentWireError
from .metrics import paired_delta
from ..util.runio import atomic_write_text, read_jsonl
from .run import run_experiment
from .rundir import config_diff, finished_metrics
from .report import plot_f1_vs_bytes

RESULT_COLUMNS = ["name", "pipeline", "overrides", "text_f1", "f1", "f1_ci95", "em", "f1_retention", "agreement",
                  "token_recovery_vocab", "cos", "norm_ratio", "norm_status", "collapsed", "wire_bytes",
                  "bits_per_token", "text_utf8_bytes", "wall_s", "run_dir"]


def _field_index() -> dict[str, str]:
    """field name -> the RunConfig group holding it ('' for RunConfig itself)."""
    idx = {f.name: g for g, cls in GROUPS.items() for f in fields(cls)}
    idx["controls"] = ""
    return idx


def apply_overrides(cfg: RunConfig, overrides: dict, where: str = "sweep") -> RunConfig:
    """A copy of cfg with `field: value` overrides (unknown fields named)."""
    cfg = copy.deepcopy(cfg)
    idx = _field_index()
    for key, value in overrides.items():
        k = key.replace("-", "_")
        if k == "name":
            continue
        if k not in idx:
            raise LatentWireError(f"{where}: unknown field {key!r} (see `latentwire run --help` for fields)")
        group = idx[k]
        target = getattr(cfg, group) if group else cfg
        cur = getattr(target, k)
        if isinstance(cur, bool) or cur is None or isinstance(value, type(cur)) or \
                (isinstance(cur, float) and isinstance(value, int)):
            setattr(target, k, value)
        else:
            try:
                setattr(target, k, type(cur)(value))
            except (TypeError, ValueError):
                raise LatentWireError(f"{where}: field {key!r} wants {type(cur).__name__}, got {value!r}") from None
    return cfg


def load_sweep_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise LatentWireError(f"sweep file {path}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            import tomllib
            spec = tomllib.loads(text)
        else:
            import yaml
            spec = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - yaml/toml raise their own kinds
        raise LatentWireError(f"sweep file {path}: cannot parse ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise LatentWireError(f"sweep file {path}: expected a mapping with base/grid/runs")
    unknown = set(spec) - {"out", "base", "grid", "runs", "compare"}
    if unknown:
        raise LatentWireError(f"sweep file {path}: unknown section(s) {sorted(unknown)}; "
                              "use out, base, grid, runs, compare")
    for pair in spec.get("compare") or []:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise LatentWireError(f"sweep file {path}: compare entries are [before, after] run-name pairs, got {pair!r}")
    return spec


def expand(spec: dict) -> list[dict]:
    """The runs of a sweep, each a dict of overrides with a stable name."""
    grid = spec.get("grid") or {}
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise LatentWireError(f"sweep grid: {k!r} must be a non-empty list")
    keys = list(grid)
    runs = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))] if keys else []
    runs += [dict(r) for r in (spec.get("runs") or [])]
    if not runs:
        runs = [{}]
    names = set()
    for r in runs:
        r.setdefault("name", ",".join(f"{k}={v}" for k, v in r.items() if k != "name") or "base")
        if r["name"] in names:
            raise LatentWireError(f"sweep: two runs are named {r['name']!r}")
        names.add(r["name"])
    return runs


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "=-_." else "_" for c in name)


def result_rows(name: str, overrides: dict, m: dict, run_dir: Path) -> list[dict]:
    """One row per pipeline of a run but the text baseline: the Stage 1
    pipeline first (`latentwire`), then the --sequence ones; Stage 1's
    per-token columns (token recovery, cosine, norms) are blank for others."""
    t = m["pipelines"]["text"]
    names = [n for n in m["pipelines"] if n not in ("text", "linear_inverse")]
    rows = []
    for pipe in sorted(names, key=lambda n: n != "latentwire"):
        p = m["pipelines"][pipe]
        get = lambda k, nd: "" if p.get(k) is None else round(p[k], nd)  # noqa: E731
        rows.append({"name": name, "pipeline": pipe,
                     "overrides": json.dumps({k: v for k, v in overrides.items() if k != "name"}),
                     "text_f1": round(t["f1"], 3), "f1": round(p["f1"], 3),
                     "f1_ci95": f"{p['f1_ci95'][0]:.2f}-{p['f1_ci95'][1]:.2f}", "em": round(p["exact_match"], 3),
                     "f1_retention": get("f1_retention", 4), "agreement": round(p["agreement"], 4),
                     "token_recovery_vocab": get("token_recovery_vocab", 5), "cos": get("cos", 4),
                     "norm_ratio": get("norm_ratio", 4), "norm_status": p.get("norm_status", ""),
                     "collapsed": p.get("collapsed", ""), "wire_bytes": round(p["wire"]["bytes_mean"], 1),
                     "bits_per_token": round(p["wire"]["bits_per_token"], 3),
                     "text_utf8_bytes": round(t["wire"]["bytes_mean"], 1), "wall_s": round(m["wall_s"], 1),
                     "run_dir": str(run_dir)})
    return rows


def run_sweep(base: RunConfig, runs: list[dict], out: str | Path, log=print, use_cache: bool = True) -> list[dict]:
    """Run every entry whose finished run is missing or was made with other
    settings; return one row per entry, in file order. A finished run is
    reused only when its resolved config equals the entry's (so a changed
    `base` reruns what it changes); results.csv is rewritten from the runs'
    own metrics.json after each run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    # validate every run before starting any (a typo in run 9 must not cost runs 1-8)
    cfgs = []
    for r in runs:
        c = apply_overrides(base, r, where=f"sweep run {r['name']!r}")
        apply_preset(c, keep={k.replace("-", "_") for k in r})
        c.out = str(out / _slug(r["name"]))
        c.validate()
        cfgs.append(c)
    rows: dict[str, dict] = {}

    def write_csv():
        import io
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        w.writerows(row for r in runs if r["name"] in rows for row in rows[r["name"]])
        atomic_write_text(csv_path, buf.getvalue())

    for r, c in zip(runs, cfgs):
        run_dir = Path(c.out)
        m, why = finished_metrics(c)
        if m is not None:
            log(f"[reuse] {r['name']}: finished with the same settings ({run_dir}/metrics.json)")
            rows[r["name"]] = result_rows(r["name"], r, m, run_dir)
            continue
        if (run_dir / "metrics.json").exists():
            log(f"[rerun] {r['name']}: the finished run in {run_dir} was made with other settings ({why})")
        t0 = time.time()
        resume = (run_dir / "ckpt.pt").exists() and not (run_dir / "metrics.json").exists()
        changed = config_diff(run_dir, c) if resume else []
        if changed:
            # the sweep file is the source of truth: a half-finished run of an
            # older version of this entry is started over, not refused
            log(f"[restart] {r['name']}: its flags changed since the half-finished run in {run_dir} "
                f"({len(changed)} field(s); first: {changed[0]}); starting over")
            resume = False
        log(f"[run ] {r['name']} -> {c.out}")
        m = run_experiment(c, use_cache=use_cache, resume=resume, overwrite=True, log=lambda *a: None)
        rows[r["name"]] = result_rows(r["name"], r, m, run_dir)
        write_csv()
        row = rows[r["name"]][0]
        log(f"[done] {r['name']}: {row['pipeline']} F1 {row['f1']:.2f} (text {row['text_f1']:.2f}), agreement "
            f"{100 * row['agreement']:.1f}% in {time.time() - t0:.0f} s")
    write_csv()
    with open(csv_path, newline="") as f:
        all_rows = list(csv.DictReader(f))
    plot_sweep(all_rows, out)
    return all_rows


def _direction(d: tuple) -> str:
    """up / down when the 95% interval excludes 0, else unclear."""
    return "up" if d[1] > 0 else ("down" if d[2] < 0 else "no clear change")


def compare_runs(rows: list[dict], pairs: list[list[str]], out: Path, n_boot: int = 1000, seed: int = 0) -> str:
    """`compare: [[before, after], ...]` in a sweep file: paired differences
    over the same questions (ΔF1, Δagreement, 95% bootstrap intervals) and a
    verdict per pair, written to compare.md."""
    by = {r["name"]: r for r in rows if r["pipeline"] == "latentwire"}
    lines = ["| before | after | F1 before | F1 after | ΔF1 [95% CI] | agreement before % | agreement after % | "
             "Δagreement [95% CI] | change (95% interval excludes 0) |", "|---|---|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        for n in (a, b):
            if n not in by:
                raise LatentWireError(f"sweep compare: no run named {n!r} (runs: {', '.join(sorted(by))})")
        pa, pb = (read_jsonl(Path(by[n]["run_dir"]) / "predictions_latentwire.jsonl") for n in (a, b))
        if [r["id"] for r in pa] != [r["id"] for r in pb]:
            raise LatentWireError(f"sweep compare: {a!r} and {b!r} were evaluated on different questions")
        f, g = paired_delta(pa, pb, "f1", n_boot, seed), paired_delta(pa, pb, "agree", n_boot, seed)
        lines.append(f"| {a} | {b} | {float(by[a]['f1']):.2f} | {float(by[b]['f1']):.2f} | {f[0]:+.2f} [{f[1]:+.1f}, "
                     f"{f[2]:+.1f}] | {100 * float(by[a]['agreement']):.1f} | {100 * float(by[b]['agreement']):.1f} | "
                     f"{g[0]:+.1f} [{g[1]:+.1f}, {g[2]:+.1f}] | F1 {_direction(f)}, agreement {_direction(g)} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "compare.md", text)
    return text


def plot_sweep(rows: list[dict], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    ratio_rows = [(json.loads(r["overrides"]), r) for r in rows]
    ratio_rows = [(o, r) for o, r in ratio_rows if "ratio" in o and r["pipeline"] == "latentwire"]
    if ratio_rows:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        series: dict[str, list] = {}
        for o, r in ratio_rows:
            label = ",".join(f"{k}={v}" for k, v in o.items() if k != "ratio") or "latentwire"
            series.setdefault(label, []).append((float(o["ratio"]), float(r["f1"]), float(r["agreement"])))
        for label, pts in series.items():
            pts.sort()
            ax[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            ax[1].plot([p[0] for p in pts], [100 * p[2] for p in pts], "o-", label=label)
        ax[0].axhline(float(rows[0]["text_f1"]), color="k", ls="--", label="text baseline")
        for a, t in zip(ax, ("F1", "agreement with text pipeline (%)")):
            a.set_xscale("log", base=2); a.set_xlabel("compression ratio"); a.set_title(t)
        ax[0].legend(fontsize=7)
        fig.tight_layout(); fig.savefig(out / "f1_vs_ratio.png", dpi=110); plt.close(fig)
        made.append("f1_vs_ratio.png")
    if rows and rows[0].get("wire_bytes"):
        first = json.loads((Path(rows[0]["run_dir"]) / "metrics.json").read_text())
        pts = [{"label": (r["name"] if r["pipeline"] == "latentwire" else f"{r['name']}: {r['pipeline']}")[:32],
                "bytes": float(r["wire_bytes"]), "f1": float(r["f1"]),
                "f1_ci95": [float(x) for x in r["f1_ci95"].split("-")[:2]] if r["f1_ci95"].count("-") == 1 else None,
                "agreement": float(r["agreement"])} for r in rows]
        made.append(plot_f1_vs_bytes(out / "f1_vs_bytes.png", pts, first.get("wire_references") or {}))
    rows = [r for r in rows if r["cos"] not in ("", None)]  # per-token (Stage 1) rows only
    if not rows:
        return made
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter([float(r["cos"]) for r in rows], [float(r["f1"]) for r in rows])
    for r in rows:
        ax.annotate(r["name"][:24], (float(r["cos"]), float(r["f1"])), fontsize=6)
    ax.set_xlabel("cosine (original vs reconstructed)"); ax.set_ylabel("F1")
    fig.tight_layout(); fig.savefig(out / "cos_vs_f1.png", dpi=110); plt.close(fig)
    made.append("cos_vs_f1.png")
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in rows:
        d = Path(r["run_dir"])
        diag = d / "diagnostics_latentwire.json"
        if diag.exists():
            vals = json.loads(diag.read_text()).get("token_norm_ratios_sample", [])
            ax[0].hist([min(v, 3) for v in vals], bins=60, histtype="step", label=r["name"][:24])
        log = d / "train_log.jsonl"
        if log.exists():
            steps = [x for x in read_jsonl(log) if x.get("event") == "step"]
            ax[1].plot([x["step"] for x in steps], [x["loss"] for x in steps], label=r["name"][:24])
    ax[0].set_title("norm ratio per token"); ax[0].legend(fontsize=6)
    ax[1].set_yscale("log"); ax[1].set_title("Phase 1 loss"); ax[1].set_xlabel("step")
    fig.tight_layout(); fig.savefig(out / "norms_and_losses.png", dpi=110); plt.close(fig)
    made.append("norms_and_losses.png")
    return made


# ------------------------------------------------------------- diagnose

HYPOTHESES = [
    ("1. magnitude mismatch", "calibrate the output scale (--calibration rms, no output LayerNorm)",
     {"calibration": "rms", "output_norm": False}),
    ("2. PCA too lossy", "no compression (--compressor identity), same adapter",
     {"compressor": "identity"}),
    ("3. reconstruction objective insufficient", "add Phase 2 (CE + KL through the LLM)",
     {"phase2_steps": 30}),
    ("4. adapter capacity", "hidden_mult 8, no dropout",
     {"hidden_mult": 8, "dropout": 0.0}),
    ("5. evaluation setup", "original-embedding BOS and 'Answer:' anchor",
     {"bos": "original", "anchor": "original"}),
]


def verdict(d_f1: tuple, d_ag: tuple, min_effect: float = 2.0) -> str:
    """supported: an interval excludes 0 on the side of improvement;
    not supported: both intervals stay below +min_effect points;
    inconclusive: otherwise (the interval is too wide to tell)."""
    if d_f1[1] > 0 or d_ag[1] > 0:
        return "supported"
    if d_f1[2] < min_effect and d_ag[2] < min_effect:
        return "not supported"
    return "inconclusive"


def run_diagnose(base: RunConfig, out: str | Path, log=print, phase2_steps: int = 30, keep=()) -> dict:
    """Test the seed's five hypotheses as controlled one-change comparisons
    against `base` (the seed preset by default) on the same questions."""
    out = Path(out)
    hyps = [(h, what, dict(ov)) for h, what, ov in HYPOTHESES]
    for _, _, ov in hyps:
        if "phase2_steps" in ov:
            ov["phase2_steps"] = phase2_steps
    apply_preset(base, keep=keep)  # flags the user gave win over the preset
    base.adapter.preset = "none"  # the variants below change the preset's fields one at a time
    # the linear-PCA-inverse control is the same in every variant: evaluate it once, with the baseline
    runs = [{"name": "baseline"}] + [{"name": f"h{i + 1}", "controls": False, **ov} for i, (_, _, ov) in enumerate(hyps)]
    t0 = time.time()
    rows = run_sweep(base, runs, out, log=log)
    by = {r["name"]: r for r in rows if r["pipeline"] == "latentwire"}
    pred = {n: read_jsonl(Path(by[n]["run_dir"]) / "predictions_latentwire.jsonl") for n in by}
    nb, seed = base.eval.n_boot, base.data.seed
    results = []
    for i, (h, what, ov) in enumerate(hyps):
        n = f"h{i + 1}"
        d_f1 = paired_delta(pred["baseline"], pred[n], "f1", nb, seed)
        d_ag = paired_delta(pred["baseline"], pred[n], "agree", nb, seed)
        results.append({"hypothesis": h, "test": what, "overrides": ov, "f1": float(by[n]["f1"]),
                        "agreement": 100 * float(by[n]["agreement"]), "delta_f1": d_f1, "delta_agreement": d_ag,
                        "verdict": verdict(d_f1, d_ag)})
    results.sort(key=lambda r: (r["delta_f1"][0], r["delta_agreement"][0]), reverse=True)
    b = by["baseline"]
    lines = ["# latentwire diagnose: the seed's five hypotheses\n",
             f"Baseline: {base.adapter.adapter} adapter, ratio {base.compress.ratio:g}, output_norm "
             f"{base.adapter.output_norm}, calibration {base.adapter.calibration}, w_cos {base.train.w_cos}, "
             f"w_mse {base.train.w_mse}, anchor {base.eval.anchor}, bos {base.data.bos}; model "
             f"{base.model.model}; {base.data.max_eval} questions; seed {seed}.\n",
             f"Baseline F1 {float(b['f1']):.2f} (text pipeline {float(b['text_f1']):.2f}), agreement "
             f"{100 * float(b['agreement']):.1f}%, cosine {float(b['cos']):.3f}, norm ratio {float(b['norm_ratio']):.2f} "
             f"({b['norm_status']}).\n",
             "Each row changes one thing. Deltas are paired over the same questions, with 95% bootstrap intervals "
             f"({nb} resamples). Ranked by effect on F1.\n",
             "| rank | hypothesis | test | F1 | ΔF1 [95% CI] | agreement % | Δagreement [95% CI] | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for k, r in enumerate(results, 1):
        f, a = r["delta_f1"], r["delta_agreement"]
        lines.append(f"| {k} | {r['hypothesis']} | {r['test']} | {r['f1']:.2f} | {f[0]:+.2f} [{f[1]:+.1f}, {f[2]:+.1f}] | "
                     f"{r['agreement']:.1f} | {a[0]:+.1f} [{a[1]:+.1f}, {a[2]:+.1f}] | **{r['verdict']}** |")
    lines += ["", f"Wall time: {time.time() - t0:.0f} s. Runs and per-run reports: `{out}/*/report.md`; "
              f"all rows: `{out}/results.csv`.", "", "![F1 vs cosine](cos_vs_f1.png)", "",
              "![norms and losses](norms_and_losses.png)"]
    atomic_write_text(out / "diagnose_report.md", "\n".join(lines) + "\n")
    (out / "diagnose.json").write_text(json.dumps({"baseline": b, "results": results}, indent=2))
    log("\n".join(lines[4:4 + 2 + len(results)]))
    return {"baseline": b, "results": results}


__all__ = ["apply_overrides", "load_sweep_file", "expand", "run_sweep", "run_diagnose", "verdict"]
