"""What training the pooled LM encoder costs on this machine's CPU: seconds a
step and examples a second for each training variant, and the hours it would
take to show the encoder as many examples as the GPU run of issue #28
(~26,000: 285 + 522 steps of 32 on one H200 in 300 s).

Variants (each timed on its own, the same batches, after one warm-up step):
* full         -- every weight of the sender trains (the measured GPU design);
* lora16       -- LoRA adapters of rank 16 on every linear layer;
* top2         -- the top 2 blocks train, the bottom 28 run frozen each step;
* top2+cache   -- the CPU variant: the bottom's states of each paragraph and the
                  teacher's top-k of each question computed once and kept
                  (--enc-cache-bottom --enc-cache-teacher); the step is timed on
                  warm caches, each cache's cost per paragraph / question
                  timed on its own (a fresh batch) and added once per distinct
                  paragraph / question of the training set (questions: at most
                  as many as stage B shows).
The receiver's head K/V is computed once in every variant. Stage A
(reconstruction + continuation) and stage B (answers + KL) steps are timed
separately; the hours use the GPU run's split (35% of the steps in A).

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
VARIANTS = {"full": {"enc_tune": "full"}, "lora16": {"enc_tune": "lora", "enc_lora_rank": 16},
            "top2": {"enc_tune": "top", "enc_top_layers": 2},
            "top2+cache": {"enc_tune": "top", "enc_top_layers": 2, "enc_cache_bottom": True,
                           "enc_cache_teacher": True}}


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


def measure(model: str, squad_train: str | None, variants, batch: int, repeats: int, seed: int = 0,
            log=print) -> list[dict]:
    import torch

    from latentwire.config import EncConfig
    from latentwire.data import Example, PromptBuilder
    from latentwire.llm.forward import head_cache
    from latentwire.encoder.lmenc import build_encoder
    from latentwire.llm.forward import right_pad
    from latentwire.encoder.lmtrain import loss_step, make_batch, split_training, teacher_topk
    from latentwire.llm.models import load_model
    from latentwire.evaluation.probes import REPEAT_CUE

    train, desc = training_questions(squad_train)
    lm = load_model(model)
    builder = PromptBuilder(lm.tokenizer, "fewshot")
    head = builder.build(Example("h", "h", "", "?", ["-"])).head_ids
    hc, n_head = head_cache(lm, head), len(head)
    cue = builder._ids(REPEAT_CUE)
    rows_out = []
    n_para = n_q = None
    for name in variants:
        ec = EncConfig(enc_batch=batch, enc_seed=seed, **VARIANTS[name])
        paras, _ = split_training(train, builder, ec)
        n_para, n_q = len(paras), sum(len(p.questions) for p in paras)
        torch.manual_seed(seed)
        enc = build_encoder(lm, ec)
        enc.train()
        opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-5)
        memo = {} if ec.enc_cache_teacher else None
        row = {"variant": name, "batch": batch, "threads": torch.get_num_threads(),
               "trainable_params": sum(p.numel() for p in enc.parameters() if p.requires_grad)}
        for stage in ("A", "B"):
            times, first = [], None
            for rep in range(repeats + 1):
                rows = make_batch(paras, stage, 0, ec, cue)  # the same batch every time: warm caches after the first
                t0 = time.perf_counter()
                terms = loss_step(enc, lm, hc, n_head, rows, ec, memo)
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                opt.step()
                dt = time.perf_counter() - t0
                if rep == 0:
                    first = dt
                else:
                    times.append(dt)
            row[f"step_s_{stage}"] = statistics.median(times)
            row[f"step_s_{stage}_runs"] = [round(t, 3) for t in times]
            row[f"first_step_s_{stage}"] = first
            log(f"{name} stage {stage}: {row[f'step_s_{stage}']:.2f} s a step of {batch} (median of {repeats}; "
                f"first {first:.2f} s)")
        # each cache's own cost, measured on its own: the bottom's states of a batch of paragraphs, the
        # teacher's top-k of a batch of questions (paid once per distinct paragraph / question)
        if ec.enc_cache_bottom or ec.enc_cache_teacher:
            fresh = make_batch(paras, "B", 1, ec, cue)
            ids, m = right_pad([torch.tensor(r.enc_ids, dtype=torch.long) for r in fresh])
            t0 = time.perf_counter()
            with torch.no_grad():
                enc.sender(input_ids=ids, attention_mask=m.long(), use_cache=False, output_hidden_states=True)
            row["cache_s_per_paragraph"] = (time.perf_counter() - t0) / len(fresh)
            t0 = time.perf_counter()
            teacher_topk(lm, hc, n_head, fresh, ec.enc_teacher_topk, None)
            row["cache_s_per_question"] = (time.perf_counter() - t0) / len(fresh)
            log(f"{name}: caches cost {row['cache_s_per_paragraph']:.2f} s a paragraph, "
                f"{row['cache_s_per_question']:.2f} s a question")
        a_steps, b_steps = 0.35 * GPU_EXAMPLES / batch, 0.65 * GPU_EXAMPLES / batch
        sec = a_steps * row["step_s_A"] + b_steps * row["step_s_B"]
        if "cache_s_per_paragraph" in row:
            # every paragraph's bottom once; a question's teacher once, at most as many as stage B shows
            sec += n_para * row["cache_s_per_paragraph"] + min(n_q, 0.65 * GPU_EXAMPLES) * row["cache_s_per_question"]
        row["examples_per_s"] = GPU_EXAMPLES / sec
        row["hours_to_gpu_examples"] = sec / 3600
        rows_out.append(row)
        del enc, opt
    for r in rows_out:
        r.update(model=model, data=desc, train_paragraphs=n_para, train_questions=n_q,
                 gpu_examples=GPU_EXAMPLES, seed=seed)
    return rows_out


def table(rows: list[dict]) -> str:
    lines = ["| variant | trainable params | s / step, stage A | s / step, stage B | examples / s | "
             f"hours for {rows[0]['gpu_examples']:,} examples |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['trainable_params']:,} | {r['step_s_A']:.2f} | {r['step_s_B']:.2f} | "
                     f"{r['examples_per_s']:.2f} | {r['hours_to_gpu_examples']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--squad-train", default=None, help="official SQuAD JSON (default: the built-in synthetic set)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--batch", type=int, default=8, help="examples a step (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per stage after a warm-up (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/encoder_cost", help="folder for results.jsonl and table.md")
    a = ap.parse_args(argv)
    bad = [v for v in a.variants.split(",") if v not in VARIANTS]
    if bad:
        print(f"encoder_cost.py: error: --variants {bad[0]}: one of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    import os
    t0, load0 = time.time(), os.getloadavg()[0]
    from contextlib import nullcontext

    from latentwire.wire.wire import torch_threads
    with torch_threads(a.threads) if a.threads else nullcontext():  # restored after: main may run in-process
        rows = measure(a.model, a.squad_train, a.variants.split(","), a.batch, a.repeats, a.seed)
    what = (f"model {a.model}, data {rows[0]['data']}, {rows[0]['train_paragraphs']} training paragraphs, "
            f"seed {a.seed}, {rows[0]['threads']} threads")
    print(record("encoder_cost.py", sys.argv[1:] if argv is None else argv, a.out, rows, what, table(rows), t0, load0))
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
