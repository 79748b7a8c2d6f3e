"""How much of each context token's identity the sender's hidden states hold,
layer by layer: a ridge-regression map from the layer's states (each at unit
RMS) to the token's input embedding, fitted on training paragraphs; a token
counts as recovered when its mapped vector's nearest embedding row (cosine)
is itself, on held-out evaluation paragraphs.

  python benchmarks/layer_probe.py --squad-train ../shared/squad/train-v1.1-first44.json \\
      --squad-eval ../shared/squad/dev-v1.1-part-a.json --md docs/sequence.md

Why: the learned compressor's sender reads one layer (--seq-layer; the middle
by default). At r = 1 (one latent per token, nothing compressed) it can give
the receiver its text back only if that layer still names each token; this
measures how much of it a linear read-out finds there.
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

import torch

from latentwire.data import context_token_ids, interleave_by_title, load_squad_json
from latentwire.llm.models import load_model
from latentwire.util.runio import write_section


@torch.no_grad()
def layer_states(lm, contexts, max_tokens: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of every layer [layers + 1, N, d] (each paragraph read alone) and the tokens [N]."""
    hs, toks = [], []
    for c in contexts:
        ids = context_token_ids(lm.tokenizer, c)[:max_tokens]
        out = lm.model(input_ids=torch.tensor([ids], device=lm.device), output_hidden_states=True)
        hs.append(torch.stack([h[0].float().cpu() for h in out.hidden_states]))
        toks += ids
    return torch.cat(hs, 1), torch.tensor(toks)


def recovery(x_tr, t_tr, x_dev, t_dev, table, ridge: float = 1.0) -> tuple[float, float]:
    """Token recovery (train, dev) of the ridge map from states to embeddings."""
    def unit(x):
        return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    x_tr, x_dev = unit(x_tr), unit(x_dev)
    a = torch.linalg.solve(x_tr.T @ x_tr + ridge * torch.eye(x_tr.shape[1]), x_tr.T @ table[t_tr])
    rows = torch.nn.functional.normalize(table, dim=-1)

    def acc(x, t):
        hit = 0
        for i in range(0, len(t), 4096):
            p = torch.nn.functional.normalize(x[i:i + 4096] @ a, dim=-1)
            hit += int(((p @ rows.T).argmax(-1) == t[i:i + 4096]).sum())
        return hit / len(t)
    return acc(x_tr, t_tr), acc(x_dev, t_dev)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--squad-train", required=True)
    ap.add_argument("--squad-eval", required=True)
    ap.add_argument("--train-paragraphs", type=int, default=150)
    ap.add_argument("--eval-paragraphs", type=int, default=20)
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="default: 0, then every ~4th, and the last")
    ap.add_argument("--md", default=None, help="also write the table into this markdown file (its layer_probe.py "
                                               "markers)")
    args = ap.parse_args(argv)
    lm = load_model(args.model)
    tr, _ = load_squad_json(args.squad_train, "--squad-train")
    ev, _ = load_squad_json(args.squad_eval, "--squad-eval")

    def paragraphs(ex, n):
        return list(dict.fromkeys(e.context for e in interleave_by_title(ex)))[:n]
    h_tr, t_tr = layer_states(lm, paragraphs(tr, args.train_paragraphs))
    h_dev, t_dev = layer_states(lm, paragraphs(ev, args.eval_paragraphs))
    n = h_tr.shape[0] - 1
    layers = args.layers or sorted({0, *range(4, n, 4), n // 2, n})
    table = lm.embedding_table().float().cpu()
    lines = ["| layer | token recovery, training paragraphs | token recovery, evaluation paragraphs |",
             "|---|---|---|"]
    for layer in layers:
        a, b = recovery(h_tr[layer], t_tr, h_dev[layer], t_dev, table)
        lines.append(f"| {layer}{' (the sender default: the middle)' if layer == n // 2 else ''} | "
                     f"{100 * a:.1f}% | {100 * b:.1f}% |")
    head = (f"{args.model}: ridge map (lambda 1) from a layer's states to the token's input embedding, fitted on "
            f"{len(t_tr):,} tokens of {args.train_paragraphs} training paragraphs, scored on {len(t_dev):,} tokens "
            f"of {args.eval_paragraphs} evaluation paragraphs (nearest row by cosine = the token).")
    text = head + "\n\n" + "\n".join(lines)
    print(text)
    if args.md:
        cmd = "python benchmarks/layer_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
        write_section(args.md, "layer_probe.py", f"```\n{cmd}\n```\n\n({when} UTC)\n\n{text}\n")
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
