"""What one training step of the pooled LM encoder asks of the machine that
runs it, counted here, so that a GPU window starts with the arithmetic done:
the issue aims at >= 10 steps/s at batch 32 on an H100/H200 (its own script
reached 2.7, Python-bound).

Counted, on the real batches (SQuAD training paragraphs tokenized by
SmolLM2's tokenizer, batch `--batch` 32, stage A reconstruction /
continuation and stage B answers + KL to the teacher, the head's K/V once):
* the batch assembly's time (make_batch);
* the ops a step dispatches -- forward ops and backward nodes, from the
  profiler -- on a random-weight model with SmolLM2-135M's graph (30 blocks,
  9 query / 3 key-value heads, tied head) with every width shrunk and every
  row cut short (an op's count does not depend on its tensors' sizes); in
  eager PyTorch each is at least one kernel launch on a GPU;
* the step's wall time on this CPU at those near-zero sizes: Python, dispatch
  and the CPU kernels' own fixed costs (not the GPU host's time: a CPU
  kernel's fixed cost is not a launch's);
* what the GPU must compute at SmolLM2's real size (tokens and FLOPs, counted
  from the batch) and the time that takes at the H200's bf16 peak (~790
  TFLOP/s, .library/device/KINDS.md): steps/s cannot exceed peak / FLOPs.

  python benchmarks/step_host.py --squad-train ../shared/squad/train-v1.1-first44.json --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

H200_BF16_TFLOPS = 790.0
"""A bf16 8192^3 matrix product through PyTorch on the lent H200 (.library/device/KINDS.md, 2026-10-28)."""
VOCAB = 512


def shrunk_like(config, hidden: int = 18, mlp: int = 36, vocab: int = VOCAB):
    """A random-weight causal LM with `config`'s depth and heads, hidden / MLP widths and vocabulary shrunk."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM
    c = copy.deepcopy(config)
    c.hidden_size, c.intermediate_size, c.vocab_size = hidden, mlp, vocab
    c.head_dim = hidden // c.num_attention_heads
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(c, k, None)
        if isinstance(v, int):
            setattr(c, k, v % vocab)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(c).eval()


def step_flops(rows, n_params: int, teacher: bool, ratio: int) -> dict:
    """What one step computes at the real size (matrix products only, 2 FLOPs a multiply-add): the sender's
    forward + backward over its tokens (6 P a token, every weight trained), the frozen receiver's forward +
    input-gradient backward over its positions (4 P), the teacher's forward over the text (2 P); attention over
    the head's cached positions is left out (small beside the weights at these lengths)."""
    import math
    enc_tok = sum(len(r.enc_ids) for r in rows)
    recv_pos = sum(math.ceil(len(r.enc_ids) / ratio) + len(r.tail) for r in rows)
    teach_tok = sum(len(r.ctx) + len(r.tail) for r in rows) if teacher else 0
    flops = 6 * n_params * enc_tok + 4 * n_params * recv_pos + 2 * n_params * teach_tok
    return {"sender_tokens": enc_tok, "receiver_positions": recv_pos, "teacher_tokens": teach_tok,
            "tflop": flops / 1e12}


def measure(squad_train: str | None, batch: int, repeats: int, seed: int = 0, tokens: int = 16,
            model: str = "smollm2-135m", log=print) -> list[dict]:
    import torch

    from latentwire.config import EncConfig
    from latentwire.data import Example, PromptBuilder
    from latentwire.llm.forward import head_cache
    from latentwire.encoder.lmenc import build_encoder
    from latentwire.encoder.lmtrain import Para, loss_step, make_batch, split_training
    from latentwire.llm.models import LoadedModel, load_model
    from latentwire.evaluation.probes import REPEAT_CUE

    from encoder_cost import training_questions  # benchmarks/ is on the path of a script run from it
    train, desc = training_questions(squad_train)
    real = load_model(model)
    n_params = sum(p.numel() for p in real.model.parameters())  # tied head counted once
    lm = LoadedModel(shrunk_like(real.model.config), real.tokenizer, "shrunk", "shrunk", torch.device("cpu"),
                     torch.float32)
    builder = PromptBuilder(real.tokenizer, "fewshot")
    ec = EncConfig(enc_batch=batch, enc_seed=seed)
    paras, _ = split_training(train, builder, ec)
    fold = lambda ids, n: [i % VOCAB for i in ids[:n]]  # noqa: E731
    short = [Para(fold(p.ids, tokens), [(q, fold(t, 8), fold(a, 4)) for q, t, a in p.questions]) for p in paras]
    head = fold(builder.build(Example("h", "h", "", "?", ["-"])).head_ids, 8)
    hc, n_head = head_cache(lm, head), len(head)
    cue = fold(builder._ids(REPEAT_CUE), 8)
    del real
    torch.manual_seed(seed)
    enc = build_encoder(lm, ec)
    enc.train()
    params = [p for p in enc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    out = []
    from torch.profiler import profile
    for stage in ("A", "B"):
        times, parts = [], []
        for rep in range(repeats + 1):
            t0 = time.perf_counter()
            rows = make_batch(short, stage, rep, ec, cue)  # the batch assembly is part of the step's host cost
            t1 = time.perf_counter()
            terms = loss_step(enc, lm, hc, n_head, rows, ec, None)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, ec.enc_clip)
            opt.step()
            dt = time.perf_counter() - t0
            if rep:  # the first step warms up
                times.append(dt)
                parts.append(t1 - t0)
        with profile() as prof:  # the ops the step dispatches (top level: what a GPU would launch or fuse)
            terms = loss_step(enc, lm, hc, n_head, make_batch(short, stage, 0, ec, cue), ec, None)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
        top = [e.name for e in prof.events() if e.cpu_parent is None]
        n_ops = sum(1 for n in top if n.startswith("aten::"))
        n_bwd = sum(1 for n in top if n.startswith("autograd::engine::evaluate_function"))
        fl = step_flops(make_batch(paras, stage, 1, ec, cue), n_params, stage == "B", ec.enc_ratio)
        row = {"stage": stage, "batch": batch, "host_ms": 1000 * statistics.median(times),
               "host_ms_runs": [round(1000 * t, 1) for t in times], "make_batch_ms": 1000 * statistics.median(parts),
               "threads": torch.get_num_threads(), "params": n_params, "forward_ops": n_ops, "backward_nodes": n_bwd,
               "tokens": tokens, **fl, "peak_ms": 1000 * fl["tflop"] / H200_BF16_TFLOPS, "data": desc, "seed": seed,
               "model": model}
        row["peak_bound_steps_s"] = 1000 / row["peak_ms"]
        log(f"stage {stage}: {n_ops:,} forward ops + {n_bwd:,} backward nodes; {row['host_ms']:.0f} ms a step of "
            f"{batch} (median of {repeats}), {fl['tflop']:.2f} TFLOP at the real size")
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| stage | make_batch ms | forward ops | backward nodes | CPU ms / step at near-zero sizes (runs) | "
             "sender tokens | receiver positions | teacher tokens | TFLOP / step (real size) | "
             "ms at H200 bf16 peak | steps/s bound: peak |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['make_batch_ms']:.1f} | {r['forward_ops']:,} | {r['backward_nodes']:,} | "
                     f"{r['host_ms']:.0f} ({', '.join(f'{t:.0f}' for t in r['host_ms_runs'])}) | "
                     f"{r['sender_tokens']:,} | {r['receiver_positions']:,} | {r['teacher_tokens']:,} | "
                     f"{r['tflop']:.2f} | {r['peak_ms']:.1f} | {r['peak_bound_steps_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="whose graph and tokenizer (default smollm2-135m)")
    ap.add_argument("--squad-train", default=None, help="official SQuAD JSON (default: the built-in synthetic set)")
    ap.add_argument("--batch", type=int, default=32, help="examples a step (default 32, the GPU run's)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per stage after a warm-up (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a GPU run's host is one "
                                                          "Python thread issuing ops)")
    ap.add_argument("--tokens", type=int, default=16, help="paragraph tokens kept per row (default 16: arithmetic "
                                                           "near zero; the ops are the same at any length)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/step_host", help="folder for results.jsonl and table.md")
    a = ap.parse_args(argv)
    if a.batch < 1 or a.repeats < 1 or a.tokens < 8:
        print("step_host.py: error: --batch and --repeats must be >= 1, --tokens >= 8", file=sys.stderr)
        return 2
    import os

    from encoder_cost import record  # benchmarks/ is on the path of a script run from it
    t0, load0 = time.time(), os.getloadavg()[0]
    from contextlib import nullcontext

    from latentwire.wire.wire import torch_threads
    with torch_threads(a.threads) if a.threads else nullcontext():  # restored after: main may run in-process
        rows = measure(a.squad_train, a.batch, a.repeats, a.seed, a.tokens, a.model)
    what = (f"{a.model}'s graph, widths shrunk, rows cut to {a.tokens} tokens; data {rows[0]['data']}, seed {a.seed}, "
            f"{rows[0]['threads']} thread(s)")
    print(record("step_host.py", sys.argv[1:] if argv is None else argv, a.out, rows, what, table(rows), t0, load0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
