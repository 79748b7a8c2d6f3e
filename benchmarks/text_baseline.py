"""Text-baseline benchmark: batched greedy generation vs the seed's
one-question-at-a-time loop (same prompts, same run, outputs compared), and
the cold vs cached load time of the default GGUF model.

  python benchmarks/text_baseline.py [--n 64] [--batch-size 8] [--squad-eval PATH]

Cold load = dequantizing the GGUF into a fresh, empty cache folder; cached
load = loading the safetensors that the cold load left behind.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=64, help="questions")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--template", default="fewshot")
    ap.add_argument("--squad-eval", default=None, help="SQuAD JSON; default: the built-in synthetic set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from latentwire.data import PromptBuilder, interleave_by_title, load_squad_json, synthetic_squad
    from latentwire.evaluate import generate_one_at_a_time, generate_predictions
    from latentwire.models import load_model

    # 1. load times, in a private cache folder so "cold" really is cold
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LATENTWIRE_CACHE"] = cache
        t = time.perf_counter(); load_model(args.model); cold = time.perf_counter() - t
        t = time.perf_counter(); lm = load_model(args.model); warm = time.perf_counter() - t

    # 2. throughput
    if args.squad_eval:
        ex, _ = load_squad_json(args.squad_eval, "--squad-eval")
        data = f"{args.squad_eval} (first {args.n} questions, round-robin over articles)"
    else:
        ex = synthetic_squad(60, args.seed)
        data = f"built-in synthetic set (seed {args.seed}, first {args.n} questions)"
    ex = interleave_by_title(ex)[:args.n]
    b = PromptBuilder(lm.tokenizer, args.template, 512)
    prompts = [b.build(e) for e in ex]
    generate_predictions(lm, prompts[:2], batch_size=2, max_new_tokens=2, progress=False)  # warm-up
    t = time.perf_counter()
    batched = generate_predictions(lm, prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    tb = time.perf_counter() - t
    t = time.perf_counter()
    single = generate_one_at_a_time(lm, prompts, max_new_tokens=args.max_new_tokens)
    ts = time.perf_counter() - t
    same = sum(a == s for a, s in zip(batched, single))

    print(f"model: {args.model} ({lm.source}), device {lm.device}, dtype {lm.dtype}, torch threads "
          f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"data: {data}, template {args.template}, max_new_tokens {args.max_new_tokens}\n")
    print("| generation | questions | wall s | questions/s |\n|---|---|---|---|")
    print(f"| batched (batch {args.batch_size}, left-padded, from inputs_embeds) | {len(prompts)} | {tb:.1f} | "
          f"{len(prompts) / tb:.2f} |")
    print(f"| one at a time (the seed's loop) | {len(prompts)} | {ts:.1f} | {len(prompts) / ts:.2f} |")
    print(f"\nspeed-up batched / one-at-a-time: **{ts / tb:.2f}x**; identical outputs: {same}/{len(prompts)}\n")
    print("| model load | wall s |\n|---|---|")
    print(f"| cold (dequantize GGUF, write cache) | {cold:.1f} |")
    print(f"| cached (safetensors) | {warm:.2f} |")
    print(f"\ncold / cached: **{cold / warm:.0f}x**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
