"""How fragile is the LLM-coded wire (`ac`)? Codes N paragraphs with the
frozen LLM at the default settings (CPU, fp32, one thread, 8 lanes), then
decodes the same payloads under one change at a time and counts, per change,
the payloads that still decode exactly, those the integrity check catches
(`wire.ids_check`: a loud error), and those that decode to other tokens
unnoticed (the check's 2 bytes collide: expected 1 in 65,536).

  OMP_NUM_THREADS=1 python benchmarks/wire_robustness.py --model smollm2-135m \\
      --squad ../shared/squad/dev-v1.1-part-a.json --contexts 16 --out runs/wire_robustness

Changes: the reference (same settings, again), 2 threads, 4 and 1 lanes,
bf16 weights, one weight +1 ulp (the final norm's first: every logit goes
through it), the prompt head of another template (plain), and CUDA when a GPU
is present. Also prints the payload bytes with and without the check bytes,
beside the frame's. Writes results.jsonl and results.md into --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--squad", required=True, help="an official SQuAD JSON (its first --contexts paragraphs)")
    p.add_argument("--contexts", type=int, default=16)
    p.add_argument("--template", default="fewshot")
    p.add_argument("--only", default=None, help="comma-separated change names to run (default: all)")
    p.add_argument("--out", default="runs/wire_robustness")
    return p


def perturbed(lm):
    """The model with the final norm's first weight moved up by one ulp (a model file differing in one bit)."""
    other = copy.copy(lm)
    other.model = copy.deepcopy(lm.model)
    norm = getattr(getattr(other.model, "model", other.model), "norm")
    with torch.no_grad():
        w = norm.weight.view(-1)
        w[0] = torch.nextafter(w[0], torch.tensor(float("inf"), dtype=w.dtype))
    return other


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import latentwire as lw
    from latentwire.data import load_squad_json
    from latentwire.pipelines.frame import FRAME_BYTES
    from latentwire.llm.models import load_model
    from latentwire.util.runio import atomic_write_text, write_jsonl
    from latentwire.wire.wire import LMArithmeticCodec, ids_check

    examples, _ = load_squad_json(args.squad, "--squad")
    contexts = list(dict.fromkeys(e.context for e in examples))[:args.contexts]
    t0 = time.time()
    pipe = lw.load_pipeline("ac", args.model, device="cpu", dtype="float32", options={"template": args.template})
    lm, head, codec = pipe.lm, pipe.codec.head, pipe.codec
    want = [pipe.context_ids(c) for c in contexts]
    t = time.time()
    payloads = codec.encode_many([(c, w) for c, w in zip(contexts, want)])
    encode_s = time.time() - t
    sizes = [len(p) for p in payloads]
    n_tok = sum(map(len, want))

    def checks(p: bytes) -> bytes:  # the check bytes the payload carries (the codec's own reading of its layout)
        return codec.parse(bytes(p))[1]

    def with_settings(model=None, lanes=None, threads=None, head_ids=None):
        c = LMArithmeticCodec(model or lm, head if head_ids is None else head_ids)
        if lanes is not None:
            c.LANES = lanes
        if threads is not None:
            c.THREADS = threads
        return c

    changes = {
        "reference (same settings)": lambda: with_settings(),
        "2 threads (coded on 1)": lambda: with_settings(threads=2),
        "4 lanes (coded with 8)": lambda: with_settings(lanes=4),
        "1 lane (coded with 8)": lambda: with_settings(lanes=1),
        "bf16 weights (coded in fp32)": lambda: with_settings(load_model(args.model, "cpu", "bfloat16")),
        "one weight +1 ulp (final norm)": lambda: with_settings(perturbed(lm)),
        "another template's head (plain)": lambda: with_settings(
            head_ids=lw.load_pipeline("ac", lm=lm, options={"template": "plain"}).codec.head),
    }
    if torch.cuda.is_available():
        changes["CUDA fp32 (coded on CPU)"] = lambda: with_settings(load_model(args.model, "cuda", "float32"))
        changes["CUDA bf16 (coded on CPU fp32)"] = lambda: with_settings(load_model(args.model, "cuda", "bfloat16"))
    only = None if args.only is None else {s.strip() for s in args.only.split(",")}
    rows = []
    for name, make in changes.items():
        if only is not None and not any(name.startswith(o) for o in only):
            continue
        c = make()
        t = time.time()
        got = c.decode_many(payloads, verify=False)
        exact = sum(g == w for g, w in zip(got, want))
        caught = sum(ids_check(g) != checks(p) for g, p in zip(got, payloads))
        silent = sum(g != w and ids_check(g) == checks(p) for g, p, w in zip(got, payloads, want))
        rows.append({"change": name, "payloads": len(payloads), "exact": exact, "caught": caught, "silent": silent,
                     "decode_s": round(time.time() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"model": lm.source, "squad": args.squad, "contexts": len(contexts), "context_tokens_mean": n_tok / len(want),
            "template": args.template, "payload_bytes_mean": sum(sizes) / len(sizes),
            "check_bytes": LMArithmeticCodec.CHECK_BYTES, "frame_bytes": FRAME_BYTES, "encode_s": round(encode_s, 1),
            "wall_s": round(time.time() - t0, 1), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "command": "python benchmarks/wire_robustness.py " + " ".join(sys.argv[1:] if argv is
                                                                                               None else argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "results.jsonl", [meta] + rows)
    b = meta["payload_bytes_mean"]
    lines = [f"`{meta['command']}` -- {meta['model']}, {len(contexts)} paragraphs of {args.squad} "
             f"({meta['context_tokens_mean']:.1f} tokens each), coded on CPU fp32, 1 thread, 8 lanes; torch "
             f"{meta['torch']}; {meta['wall_s']:.0f} s", "",
             f"Payload: {b:.1f} bytes a paragraph, of which {meta['check_bytes']} are the integrity check "
             f"({b - meta['check_bytes']:.1f} without it: +{100 * meta['check_bytes'] / (b - meta['check_bytes']):.1f}%)"
             f"; a payload file adds the {FRAME_BYTES}-byte frame.", "",
             "| decoded with | decode exactly | integrity check catches | wrong, unnoticed | decode s |",
             "|---|---|---|---|---|"]
    for r in rows:
        n = r["payloads"]
        lines.append(f"| {r['change']} | {r['exact']}/{n} ({100 * r['exact'] / n:.0f}%) | {r['caught']}/{n} | "
                     f"{r['silent']}/{n} | {r['decode_s']} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
