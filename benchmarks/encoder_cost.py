"""What training the pooled LM encoder costs on this machine's CPU: seconds a
step and examples a second, lever by lever, and the hours it would take to
show the encoder as many examples as the GPU run of issue #28 (~26,000: 285
+ 522 steps of 32 on one H200 in 300 s).

The ladder (each row adds one lever to the row above, timed on its own, the
same batches, after one warm-up step; --levers picks rows):
* base        -- top-2 blocks train, fp32, 1 thread, the LM head over every
                 position from the first trained one to the last in every
                 row, the teacher run on each batch, the bottom 28 blocks
                 run each step (the docs' first CPU measurement);
* threads     -- --threads-max threads (default 2: one per core);
* bf16        -- the step under torch.autocast(bfloat16) (--enc-precision bf16);
* head        -- the head on the trained positions only, at the precision
                 --enc-precision auto picks on this CPU (bf16 where oneDNN
                 runs it natively -- AVX512-BF16, AMX --, else fp32: the
                 bf16 row says why);
* teacher     -- the teacher's top-k of every training question computed
                 once before training, a paragraph's questions sharing its
                 K/V (--enc-cache-teacher), its cost per question timed on
                 its own on --fill paragraphs and added once per question;
* bottom      -- the bottom's states of every training paragraph computed
                 once (--enc-cache-bottom), timed on its own the same way.
Then `full` and `lora16` with every lever that applies to them (not the
bottom's cache: their bottom trains), and `receiver`: the frozen receiver's
forward + input-gradient backward on the same batch alone (vectors as leaf
tensors: what no lever removes), the step's bound.

  python benchmarks/encoder_cost.py --squad-train ../shared/squad/train-v1.1-first44.json --batch 8 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

GPU_EXAMPLES = (285 + 522) * 32
"""Examples the issue's GPU run showed the encoder (285 stage A + 522 stage B steps of 32)."""
TOP2 = {"enc_tune": "top", "enc_top_layers": 2}
LADDER = {
    "base": dict(model=TOP2, threads=1, precision="fp32", span=True, teacher=False, bottom=False),
    "threads": dict(model=TOP2, threads=None, precision="fp32", span=True, teacher=False, bottom=False),
    "bf16": dict(model=TOP2, threads=None, precision="bf16", span=True, teacher=False, bottom=False),
    "head": dict(model=TOP2, threads=None, precision="auto", span=False, teacher=False, bottom=False),
    "teacher": dict(model=TOP2, threads=None, precision="auto", span=False, teacher=True, bottom=False),
    "bottom": dict(model=TOP2, threads=None, precision="auto", span=False, teacher=True, bottom=True),
    "full": dict(model={"enc_tune": "full"}, threads=None, precision="auto", span=False, teacher=True, bottom=False),
    "lora16": dict(model={"enc_tune": "lora", "enc_lora_rank": 16}, threads=None, precision="auto", span=False,
                   teacher=True, bottom=False),
    "receiver": dict(model=TOP2, threads=None, precision="auto", span=False, teacher=True, bottom=True),
}
"""Row -> its settings (threads None: --threads-max)."""
VARIANTS = LADDER  # the names --variants accepted before the ladder


def training_questions(squad_train: str | None) -> tuple[list, str]:
    """The training questions and how to name them: the official SQuAD JSON at `squad_train`, else the built-in
    synthetic set's training articles."""
    from latentwire.config import RunConfig
    from latentwire.data import load_squad_json
    from latentwire.evaluation.run import load_data
    if squad_train:
        return load_squad_json(squad_train, "--squad-train")[0], squad_train
    train, _, d = load_data(RunConfig())
    return train, d["train"]


def measure(model: str, squad_train: str | None, levers, batch: int, repeats: int, seed: int = 0,
            threads_max: int = 2, fill: int = 20, log=print) -> list[dict]:
    import contextlib

    import torch

    from latentwire.config import EncConfig
    from latentwire.data import Example, PromptBuilder
    from latentwire.llm.forward import head_cache
    from latentwire.encoder.lmenc import build_encoder
    from latentwire.encoder.lmtrain import loss_step, make_batch, receiver_logits, split_training, step_precision, teacher_fill
    from latentwire.llm.models import load_model
    from latentwire.evaluation.probes import REPEAT_CUE
    from latentwire.util.runio import TensorStore
    from latentwire.wire.wire import torch_threads

    train, desc = training_questions(squad_train)
    lm = load_model(model)
    lm.model.requires_grad_(False)
    builder = PromptBuilder(lm.tokenizer, "fewshot")
    head = builder.build(Example("h", "h", "", "?", ["-"])).head_ids
    hc, n_head = head_cache(lm, head), len(head)
    cue = builder._ids(REPEAT_CUE)
    rows_out = []
    n_para = n_q = None
    for name in levers:
        lv = LADDER[name]
        ec = EncConfig(enc_batch=batch, enc_seed=seed, enc_cache_bottom=lv["bottom"], **lv["model"])
        paras, _ = split_training(train, builder, ec)
        n_para, n_q = len(paras), sum(len(p.questions) for p in paras)
        k = lv["threads"] or threads_max
        precision = step_precision(lv["precision"], lm.device)
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        torch.manual_seed(seed)
        enc = build_encoder(lm, ec)
        enc.train()
        opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-5)
        row = {"lever": name, "batch": batch, "threads": k, "precision": precision,
               "head": "span" if lv["span"] else "trained positions", "teacher": "stored" if lv["teacher"] else
               "each step", "bottom": "stored" if lv["bottom"] else "each step", "tune": ec.enc_tune,
               "trainable_params": sum(p.numel() for p in enc.parameters() if p.requires_grad)}
        batches = {st: make_batch(paras, st, 0, ec, cue) for st in ("A", "B")}
        with torch_threads(k), amp:
            store = None
            if lv["teacher"]:  # the questions of the timed batch and of --fill paragraphs, timed on their own
                store = TensorStore(None)
                some = [p for p in paras if p.questions][:fill]
                t0 = time.perf_counter()
                teacher_fill(lm, hc, n_head, some, ec.enc_teacher_topk, store)
                row["teacher_s_per_question"] = (time.perf_counter() - t0) / sum(len(p.questions) for p in some)
                qa = {id(p): p for r in batches["B"] for p in paras if p.ids is r.ctx}
                teacher_fill(lm, hc, n_head, list(qa.values()), ec.enc_teacher_topk, store)
            if lv["bottom"]:
                t0 = time.perf_counter()
                enc.bottom.fill(enc.sender, [p.ids for p in paras[:fill]])
                row["bottom_s_per_paragraph"] = (time.perf_counter() - t0) / fill
                enc.bottom.fill(enc.sender, [p.ids for p in paras if any(p.ids[:len(r.enc_ids)] == r.enc_ids
                                                                         for st in "AB" for r in batches[st])])
            for stage in ("A", "B"):
                rows = batches[stage]
                times = []
                for rep in range(repeats + 1):
                    t0 = time.perf_counter()
                    if name == "receiver":  # the receiver alone: vectors as leaves, its forward and input backward
                        ids, m = _enc_ids(enc, rows)
                        with torch.no_grad():
                            v0, vm = enc(ids, m)
                        t0 = time.perf_counter()
                        vecs = v0.detach().requires_grad_(True)
                        lg, tgt = receiver_logits(lm, hc, n_head, vecs, vm, rows)
                        torch.nn.functional.cross_entropy(lg.float(), tgt).backward()
                    else:
                        terms = loss_step(enc, lm, hc, n_head, rows, ec, store, span=lv["span"])
                        opt.zero_grad(set_to_none=True)
                        terms["loss"].backward()
                        opt.step()
                    if rep:
                        times.append(time.perf_counter() - t0)
                row[f"step_s_{stage}"] = statistics.median(times)
                row[f"step_s_{stage}_runs"] = [round(t, 3) for t in times]
                row[f"examples_per_s_{stage}"] = len(rows) / row[f"step_s_{stage}"]
                row[f"positions_{stage}"] = sum(len(r.tail) + -(-len(r.enc_ids) // ec.enc_ratio) for r in rows)
                log(f"{name} stage {stage}: {row[f'step_s_{stage}']:.2f} s a step of {len(rows)} "
                    f"({row[f'examples_per_s_{stage}']:.2f} examples/s; median of {repeats})")
        a_steps, b_steps = 0.35 * GPU_EXAMPLES / batch, 0.65 * GPU_EXAMPLES / batch
        sec = a_steps * row["step_s_A"] + b_steps * row["step_s_B"]
        # a stored cache is paid once: every question's teacher, every paragraph's bottom
        sec += n_q * row.get("teacher_s_per_question", 0) + n_para * row.get("bottom_s_per_paragraph", 0)
        row["hours_to_gpu_examples"] = sec / 3600
        rows_out.append(row)
        del enc, opt
    for r in rows_out:
        r.update(model=model, data=desc, train_paragraphs=n_para, train_questions=n_q,
                 gpu_examples=GPU_EXAMPLES, seed=seed)
    return rows_out


def matmul_rates(threads: int, repeats: int = 20) -> dict:
    """GFLOP/s of one projection-shaped product ([512 x 576] @ [576 x 1536], SmolLM2's MLP) in fp32 and bf16 at
    `threads`, and whether oneDNN runs bf16 natively here: what decides --enc-precision auto."""
    import torch

    from latentwire.encoder.lmtrain import cpu_has_bf16
    from latentwire.wire.wire import torch_threads
    out = {"threads": threads, "bf16_native": cpu_has_bf16(), "capability": torch.backends.cpu.get_cpu_capability()}
    with torch_threads(threads):
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, w = torch.randn(512, 576, dtype=dt), torch.randn(1536, 576, dtype=dt)
            for _ in range(3):
                a @ w.T
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(repeats):
                    a @ w.T
                runs.append(2 * 512 * 576 * 1536 * repeats / (time.perf_counter() - t0) / 1e9)
            out[f"{name}_gflops"] = statistics.median(runs)
    return out


def _enc_ids(enc, rows):
    import torch

    from latentwire.llm.forward import right_pad
    return right_pad([torch.tensor(enc.sender_input(r.enc_ids)[0], dtype=torch.long) for r in rows])


def table(rows: list[dict]) -> str:
    lines = ["| row | tune | threads | precision | LM head | teacher | bottom | stage A s / step | A examples / s | "
             f"stage B s / step | B examples / s | hours for {rows[0]['gpu_examples']:,} examples |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['lever']} | {r['tune']} | {r['threads']} | {r['precision']} | {r['head']} | {r['teacher']} | "
                     f"{r['bottom']} | {r['step_s_A']:.2f} | {r['examples_per_s_A']:.2f} | {r['step_s_B']:.2f} | "
                     f"{r['examples_per_s_B']:.2f} | {r['hours_to_gpu_examples']:.1f} |")
    cache = [f"teacher {r['teacher_s_per_question']:.3f} s a question (a paragraph's questions together)"
             for r in rows if "teacher_s_per_question" in r][:1]
    cache += [f"bottom {r['bottom_s_per_paragraph']:.3f} s a paragraph" for r in rows
              if "bottom_s_per_paragraph" in r][:1]
    if cache:
        lines.append(f"\nStored caches, paid once per training file: {'; '.join(cache)}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--squad-train", default=None, help="official SQuAD JSON (default: the built-in synthetic set)")
    ap.add_argument("--levers", "--variants", dest="levers", default=",".join(LADDER),
                    help=f"comma-separated rows, of {', '.join(LADDER)}")
    ap.add_argument("--batch", type=int, default=8, help="examples a step (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per stage after a warm-up (default 3)")
    ap.add_argument("--threads-max", type=int, default=2, help="threads of every row after `base` (default 2)")
    ap.add_argument("--fill", type=int, default=20, help="paragraphs the caches' cost is timed on (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/encoder_cost", help="folder for results.jsonl and table.md")
    a = ap.parse_args(argv)
    bad = [v for v in a.levers.split(",") if v not in LADDER]
    if bad:
        print(f"encoder_cost.py: error: --levers {bad[0]}: one of {', '.join(LADDER)}", file=sys.stderr)
        return 2
    import os
    t0, load0 = time.time(), os.getloadavg()[0]
    import torch
    n = torch.get_num_threads()
    try:
        rates = [matmul_rates(k) for k in sorted({1, a.threads_max})]
        rows = measure(a.model, a.squad_train, a.levers.split(","), a.batch, a.repeats, a.seed, a.threads_max,
                       a.fill)
    finally:
        torch.set_num_threads(n)  # main may run in-process
    what = f"model {a.model}, data {rows[0]['data']}, {rows[0]['train_paragraphs']} training paragraphs, seed {a.seed}"
    cpu = (f"This CPU ({rates[0]['capability']}; oneDNN bf16 native: {rates[0]['bf16_native']}), one "
           "[512 x 576] @ [576 x 1536] product: " + "; ".join(
               f"{r['threads']} thread{'s' if r['threads'] > 1 else ''} fp32 {r['fp32_gflops']:.1f}, bf16 "
               f"{r['bf16_gflops']:.1f} GFLOP/s" for r in rates) + ".\n\n")
    for r in rows:
        r["matmul"] = rates
    print(record("encoder_cost.py", sys.argv[1:] if argv is None else argv, a.out, rows, what, cpu + table(rows), t0,
                 load0))
    return 0


def record(script: str, argv, out: str, rows: list[dict], what: str, tbl: str, t0: float, load0: float) -> str:
    """Write out/results.jsonl and out/table.md (the command, its seconds, `what`, the load, the table); return the
    markdown. A timing is only as good as the machine was quiet: the 1-minute load average before and after is
    printed with it."""
    import os

    from latentwire.util.runio import atomic_write_text, write_jsonl
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "results.jsonl", rows)
    load = f"load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores"
    md = f"`python benchmarks/{script} {' '.join(argv)}` ({time.time() - t0:.0f} s; {what}; {load})\n\n{tbl}\n"
    atomic_write_text(out / "table.md", md)
    return md

if __name__ == "__main__":
    sys.exit(main())
