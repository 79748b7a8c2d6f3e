"""The per-paragraph ceiling: what M = ceil(L / r) fitted positions can give
the frozen receiver (SmolLM2-135M-Instruct by default) -- copying vs use,
input vectors vs per-layer keys/values -- against truncation at equal
positions, another paragraph's payload and nothing, on every question of the
first N evaluation paragraphs (articles round-robin), with the bytes each
costs raw and quantized.

  python benchmarks/ceiling.py --squad-train ../shared/squad/train-v1.1-first44.json \\
      --squad-eval ../shared/squad/dev-v1.1-part-a.json --contexts 26 --out runs/ceiling --md docs/ceiling.md

One `latentwire run --no-stage1` (its own folder, report and logs; the
per-paragraph fits are kept under it, so a killed run resumes where it
stopped, and a finished run is reused only with an equal config -- the output
says [reuse]). Prints and writes (--md) the ceiling table (F1 with its 95%
interval, retention, paired ΔF1 against truncation / another paragraph /
nothing, reconstruction accuracy and continuation CE, bytes, fit cost) and
the squeeze table (the use-trained fits at --wire-bits).

On a machine with a few cores the kinds can run as separate processes, one
thread each, each with its own --out and --kinds, and be merged afterwards:

  OMP_NUM_THREADS=1 python benchmarks/ceiling.py ... --kinds opt-kv-use --out runs/ceiling_a &
  OMP_NUM_THREADS=1 python benchmarks/ceiling.py ... --kinds opt-emb-copy opt-kv-copy --out runs/ceiling_b &
  wait; python benchmarks/ceiling.py --merge runs/ceiling_a runs/ceiling_b --md docs/ceiling.md

or, in one command, `--jobs 2`: the kinds are split into 2 groups of about
equal cost (a use fit costs ~3 copy fits), each run as its own process with
cpu_count / 2 threads in --out/<its kinds>, then merged as above.

--merge reads the finished folders' metrics.json (nothing is rerun) and
refuses folders whose questions, model, data or reference answers (text,
nothing, truncation: deterministic, so equal answer for answer) differ; every
paired interval was computed inside its own run against those same answers,
so the merged table is the one a single run would print. The written
section names the command of every merged folder, rebuilt from its
config.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stage1_grid import run_cell  # noqa: E402

from latentwire.config import RunConfig  # noqa: E402
from latentwire.errors import LatentWireError  # noqa: E402
from latentwire.evaluation.metrics import paired_delta  # noqa: E402
from latentwire.evaluation.compare import answer_within  # noqa: E402
from latentwire.data import load_squad_json  # noqa: E402
from latentwire.llm.models import display_name, load_tokenizer  # noqa: E402
from latentwire.util.runio import read_jsonl, write_section  # noqa: E402

KINDS = ("opt-emb-copy", "opt-emb-use", "opt-kv-copy", "opt-kv-use")
OPT_FLAGS = {"opt_steps": int, "opt_lr": float, "opt_copy_steps": int, "opt_copy_lr": float, "opt_questions": int,
             "opt_continue": int, "opt_batch": int, "opt_l2": float, "opt_patience": int}


def ceiling_config(args) -> RunConfig:
    c = RunConfig()
    c.model.model, c.model.dtype = args.model, args.dtype
    c.data.squad_train, c.data.squad_eval = args.squad_train, args.squad_eval
    c.data.max_eval, c.data.max_eval_contexts, c.data.seed = 0, args.contexts, args.seed
    c.eval.stage1, c.eval.ac_contexts, c.eval.probe_contexts = False, 0, args.contexts
    c.eval.sequence = ",".join(["truncate", "none"] + list(args.kinds))
    c.eval.sequence_ratios = ",".join(f"{r:g}" for r in args.ratios)
    c.opt.opt_wire_bits = args.wire_bits
    for name in OPT_FLAGS:
        if getattr(args, name) is not None:
            setattr(c.opt, name, getattr(args, name))
    c.progress = not args.no_progress
    c.out = args.out
    return c


def fmt_ci(x) -> str:
    return "-" if not x else f"{x[0]:+.2f} [{x[1]:+.1f}, {x[2]:+.1f}]"


def tables(m: dict) -> tuple[str, str]:
    P, ctl = m["pipelines"], m.get("controls") or {}
    t = P["text"]
    head = ["| pipeline | bytes/context | F1 [95% CI] | retention | ΔF1 vs truncation | vs another paragraph | "
            "vs nothing | reconstruction acc | continuation CE | fit s/paragraph | steps (best) | probes |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(name: str) -> str:
        e = P[name]
        c = e.get("controls") or {}
        rp = e.get("reading_probe") or {}
        fits = e.get("fits") or {}
        ret = "-" if e.get("f1_retention") is None else f"{100 * e['f1_retention']:.1f}%"
        rec = "-" if rp.get("recon_acc") is None else f"{100 * rp['recon_acc']:.1f}%"
        cont = "-" if rp.get("cont_ce") is None else f"{rp['cont_ce']:.2f}"
        fit = "-" if fits.get("fit_s_mean") is None else f"{fits['fit_s_mean']:.0f}"
        steps = "-" if fits.get("steps_mean") is None else f"{fits['steps_mean']:.0f} ({fits['best_step_mean']:.0f})"
        probes = "-" if fits.get("probes_mean") is None else f"{fits['probes_mean']:.0f}"
        return (f"| {name} | {e['wire']['bytes_mean']:,.0f} | {e['f1']:.2f} [{e['f1_ci95'][0]:.1f}, "
                f"{e['f1_ci95'][1]:.1f}] | {ret} | {fmt_ci((c.get('truncate') or {}).get('d_f1'))} | "
                f"{fmt_ci((c.get('other') or {}).get('d_f1'))} | {fmt_ci((c.get('none') or {}).get('d_f1'))} | "
                f"{rec} | {cont} | {fit} | {steps} | {probes} |")
    lines = list(head)
    refs = [n for n in P if n == "text" or n == "none" or n.startswith("truncate_")]
    for n in refs:
        lines.append(row(n))
    for n in ctl:
        if "_b" not in n.rsplit("_r", 1)[-1]:  # the wire's first (raw) bits; the squeeze table has the rest
            lines.append(row(n))
            lines.append(row(f"{n}:other"))
    main = "\n".join(lines)
    sq = ["| pipeline | bits per value | bytes/context | F1 [95% CI] | ΔF1 vs truncation |", "|---|---|---|---|---|"]
    for n in ctl:
        e = P[n]
        sq.append(f"| {n} | {e['wire'].get('bits')} | {e['wire']['bytes_mean']:,.0f} | {e['f1']:.2f} "
                  f"[{e['f1_ci95'][0]:.1f}, {e['f1_ci95'][1]:.1f}] | "
                  f"{fmt_ci(((e.get('controls') or {}).get('truncate') or {}).get('d_f1'))} |")
    note = (f"{m['n_eval']} questions on {m['data'].get('eval_articles')} articles "
            f"({P['text']['wire']['contexts']} paragraphs) of {m['data']['eval']}; text F1 {t['f1']:.2f}, "
            f"{t['wire']['bytes_mean']:,.0f} UTF-8 bytes and {t['wire']['positions_mean']:.1f} positions per context.")
    return note + "\n\n" + main, "\n".join(sq)


def answer_inside(m: dict) -> tuple[dict[str, bool], float]:
    """Question id -> whether one of its gold answers lies wholly inside the first M = ceil(L / r) context
    tokens -- what truncation keeps -- at the run's first ratio r (the receiver's own tokenizer, the context
    as a prompt holds it: `data.context_token_ids`)."""
    cfg = m["config"]
    r = float(cfg["eval"]["sequence_ratios"].split(",")[0])
    tok = load_tokenizer(cfg["model"]["model"])
    examples, _ = load_squad_json(cfg["data"]["squad_eval"], "--squad-eval")
    return {e.id: answer_within(tok, e, e.context, r) for e in examples}, r


def split_table(m: dict, folders: dict[str, Path]) -> str:
    """F1 and ΔF1 against truncation on the questions whose answer truncation keeps, and on the rest: a fitted
    state can only beat truncation by carrying what lies beyond its first M tokens."""
    inside, r = answer_inside(m)
    tname = f"truncate_r{r:g}"

    def rows(name):
        return read_jsonl(folders[name] / f"predictions_{name}.jsonl")
    base = rows(tname)
    parts = {True: [i for i, x in enumerate(base) if inside[x["id"]]],
             False: [i for i, x in enumerate(base) if not inside[x["id"]]]}
    lines = [f"| pipeline | F1, answer in the first M tokens (n={len(parts[True])}) | ΔF1 vs truncation | "
             f"F1, answer beyond them (n={len(parts[False])}) | ΔF1 vs truncation |", "|---|---|---|---|---|"]
    seed = m["config"]["data"]["seed"]
    for name in m["pipelines"]:
        if "_b" in name.rsplit("_r", 1)[-1]:
            continue  # the squeeze: same fits
        rs = rows(name)
        if [x["id"] for x in rs] != [x["id"] for x in base]:
            raise LatentWireError(f"{folders[name]}: predictions_{name}.jsonl holds other questions than {tname}'s")
        cells = []
        for part in (True, False):
            a, b = [base[i] for i in parts[part]], [rs[i] for i in parts[part]]
            if not a:
                cells += ["-", "-"]
                continue
            d = paired_delta(a, b, "f1", m["config"]["eval"]["n_boot"], seed)
            cells += [f"{100 * sum(x['f1'] for x in b) / len(b):.2f}", "-" if name == tname else fmt_ci(d)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def command_of(folder: str, cfg: dict) -> str:
    """The ceiling.py command that made a run folder, rebuilt from its config.json (flags at their defaults
    left out), so a merged table names every run it was made from."""
    d, e, o, mo = cfg["data"], cfg["eval"], cfg["opt"], cfg["model"]
    kinds = [k for k in e["sequence"].split(",") if k in KINDS]
    parts = ["python benchmarks/ceiling.py"]
    if mo["model"] != "smollm2-135m":
        parts.append(f"--model {mo['model']}")
    if mo["dtype"] != "float32":
        parts.append(f"--dtype {mo['dtype']}")
    parts += [f"--squad-train {d['squad_train']}", f"--squad-eval {d['squad_eval']}",
              f"--contexts {d['max_eval_contexts']}"]
    if e["sequence_ratios"] != "4":
        parts.append("--ratios " + e["sequence_ratios"].replace(",", " "))
    parts += ["--kinds " + " ".join(kinds), f"--wire-bits {o['opt_wire_bits']}"]
    if d["seed"] != 0:
        parts.append(f"--seed {d['seed']}")
    default = RunConfig().opt
    for name in OPT_FLAGS:
        if o[name] != getattr(default, name):
            parts.append(f"--{name.replace('_', '-')} {o[name]}")
    return " ".join(parts + [f"--out {folder}", "--no-progress"])


def _reference_answers(folder: Path, name: str) -> list:
    path = folder / f"predictions_{name}.jsonl"
    if not path.is_file():
        raise LatentWireError(f"--merge {folder}: {path.name} is missing (an unfinished or foreign run?)")
    return [(r.get("id"), r.get("prediction")) for r in read_jsonl(path)]


def _eval_settings(cfg: dict) -> dict:
    return {k: v for k, v in (cfg.get("eval") or {}).items() if k != "sequence"}  # all but the kinds


def merge_metrics(folders: list[str]) -> dict:
    """One metrics dict from finished ceiling runs over the same questions: the first folder's references
    (text, none, truncation), then every folder's fitted kinds with their controls. A folder whose questions,
    model, data settings or reference answers differ from the first's is refused (one line naming it)."""
    ms = []
    for f in folders:
        mpath = Path(f) / "metrics.json"
        if not mpath.is_file():
            raise LatentWireError(f"--merge {f}: no metrics.json (not a finished run folder)")
        try:
            ms.append(json.loads(mpath.read_text()))
        except ValueError as err:
            raise LatentWireError(f"--merge {f}: metrics.json is unreadable ({err})") from None
    base, bf = ms[0], Path(folders[0])
    refs = [n for n in base["pipelines"] if n == "text" or n == "none" or n.startswith("truncate_")]
    for f, m in zip(folders[1:], ms[1:]):
        bc, mc = base.get("config") or {}, m.get("config") or {}
        for what, a, b in (("the model", bc.get("model"), mc.get("model")),
                           ("the model file", base.get("model"), m.get("model")),
                           ("the data settings", bc.get("data"), mc.get("data")),
                           ("the question count", base.get("n_eval"), m.get("n_eval")),
                           ("the generation settings", _eval_settings(bc), _eval_settings(mc))):
            if a != b:
                raise LatentWireError(f"--merge {f}: {what} differ from {folders[0]}'s; merge runs of one setting only")
        for n in refs:
            if n not in m["pipelines"] or _reference_answers(Path(f), n) != _reference_answers(bf, n):
                raise LatentWireError(f"--merge {f}: its {n} answers differ from {folders[0]}'s (other questions, "
                                      "model or code); its paired intervals would not be comparable")
    out = dict(base)
    out["pipelines"] = {n: base["pipelines"][n] for n in refs}
    out["controls"] = {}
    out["folders"] = {n: bf for n in refs}
    out["configs"] = [m.get("config") or {} for m in ms]  # each folder's, for the commands that made them
    for f, m in zip(folders, ms):
        for n, e in m["pipelines"].items():
            if n in refs:
                continue
            if n in out["pipelines"]:
                raise LatentWireError(f"--merge {f}: pipeline {n} is also in an earlier folder; merge each kind once")
            out["pipelines"][n] = e
            out["folders"][n] = Path(f)
        out["controls"].update(m.get("controls") or {})
    return out


def kind_groups(kinds: list[str], jobs: int) -> list[list[str]]:
    """The kinds in at most `jobs` groups of about equal cost (a use fit ~3x a copy fit), costliest first."""
    cost = {k: 3 if k.endswith("-use") else 1 for k in kinds}
    groups: list[list[str]] = [[] for _ in range(max(1, min(jobs, len(kinds))))]
    for k in sorted(kinds, key=lambda k: -cost[k]):
        min(groups, key=lambda g: sum(cost[x] for x in g)).append(k)
    return [g for g in groups if g]


def run_jobs(args) -> list[str]:
    """--jobs: each kind group in its own process (its own run folder under --out, log beside it), all at once,
    each with cpu_count / jobs threads; the finished folders, for --merge."""
    import subprocess
    groups = kind_groups(list(args.kinds), args.jobs)
    threads = str(max(1, (os.cpu_count() or 1) // len(groups)))
    procs = []
    for g in groups:
        out = Path(args.out) / "+".join(g)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--dtype", args.dtype,
               "--squad-train", args.squad_train, "--squad-eval", args.squad_eval, "--contexts", str(args.contexts),
               "--ratios", *[f"{r:g}" for r in args.ratios], "--kinds", *g, "--wire-bits", args.wire_bits,
               "--seed", str(args.seed), "--out", str(out), "--no-progress"]
        for name in OPT_FLAGS:
            if getattr(args, name) is not None:
                cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
        log = open(out.with_suffix(".log"), "w")
        print(f"[job ] {' '.join(g)} -> {out} ({threads} thread(s), log {log.name})", file=sys.stderr, flush=True)
        procs.append((out, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                 env=os.environ | {"OMP_NUM_THREADS": threads})))
    failed = []
    for out, log, proc in procs:
        if proc.wait() != 0:
            failed.append(log.name)
        log.close()
    if failed:
        raise LatentWireError(f"--jobs: {len(failed)} job(s) failed; see {', '.join(failed)}")
    return [str(out) for out, _, _ in procs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--squad-train", default=None, help="required (unless --merge)")
    ap.add_argument("--squad-eval", default=None, help="required (unless --merge)")
    ap.add_argument("--contexts", type=int, default=26, help="evaluation paragraphs (every question on each)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[4.0])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--wire-bits", default="16,8,4,2", help="--opt-wire-bits: the squeeze")
    ap.add_argument("--seed", type=int, default=0)
    for name, t in OPT_FLAGS.items():
        ap.add_argument("--" + name.replace("_", "-"), dest=name, type=t, default=None,
                        help=f"--{name.replace('_', '-')} of the run (default: latentwire run's)")
    ap.add_argument("--out", default="runs/ceiling")
    ap.add_argument("--md", default=None, help="also write the tables, with this command, into this markdown file "
                                               "(between its `ceiling.py` markers; the prose around them is kept)")
    ap.add_argument("--md-section", default="ceiling.py",
                    help="the markers (`<!-- NAME: begin -->`) to write between, for a page with two tables")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RUN_FOLDER",
                    help="run nothing: one table from these finished ceiling runs (same questions; see above)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run the kinds in this many processes at once (one run folder each under --out), then merge")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs > 1 and not args.merge:
        for flag in ("squad_train", "squad_eval"):
            if getattr(args, flag) is None:
                ap.error(f"--{flag.replace('_', '-')} is required (unless --merge)")
        try:
            args.merge = run_jobs(args)
        except LatentWireError as err:
            ap.exit(2, f"error: {err}\n")
    if args.merge:
        try:
            m = merge_metrics(args.merge)
        except LatentWireError as err:
            ap.exit(2, f"error: {err}\n")
        made = "\n".join(command_of(f, c) for f, c in zip(args.merge, m["configs"]))
    else:
        for flag in ("squad_train", "squad_eval"):
            if getattr(args, flag) is None:
                ap.error(f"--{flag.replace('_', '-')} is required (unless --merge)")
        m = run_cell(ceiling_config(args))
        m["folders"] = {n: Path(args.out) for n in m["pipelines"]}
        made = None
    main_t, squeeze = tables(m)
    text = (f"{main_t}\n\nThe squeeze (the same fits at fewer bits per value):\n\n{squeeze}\n\n"
            "Where the answer lies: the questions whose gold answer sits inside the context's first M tokens (what "
            "truncation keeps) and the rest, on which only a state that carries more of the paragraph than its "
            f"first M tokens can beat truncation:\n\n{split_table(m, m['folders'])}\n")
    print(text)
    if args.md:
        cmd = "python benchmarks/ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:])
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
        seed = (m.get("config") or {}).get("data", {}).get("seed", args.seed)
        if made is None:
            where = f"run folder {args.out}, its report.md beside it"
        else:
            cmd = made + "\n" + cmd
            where = (f"run folder{'s' if len(args.merge) > 1 else ''} {', '.join(args.merge)}, merged; each has "
                     "its report.md" + (f", run {args.jobs} at a time" if args.jobs > 1 else ""))
        head = (f"This section is the unedited output of\n\n```\n{cmd}\n```\n\n({when} UTC, {platform.machine()}, "
                f"{os.cpu_count()} CPUs, model {display_name(m['model'])}, data seed {seed}; {where}.)\n")
        write_section(args.md, args.md_section, head + "\n" + text)
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
