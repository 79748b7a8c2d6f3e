"""One wire, two receivers: the learned sequence compressor of a sender
model S read by S itself and by a second model R, on the same questions and
the same payload bytes, against each receiver's own compressor.

  python benchmarks/pair_grid.py --model smollm2-135m --receiver gemma3-270m \\
      --squad-train ../shared/squad/train-v1.1-first44.json \\
      --squad-eval ../shared/squad/dev-v1.1-part-a.json --max-eval 500 --out runs/pair_grid

Runs (each one `latentwire run --no-stage1`, its own folder and report):
* `own_S`:  S's own compressor (sender + decoder into S), beside truncation;
* `own_R`:  R's own compressor (R as sender and receiver), beside truncation;
* `wire_R`: R reading S's wire: S's sender from own_S loaded and frozen
  (`--seq-sender-path`), only R's decoder trained; truncation, surprisal and
  nothing, chosen on S's tokens, read by R through text; `sender_ids`.
A finished run is reused only when its resolved config equals the requested
one (the output says [reuse]).

Prints and writes (in --out) results.md: per receiver, text F1, its own
compressor and the shared wire at the same r (bytes, retention with its
interval, shared minus own paired over questions), the share of its own
compressor's retention the shared wire keeps (target >= 90%), the second
receiver's training cost (trained parameters, seconds), and how often the
two receivers give the same answer (shared wire; text for scale).
"""
from __future__ import annotations

import sys
import json
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from seq_grid import SEQ_FLAGS, base_config  # noqa: E402
from stage1_grid import grid_parser, run_cell  # noqa: E402

from latentwire.config import apply_preset  # noqa: E402
from latentwire.util.runio import atomic_write_text, read_jsonl  # noqa: E402
from latentwire.evaluation.metrics import paired_delta  # noqa: E402


def learned_cfg(args, name: str, receiver: str, sender: str | None = None, sender_path: str | None = None):
    c = base_config(args, name)
    c.model.model, c.model.sender_model = receiver, sender
    kinds = args.own_kinds if sender is None else args.wire_kinds
    c.eval.sequence, c.eval.sequence_ratios = kinds, f"{args.ratio}"
    c.eval.lm_code_length = False
    c.seq.seq_ratio, c.seq.seq_seed, c.seq.seq_preset = args.ratio, args.seq_seed, args.preset
    c.seq.seq_sender_path = sender_path
    if receiver != args.model and args.receiver_max_prompt_tokens:
        c.data.max_prompt_tokens = c.seq.seq_max_tokens = args.receiver_max_prompt_tokens
    given = {f for f in SEQ_FLAGS if getattr(args, f) is not None}
    for flag in given:
        setattr(c.seq, flag, getattr(args, flag))
    apply_preset(c, keep=given)
    return c


def sender_run(folder: str, model: str, ratio: int) -> tuple[str, dict]:
    """A finished single-model run (e.g. seq_grid's learned_r4_s0) used as own_S, checked to be S's own
    compressor at this r, evaluated and saved."""
    d = Path(folder)
    for f in ("metrics.json", "seq_compressor.pt"):
        if not (d / f).is_file():
            raise SystemExit(f"--sender-run {folder}: no {f} (not a finished learned run)")
    m = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    if cfg["model"]["model"] != model or cfg["model"].get("sender_model") not in (None, model):
        raise SystemExit(f"--sender-run {folder}: a run of {cfg['model']['model']}, not of --model {model}")
    if f"learned_r{ratio}" not in m.get("pipelines", {}):
        raise SystemExit(f"--sender-run {folder}: has no learned_r{ratio} pipeline (--ratio {ratio})")
    print(f"[reuse] {folder}: own_S given by --sender-run", file=sys.stderr)
    return str(d), m


def _rows(folder: str, name: str) -> list[dict]:
    return read_jsonl(Path(folder) / f"predictions_{name}.jsonl")


def _same_questions(*row_lists) -> None:
    ids = [[r["id"] for r in rows] for rows in row_lists]
    if any(i != ids[0] for i in ids):
        raise SystemExit("the runs were evaluated on different questions")


def _pct(x, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _ret(p: dict) -> str:
    """Retention and its interval ('-' where the text pipeline scored 0)."""
    ci = p.get("f1_retention_ci95")
    return _pct(p.get("f1_retention")) + ("" if not ci else f" [{100 * ci[0]:.1f}-{100 * ci[1]:.1f}]")


def receiver_line(label: str, m_own: dict, own_dir: str, m_wire: dict, wire_dir: str, r: int) -> tuple[str, dict]:
    """One receiver: text F1, own compressor, shared wire, shared minus own (paired)."""
    lr = f"learned_r{r}"
    own, wire = m_own["pipelines"][lr], m_wire["pipelines"][lr]
    a, b = _rows(own_dir, lr), _rows(wire_dir, lr)
    _same_questions(a, b)
    d = paired_delta(a, b, "f1", 1000, 0)
    keep = wire["f1_retention"] / own["f1_retention"] if own.get("f1_retention") and wire.get("f1_retention") \
        is not None else None
    cost = f"own: {_cost(m_own)}; shared: " + ("the sender's own" if wire_dir == own_dir else _cost(m_wire))
    line = (f"| {label} | {m_own['pipelines']['text']['f1']:.2f} | {own['f1']:.2f} ({_ret(own)}) | "
            f"{wire['f1']:.2f} ({_ret(wire)}) | {d[0]:+.2f} [{d[1]:+.1f}, {d[2]:+.1f}] | {_pct(keep, 0)} | "
            f"{own['wire']['bytes_mean']:.0f}; {wire['wire']['bytes_mean']:.0f} | {cost} |")
    return line, {"receiver": label, "keep": keep, "d_f1": d}


def _cost(m: dict) -> str:
    """Trained parameters (of all the compressor's) and training seconds of a learned run."""
    t = m.get("seq_train") or {}
    params = t.get("params", 0)
    trained = t.get("trained_params") or params  # runs saved before trained_params train everything
    return f"{trained:,}{'' if trained == params else f' of {params:,}'} params, {t.get('train_s', 0):.0f} s"


def model_name(folder: str) -> str:
    """The --model a run was given (an alias such as smollm2-135m), not the resolved cache path."""
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))["model"]["model"]


def agreement(dir_a: str, dir_b: str, name: str) -> float:
    a, b = _rows(dir_a, name), _rows(dir_b, name)
    _same_questions(a, b)
    return 100.0 * sum(x["prediction"] == y["prediction"] for x, y in zip(a, b)) / max(1, len(a))


def oracle_pick(dir_a: str, dir_b: str, name: str) -> tuple[float, float, float]:
    """Mean F1 of S's answer, R's answer, and the better of the two per question: the last is what a perfect
    joint rescoring (both answer, one is picked) would reach -- its upper bound."""
    a, b = _rows(dir_a, name), _rows(dir_b, name)
    _same_questions(a, b)
    n = max(1, len(a))
    return (100.0 * sum(x["f1"] for x in a) / n, 100.0 * sum(y["f1"] for y in b) / n,
            100.0 * sum(max(x["f1"], y["f1"]) for x, y in zip(a, b)) / n)


def main(argv=None) -> int:
    ap = grid_parser(__doc__)
    ap.add_argument("--receiver", required=True, help="the second receiver R (--model is the sender S)")
    ap.add_argument("--receiver-max-prompt-tokens", type=int, default=None,
                    help="R's prompt budget, evaluation and training (--max-prompt-tokens, --seq-max-tokens), when "
                         "R's tokenizer needs more tokens for a prompt than S's 512 / 256 (default: the same)")
    ap.add_argument("--ratio", type=int, default=4)
    ap.add_argument("--preset", default="quick", help="--seq-preset of the learned runs (quick | default)")
    ap.add_argument("--seq-seed", type=int, default=0)
    for f in SEQ_FLAGS:
        ap.add_argument("--" + f.replace("_", "-"), type=float if f == "seq_lr" else int, default=None)
    ap.add_argument("--out", default="runs/pair_grid")
    ap.add_argument("--md", default=None, help="also write the table as this markdown file, with the command")
    ap.add_argument("--sender-run", default=None, help="a finished single-model learned run of S at this r (e.g. "
                    "seq_grid's runs/seq_grid/learned_r4_s0) used as own_S: its compressor's sender is the shared "
                    "wire (own_S is not run)")
    ap.add_argument("--own-kinds", default="learned,truncate", help="--sequence of own_S and own_R")
    ap.add_argument("--wire-kinds", default="learned,truncate,surprisal,none",
                    help="--sequence of wire_R (the training-free ones are chosen on S's tokens, read by R as text)")
    ap.add_argument("--only", default=None, help="run only these cells (comma-separated: own_S, own_R, wire_R) and "
                    "stop before the table; a later run without --only reuses them (for running cells side by side "
                    "on one GPU: scripts/gpu_pair.sh)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    S, R, r = args.model, args.receiver, args.ratio
    own_s = learned_cfg(args, "own_S", S)
    own_r = learned_cfg(args, "own_R", R)
    s_dir = args.sender_run or own_s.out
    wire_r = learned_cfg(args, "wire_R", R, S, str(Path(s_dir) / "seq_compressor.pt"))
    cells = {"own_S": own_s, "own_R": own_r, "wire_R": wire_r}
    runs = {}
    if args.sender_run:
        runs["own_S"] = sender_run(args.sender_run, S, r)
        del cells["own_S"]
    only = list(cells) if args.only is None else [c.strip() for c in args.only.split(",") if c.strip()]
    if not only or any(c not in cells for c in only):
        raise SystemExit(f"--only {args.only}: choose among {', '.join(cells)}")
    for name in only:  # own_S first: wire_R loads its sender
        runs[name] = (cells[name].out, run_cell(cells[name]))
    if args.only is not None:
        return 0
    (ds, ms), (dr, mr), (dw, mw) = runs["own_S"], runs["own_R"], runs["wire_R"]
    head = (f"Sender S = {model_name(ds)}, receivers: S itself and R = {model_name(dr)}; {ms['n_eval']} questions of "
            f"{args.squad_eval or 'the built-in set'}, data seed {args.seed}; r = {r}, preset {args.preset}, "
            "training seed "
            f"{args.seq_seed}. The shared wire: S's sender trained with S's decoder (own_S), then frozen while R's "
            "decoder trains (wire_R); both receivers read the same payload bytes.")
    lines = ["| receiver | text F1 | own compressor F1 (retention [95% CI]) | shared wire F1 (retention [95% CI]) | "
             "shared - own ΔF1 [95% CI] | shared keeps of own retention | bytes/context (own; shared) | "
             "training cost (own compressor; "
             "shared wire's decoder) |",
             "|---|---|---|---|---|---|---|---|"]
    line_s, _ = receiver_line(f"S {model_name(ds)}", ms, ds, ms, ds, r)
    line_r, _ = receiver_line(f"R {model_name(dr)}", mr, dr, mw, dw, r)
    lines += [line_s, line_r]
    base = ["| receiver | pipeline | F1 | EM | retention | agreement with own text | bytes/context | positions |",
            "|---|---|---|---|---|---|---|---|"]
    for label, m in (("S (own_S)", ms), ("R (own_R)", mr), ("R reading S (wire_R)", mw)):
        for name, p in m["pipelines"].items():
            if name == "text":
                continue
            w = p["wire"]
            base.append(f"| {label} | {name} | {p['f1']:.2f} | {p['exact_match']:.2f} | "
                        f"{_pct(p.get('f1_retention'))} | "
                        f"{_pct(p.get('agreement'))} | {w['bytes_mean']:.0f} | {w['positions_mean']:.1f} |")
    agree = (f"The two receivers give the same answer (the same string, as every agreement here) on "
             f"{agreement(ds, dw, f'learned_r{r}'):.1f}% of the "
             f"questions reading the shared wire, and on {agreement(ds, dw, 'text'):.1f}% reading the text.")
    fs, fr, best = oracle_pick(ds, dw, f"learned_r{r}")
    agree += (f" Joint rescoring (both answer from the shared wire, one answer is kept) is not built; its upper "
              f"bound, the better of the two answers on every question, is {best:.2f} F1 against S's {fs:.2f} "
              f"and R's {fr:.2f}.")
    parts = [head, "\n".join(lines), "Every pipeline of the three runs:\n\n" + "\n".join(base), agree]
    text = "\n\n".join(parts) + "\n"
    atomic_write_text(out / "results.md", text)
    print(text)
    print(f"wrote {out}/results.md")
    if args.md:
        cmd = "python benchmarks/pair_grid.py " + " ".join(argv if argv is not None else sys.argv[1:])
        atomic_write_text(Path(args.md), f"# One wire, two receivers\n\nThe unedited output of\n\n```\n{cmd}\n```\n\n"
                          + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
